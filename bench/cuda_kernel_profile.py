"""Where a merge kernel's time goes on a GPU: wall time per method and the top operators.

    python bench/cuda_kernel_profile.py [--layers 16] [--models 3] [--methods linear,ties]
        [--profile ties] [--deltas bf16-ties]

Builds, on the GPU, a bf16 base and ``--models`` fine-tunes with the tensor shapes of a
Llama-3.2-1B-like model (embedding 128256 x 2048, ``--layers`` decoder layers; about 1.5 B
parameters, 3 GB per model at 16 layers), with the fine-tune deltas of
``bench/generate.py --deltas`` (``bf16-ties``: about one bf16 ulp, so a TIES trim has heavy
ties at its threshold). Then, for each method, times the kernel over every tensor as the
streaming runner calls it on CUDA (float32 conversion, kernel, cast back to bf16), median
of ``--repeats``, and counts the host-device synchronisations per pass. With ``--profile``,
prints torch.profiler's top operators for one pass of that method by CUDA and by CPU time.
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

# isort: off
import merge_kernels  # noqa: F401  (before torch: sets the threading and allocation environment)
import torch

# isort: on
from merge_kernels.methods import magnitude_select
from merge_kernels.methods.kernel import MergeInputs, TensorContext
from merge_kernels.registry import get_method

METHODS: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    "linear": ({}, {"weight": 1.0}),
    "task_arithmetic": ({}, {"weight": 1.0}),
    "ties": ({}, {"weight": 1.0, "density": 0.2}),
    "dare_linear": ({}, {"weight": 1.0, "density": 0.1}),
    "dare_ties": ({}, {"weight": 1.0, "density": 0.1}),
    "breadcrumbs_ties": ({}, {"weight": 1.0, "density": 0.9, "gamma": 0.01}),
    "della": ({}, {"weight": 1.0, "density": 0.5, "epsilon": 0.1}),
}
NOISE = {"scaled": 0.002, "bf16-ties": 0.0002}
# operators that wait for the GPU (a value or a size read back to the host)
SYNCING = ("aten::_local_scalar_dense", "aten::nonzero", "aten::masked_select")
# operators that wait for the GPU (a value or a size read back to the host)
SYNCING = ("aten::_local_scalar_dense", "aten::nonzero", "aten::masked_select")
HIDDEN, INTERMEDIATE, VOCAB, KV = 2048, 8192, 128256, 512


def shapes(layers: int) -> list[tuple[str, tuple[int, ...]]]:
    """Tensor names and shapes of a Llama-3.2-1B-like model with ``layers`` layers."""
    out: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (VOCAB, HIDDEN))]
    for i in range(layers):
        p = f"model.layers.{i}."
        out += [
            (p + "self_attn.q_proj.weight", (HIDDEN, HIDDEN)),
            (p + "self_attn.k_proj.weight", (KV, HIDDEN)),
            (p + "self_attn.v_proj.weight", (KV, HIDDEN)),
            (p + "self_attn.o_proj.weight", (HIDDEN, HIDDEN)),
            (p + "mlp.gate_proj.weight", (INTERMEDIATE, HIDDEN)),
            (p + "mlp.up_proj.weight", (INTERMEDIATE, HIDDEN)),
            (p + "mlp.down_proj.weight", (HIDDEN, INTERMEDIATE)),
            (p + "input_layernorm.weight", (HIDDEN,)),
            (p + "post_attention_layernorm.weight", (HIDDEN,)),
        ]
    return [*out, ("model.norm.weight", (HIDDEN,))]


def build(
    layers: int, models: int, noise: float
) -> list[tuple[str, torch.Tensor, list[torch.Tensor]]]:
    generator = torch.Generator(device="cuda").manual_seed(0)
    data = []
    for name, shape in shapes(layers):
        base = (torch.randn(shape, generator=generator, device="cuda") * 0.02).to(torch.bfloat16)
        tuned = [
            (base.float() + noise * torch.randn(shape, generator=generator, device="cuda")).to(
                torch.bfloat16
            )
            for _ in range(models)
        ]
        data.append((name, base, tuned))
    return data


def one_pass(name: str, data: list[tuple[str, torch.Tensor, list[torch.Tensor]]]) -> None:
    spec = get_method(name)
    method_values, model_values = METHODS[name]
    params = spec.params.model_validate(method_values)
    model_params = [spec.model_params.model_validate(model_values) for _ in data[0][2]]
    for tensor_name, base, tuned in data:
        inputs = MergeInputs(
            base=base.float(), models=[t.float() for t in tuned], model_params=model_params
        )
        merged = spec.kernel(inputs, params, TensorContext(name=tensor_name, seed=0))
        merged.to(torch.bfloat16)
    torch.cuda.synchronize()


def timed(name: str, data: list[tuple[str, torch.Tensor, list[torch.Tensor]]]) -> float:
    torch.cuda.synchronize()
    start = time.perf_counter()
    one_pass(name, data)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--models", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--methods", default="linear,ties,dare_ties")
    parser.add_argument("--profile", default="", help="a method to profile (one pass)")
    parser.add_argument("--deltas", choices=sorted(NOISE), default="bf16-ties")
    parser.add_argument(
        "--cuda-chunks", default="", help="also time ties with these chunk sizes (log2, e.g. 24,26)"
    )
    args = parser.parse_args()
    default_chunk = magnitude_select._CUDA_CHUNK
    data = build(args.layers, args.models, NOISE[args.deltas])
    params = sum(base.numel() for _, base, _ in data)
    print(
        f"{torch.cuda.get_device_name()}, torch {torch.__version__}: {len(data)} tensors, "
        f"{params / 1e9:.2f} B parameters per model, {args.models} fine-tunes, {args.deltas}"
    )
    print("\n| method | kernel wall s (median) | syncs per pass |\n|---|---|---|")
    for name in args.methods.split(","):
        one_pass(name, data[:3])  # warm-up
        times = [timed(name, data) for _ in range(args.repeats)]
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            one_pass(name, data)
        syncs = sum(e.count for e in prof.key_averages() if e.key in SYNCING)
        print(f"| {name} | {statistics.median(times):.3f} | {syncs} |", flush=True)
    for bits in filter(None, args.cuda_chunks.split(",")):
        magnitude_select._CUDA_CHUNK = 1 << int(bits)
        one_pass("ties", data[:3])
        times = [timed("ties", data) for _ in range(args.repeats)]
        print(f"| ties, chunks of 2^{bits} | {statistics.median(times):.3f} | |", flush=True)
    magnitude_select._CUDA_CHUNK = default_chunk
    if args.profile:
        activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
        with torch.profiler.profile(activities=activities) as prof:
            one_pass(args.profile, data)
        averages = prof.key_averages()
        print(f"\n{args.profile}: top operators by self CUDA time")
        print(averages.table(sort_by="self_cuda_time_total", row_limit=15))
        print(f"\n{args.profile}: top operators by CPU time")
        print(averages.table(sort_by="cpu_time_total", row_limit=25))


if __name__ == "__main__":
    main()
