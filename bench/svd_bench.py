"""CPU seconds per GB for the spectral and optimised merges, exact SVD against randomized.

    python bench/svd_bench.py [--rows 1024] [--cols 1024] [--models 4] [--tensors 1]
                              [--repeats 3] [--wudi-iters 400] [--methods tsv_merge ...]

Times the kernels of TSV-M, ISO-C, ISO-CTS and WUDI (float32 conversion, kernel, cast to
bf16, as ``bench/kernel_bench.py``) on ``--tensors`` bf16 weight matrices of ``--models``
fine-tunes, each task vector with a decaying spectrum (singular values 0.98^k over random
singular vectors, norm a tenth of the base's) as fine-tunes' task vectors have, and prints
wall and CPU seconds per GB of bf16 task vectors (medians over repeats). TSV-M and ISO-CTS
also run with ``svd: randomized``, with the relative difference of the merged task vector
from the exact one. ISO-C needs every singular value and WUDI no SVD: exact only.

The kernels run their linear algebra on one thread (``single_thread_linalg``), so the
figures are per core; an SVD's cost grows as m·n·min(m, n), so seconds per GB grow with
the matrix's size: compare rows of one shape.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from collections.abc import Callable
from typing import Any

# isort: off
import merge_kernels  # noqa: F401  (before torch: sets the threading and allocation environment)
import torch

# isort: on
from merge_kernels.methods.kernel import MergeInputs, TensorContext
from merge_kernels.registry import get_method

DECAY = 0.98
VARIANTS: dict[str, tuple[str, ...]] = {
    "tsv_merge": ("exact", "randomized"),
    "iso_c": ("exact",),
    "iso_cts": ("exact", "randomized"),
    "wudi": ("exact",),
}


def _cpu_s() -> float:
    return time.process_time()


def _decaying(rows: int, cols: int, generator: torch.Generator) -> torch.Tensor:
    left, _ = torch.linalg.qr(torch.randn(rows, min(rows, cols), generator=generator))
    right, _ = torch.linalg.qr(torch.randn(cols, min(rows, cols), generator=generator))
    values = DECAY ** torch.arange(min(rows, cols), dtype=torch.float32)
    return (left * values) @ right.T


def _tensors(
    rows: int, cols: int, models: int, count: int
) -> list[tuple[torch.Tensor, list[torch.Tensor]]]:
    generator = torch.Generator().manual_seed(0)
    data = []
    for _ in range(count):
        base = torch.randn(rows, cols, generator=generator) * 0.02
        tuned = []
        for _ in range(models):
            tau = _decaying(rows, cols, generator)
            # A task vector a tenth of the base's norm, well above bf16's rounding of it.
            tuned.append(base + tau * (0.1 * base.norm() / tau.norm()))
        data.append((base.bfloat16(), [t.bfloat16() for t in tuned]))
    return data


def _merge(
    name: str, values: dict[str, Any], data: list[tuple[torch.Tensor, list[torch.Tensor]]]
) -> Callable[[], list[torch.Tensor]]:
    spec = get_method(name)
    params = spec.params.model_validate(values)
    model_params = [spec.model_params.model_validate({}) for _ in data[0][1]]

    def run() -> list[torch.Tensor]:
        out = []
        for index, (base, tuned) in enumerate(data):
            inputs = MergeInputs(
                base=base.float(), models=[t.float() for t in tuned], model_params=model_params
            )
            merged = spec.kernel(inputs, params, TensorContext(name=f"t{index}", seed=0))
            out.append(merged.to(torch.bfloat16))
        return out

    return run


def _measure(run: Callable[[], list[torch.Tensor]], repeats: int) -> tuple[float, float]:
    walls, cpus = [], []
    for _ in range(repeats):
        cpu, start = _cpu_s(), time.perf_counter()
        run()
        walls.append(time.perf_counter() - start)
        cpus.append(_cpu_s() - cpu)
    return statistics.median(walls), statistics.median(cpus)


def _difference(
    got: list[torch.Tensor], exact: list[torch.Tensor], data: list[tuple[torch.Tensor, Any]]
) -> float:
    worst = 0.0
    for merged, reference, (base, _) in zip(got, exact, data, strict=True):
        delta, expected = merged.float() - base.float(), reference.float() - base.float()
        worst = max(worst, float((delta - expected).norm() / expected.norm()))
    return worst


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=1024)
    parser.add_argument("--cols", type=int, default=1024)
    parser.add_argument("--models", type=int, default=4)
    parser.add_argument("--tensors", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--wudi-iters", type=int, default=400)
    parser.add_argument("--methods", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    args = parser.parse_args()
    data = _tensors(args.rows, args.cols, args.models, args.tensors)
    gb = args.tensors * args.rows * args.cols * 2 * args.models / 1e9
    print(
        f"machine: {platform.machine()}, torch {torch.__version__}; {args.tensors} x "
        f"{args.rows} x {args.cols} bf16, {args.models} fine-tunes ({gb:.4f} GB of task "
        f"vectors), median of {args.repeats}; wudi iter_num {args.wudi_iters}"
    )
    print(
        "\n| method | svd | s / GB | CPU s / GB | rel. difference from exact |"
        "\n|---|---|---|---|---|"
    )
    for name in args.methods:
        base_values = {"iter_num": args.wudi_iters} if name == "wudi" else {}
        exact: list[torch.Tensor] = []
        for svd in VARIANTS[name]:
            values = base_values | ({"svd": svd} if name in ("tsv_merge", "iso_cts") else {})
            run = _merge(name, values, data)
            result = run()  # warm-up, and the result to compare
            wall, cpu = _measure(run, args.repeats)
            if svd == "exact":
                exact = result
                difference = "—"
            else:
                difference = f"{_difference(result, exact, data):.1e}"
            print(f"| {name} | {svd} | {wall / gb:.1f} | {cpu / gb:.1f} | {difference} |")


if __name__ == "__main__":
    main()
