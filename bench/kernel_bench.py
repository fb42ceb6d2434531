"""Seconds per GB of bf16 task vector for each merge kernel, in memory (no file IO).

    python bench/kernel_bench.py [--gb 1.0] [--models 3] [--repeats 3] [--device cpu]
        [--deltas scaled|bf16-ties]

Builds a bf16 base and ``--models`` fine-tunes of Llama-like 4096 x 4096 tensors totalling
``--gb`` of bf16 task vectors (over all models), then times each method's kernel on every
tensor: the float32 conversion of the inputs, the kernel, and the cast of the result back
to bf16 — what the streaming runner does between reading and writing. Prints the median
over repeats as seconds per GB of bf16 task vector, and the process's peak RSS.

The base is N(0, 0.02²) in bf16; a fine-tune adds noise of standard deviation 0.002
(``--deltas scaled``, about ten bf16 ulps) or 0.0002 (``bf16-ties``: about one ulp, as
``bench/generate.py --deltas bf16-ties`` draws it), in which case the task vectors take few
distinct values and a TIES trim at density 0.2 has heavy ties at its threshold.

On the CPU, with the C extension built, it also times the fused loops the streaming merge
runs (``fused linear``: one weighted pass; ``fused ties``: the trim thresholds of every
model, then the TIES pass; ``fused dare_linear`` / ``fused dare_ties``: the same loops with
DARE's keyed drop, density 0.1, in place of the trim) and reports each one's CPU seconds
beside its wall seconds: on a shared machine the CPU time is the steadier figure.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import time
from typing import Any

# isort: off
import merge_kernels  # noqa: F401  (before torch: sets the threading and allocation environment)
import torch

# isort: on
from merge_kernels.methods.kernel import MergeInputs, TensorContext
from merge_kernels.registry import get_method

METHODS: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    "linear": ({}, {"weight": 1.0}),
    "task_arithmetic": ({}, {"weight": 1.0}),
    "ties": ({}, {"weight": 1.0, "density": 0.2}),
    "dare_linear": ({}, {"weight": 1.0, "density": 0.1}),
    "dare_ties": ({}, {"weight": 1.0, "density": 0.1}),
}
ROWS = COLS = 4096
NOISE = {"scaled": 0.002, "bf16-ties": 0.0002}  # fine-tune noise std per --deltas


def _tensors(
    gb: float, models: int, device: str, noise: float = NOISE["scaled"]
) -> list[tuple[torch.Tensor, list[torch.Tensor]]]:
    per_tensor = ROWS * COLS * 2 * models  # bytes of bf16 task vector per tensor, all models
    count = max(1, round(gb * 1e9 / per_tensor))
    generator = torch.Generator().manual_seed(0)
    out = []
    for _ in range(count):
        base = (torch.randn(ROWS, COLS, generator=generator) * 0.02).to(torch.bfloat16)
        tuned = [
            (base.float() + noise * torch.randn(ROWS, COLS, generator=generator)).to(torch.bfloat16)
            for _ in range(models)
        ]
        out.append((base.to(device), [t.to(device) for t in tuned]))
    return out


def _time(name: str, data: list[tuple[torch.Tensor, list[torch.Tensor]]], device: str) -> float:
    spec = get_method(name)
    method_values, model_values = METHODS[name]
    params = spec.params.model_validate(method_values)
    model_params = [spec.model_params.model_validate(model_values) for _ in data[0][1]]
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for index, (base, tuned) in enumerate(data):
        inputs = MergeInputs(
            base=base.float(), models=[t.float() for t in tuned], model_params=model_params
        )
        merged = spec.kernel(inputs, params, TensorContext(name=f"t{index}", seed=0))
        merged.to(torch.bfloat16)
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def _cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _time_fused(
    name: str, data: list[tuple[torch.Tensor, list[torch.Tensor]]]
) -> tuple[float, float]:
    """Wall and CPU seconds of the fused CPU loops over every tensor (``linear``, ``ties``,
    ``dare_linear`` or ``dare_ties``)."""
    from merge_kernels.fused import (
        WeightedSum,
        ties_into,
        trim_thresholds,
        weighted_sum_into,
    )
    from merge_kernels.methods.kernel import TrimState

    spec = get_method("ties")
    assert spec.consensus_form is not None
    form = spec.consensus_form(spec.params.model_validate({}))
    assert form is not None
    out = torch.empty(ROWS, COLS, dtype=torch.bfloat16)
    if name.startswith("dare"):
        return _time_fused_dare(name, data, out)
    cpu, start = _cpu_s(), time.perf_counter()
    for base, tuned in data:
        if name == "linear":
            weights = (1.0,) * (len(tuned) + 1)
            assert weighted_sum_into(out, [base, *tuned], WeightedSum(weights, len(weights)))
            continue
        k = int(0.2 * base.numel())
        found = trim_thresholds(tuned, base, [k] * len(tuned))
        assert all(f is not None for f in found), "the fused trim declined"
        trims = [TrimState(f.threshold, 0) for f in found if f is not None]
        cutoffs = [f.cutoff if f is not None else None for f in found]
        assert ties_into(out, base, tuned, form, [1.0] * len(tuned), trims, cutoffs) is not None
    return time.perf_counter() - start, _cpu_s() - cpu


def _time_fused_dare(
    name: str, data: list[tuple[torch.Tensor, list[torch.Tensor]]], out: torch.Tensor
) -> tuple[float, float]:
    from merge_kernels.fused_dare import dare_into

    spec = get_method(name)
    method_values, model_values = METHODS[name]
    params = spec.params.model_validate(method_values)
    model_params = tuple(spec.model_params.model_validate(model_values) for _ in data[0][1])
    assert spec.dare_form is not None
    form = spec.dare_form(params, model_params)
    assert form is not None
    cpu, start = _cpu_s(), time.perf_counter()
    for index, (base, tuned) in enumerate(data):
        assert dare_into(out, base, tuned, form, TensorContext(name=f"t{index}", seed=0))
    return time.perf_counter() - start, _cpu_s() - cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gb", type=float, default=1.0, help="GB of bf16 task vectors in all")
    parser.add_argument("--models", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--deltas", choices=sorted(NOISE), default="scaled")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    data = _tensors(args.gb, args.models, args.device, NOISE[args.deltas])
    gb = len(data) * ROWS * COLS * 2 * args.models / 1e9
    results = {}
    for name in METHODS:
        _time(name, data[:1], args.device)  # warm-up
        times = [_time(name, data, args.device) for _ in range(args.repeats)]
        results[name] = statistics.median(times) / gb
    fused_rows: dict[str, tuple[float, float]] = {}
    from merge_kernels import fused

    if args.device == "cpu" and fused.available():
        for name in ("linear", "ties", "dare_linear", "dare_ties"):
            _time_fused(name, data[:1])  # warm-up
            timed = [_time_fused(name, data) for _ in range(args.repeats)]
            fused_rows[f"fused {name}"] = (
                statistics.median(t[0] for t in timed) / gb,
                statistics.median(t[1] for t in timed) / gb,
            )
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(
        f"machine: {platform.machine()}, {torch.get_num_threads()} torch threads, torch "
        f"{torch.__version__}, device {args.device}"
    )
    print(
        f"{len(data)} tensors of {ROWS}x{COLS} bf16, {args.models} models, {gb:.2f} GB of "
        f"bf16 task vectors ({args.deltas} deltas), median of {args.repeats}"
    )
    print("\n| kernel | s per GB of bf16 task vector | CPU s per GB |\n|---|---|---|")
    for name, seconds in results.items():
        print(f"| {name} | {seconds:.2f} | |")
    for name, (seconds, cpu) in fused_rows.items():
        print(f"| {name} | {seconds:.3f} | {cpu:.3f} |")
    if "fused ties" in fused_rows:
        ratio = fused_rows["fused ties"][1] / fused_rows["fused linear"][1]
        print(f"\nfused ties ÷ fused linear, CPU time: {ratio:.2f}")
        for name in ("dare_linear", "dare_ties"):
            ratio = fused_rows[f"fused {name}"][1] / fused_rows["fused linear"][1]
            print(f"fused {name} ÷ fused linear, CPU time: {ratio:.2f}")
    print(f"\npeak RSS of the process: {rss / 1e9:.2f} GB")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(
                {
                    "gb": gb,
                    "deltas": args.deltas,
                    "s_per_gb": results,
                    "fused_wall_cpu_s_per_gb": fused_rows,
                    "peak_rss_bytes": rss,
                },
                handle,
                indent=2,
            )


if __name__ == "__main__":
    main()
