"""Seconds per GB of bf16 task vector for each merge kernel, in memory (no file IO).

    python bench/kernel_bench.py [--gb 1.0] [--models 3] [--repeats 3] [--device cpu]

Builds a bf16 base and ``--models`` fine-tunes of Llama-like 4096 x 4096 tensors totalling
``--gb`` of bf16 task vectors (over all models), then times each method's kernel on every
tensor: the float32 conversion of the inputs, the kernel, and the cast of the result back
to bf16 — what the streaming runner does between reading and writing. Prints the median
over repeats as seconds per GB of bf16 task vector, and the process's peak RSS.
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


def _tensors(gb: float, models: int, device: str) -> list[tuple[torch.Tensor, list[torch.Tensor]]]:
    per_tensor = ROWS * COLS * 2 * models  # bytes of bf16 task vector per tensor, all models
    count = max(1, round(gb * 1e9 / per_tensor))
    generator = torch.Generator().manual_seed(0)
    out = []
    for _ in range(count):
        base = (torch.randn(ROWS, COLS, generator=generator) * 0.02).to(torch.bfloat16)
        tuned = [
            (base.float() + 0.002 * torch.randn(ROWS, COLS, generator=generator)).to(torch.bfloat16)
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gb", type=float, default=1.0, help="GB of bf16 task vectors in all")
    parser.add_argument("--models", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    data = _tensors(args.gb, args.models, args.device)
    gb = len(data) * ROWS * COLS * 2 * args.models / 1e9
    results = {}
    for name in METHODS:
        _time(name, data[:1], args.device)  # warm-up
        times = [_time(name, data, args.device) for _ in range(args.repeats)]
        results[name] = statistics.median(times) / gb
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(
        f"machine: {platform.machine()}, {torch.get_num_threads()} torch threads, torch "
        f"{torch.__version__}, device {args.device}"
    )
    print(
        f"{len(data)} tensors of {ROWS}x{COLS} bf16, {args.models} models, {gb:.2f} GB of "
        f"bf16 task vectors, median of {args.repeats}"
    )
    print("\n| kernel | s per GB of bf16 task vector |\n|---|---|")
    for name, seconds in results.items():
        print(f"| {name} | {seconds:.2f} |")
    print(f"\npeak RSS of the process: {rss / 1e9:.2f} GB")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"gb": gb, "s_per_gb": results, "peak_rss_bytes": rss}, handle, indent=2)


if __name__ == "__main__":
    main()
