"""CPU seconds per GB for DARE's keyed keep masks, the C loop against the torch int32 lanes.

    python bench/dare_mask_bench.py [--gb 0.5] [--models 3] [--repeats 3]

Times, on the torch lanes (``random_mask``'s fallback) and then on the fused C loop:

- ``mask``: :func:`~merge_kernels.methods.random_mask.keep_mask` alone, one mask per
  element of bf16 task vector (``--gb`` of it: ``gb·10⁹ / 2`` elements per pass);
- ``dare_ties`` and ``dare_linear``: the kernels on bf16 4096 x 4096 tensors of ``--models``
  fine-tunes (``--gb`` of task vectors in all), as ``bench/kernel_bench.py`` times them
  (float32 conversion, kernel, cast to bf16), at density 0.1;
- ``della``: the DELLA kernel likewise (ranks, keep probabilities, masks).

Prints wall and CPU seconds per GB (medians over repeats) and the torch ÷ C ratio of CPU
time. The masks are the same bits on both paths (tests/merge_kernels/test_random_mask_fused.py).
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
from bench.kernel_bench import COLS, ROWS, _cpu_s, _tensors
from merge_kernels import fused
from merge_kernels.methods import random_mask
from merge_kernels.methods.kernel import MergeInputs, TensorContext
from merge_kernels.registry import get_method

KERNELS: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    "dare_ties": ({}, {"weight": 1.0, "density": 0.1}),
    "dare_linear": ({}, {"weight": 1.0, "density": 0.1}),
    "della": ({}, {"weight": 1.0, "density": 0.1, "epsilon": 0.05}),
}


def _measure(run: Callable[[], None], repeats: int) -> tuple[float, float]:
    run()  # warm-up
    walls, cpus = [], []
    for _ in range(repeats):
        cpu, start = _cpu_s(), time.perf_counter()
        run()
        walls.append(time.perf_counter() - start)
        cpus.append(_cpu_s() - cpu)
    return statistics.median(walls), statistics.median(cpus)


def _mask_run(numel: int) -> Callable[[], None]:
    key = random_mask.dare_key(0, 1, "model.layers.0.mlp.down_proj.weight")
    chunk = ROWS * COLS  # one tensor's mask at a time, as a merge draws them

    def run() -> None:
        for offset in range(0, numel, chunk):
            random_mask.keep_mask(key, 0.1, min(chunk, numel - offset), offset=offset)

    return run


def _kernel_run(
    name: str, data: list[tuple[torch.Tensor, list[torch.Tensor]]]
) -> Callable[[], None]:
    spec = get_method(name)
    method_values, model_values = KERNELS[name]
    params = spec.params.model_validate(method_values)
    model_params = [spec.model_params.model_validate(model_values) for _ in data[0][1]]

    def run() -> None:
        for index, (base, tuned) in enumerate(data):
            inputs = MergeInputs(
                base=base.float(), models=[t.float() for t in tuned], model_params=model_params
            )
            spec.kernel(inputs, params, TensorContext(name=f"t{index}", seed=0)).to(torch.bfloat16)

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gb", type=float, default=0.5, help="GB of bf16 task vectors")
    parser.add_argument("--models", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    if not fused.available():
        raise SystemExit("the C extension is not built")
    data = _tensors(args.gb, args.models, "cpu")
    gb = len(data) * ROWS * COLS * 2 * args.models / 1e9
    runs = {"mask": _mask_run(int(gb * 1e9 / 2))}
    runs.update({name: _kernel_run(name, data) for name in KERNELS})
    print(
        f"machine: {platform.machine()}, {torch.get_num_threads()} torch threads, torch "
        f"{torch.__version__}; {gb:.2f} GB of bf16 task vectors, median of {args.repeats}"
    )
    print(
        "\n| what | torch lanes: s / CPU s per GB | C loop: s / CPU s per GB "
        "| CPU time torch ÷ C |\n|---|---|---|---|"
    )
    for name, run in runs.items():
        random_mask._USE_EXTENSION = False
        torch_wall, torch_cpu = _measure(run, args.repeats)
        random_mask._USE_EXTENSION = True
        c_wall, c_cpu = _measure(run, args.repeats)
        print(
            f"| {name} | {torch_wall / gb:.2f} / {torch_cpu / gb:.2f} "
            f"| {c_wall / gb:.2f} / {c_cpu / gb:.2f} | {torch_cpu / c_cpu:.1f} |"
        )


if __name__ == "__main__":
    main()
