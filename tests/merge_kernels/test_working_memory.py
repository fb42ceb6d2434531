"""The plan's peak-memory estimate counts what spectral and optimised merges really hold."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from merge_kernels.plan import PROCESS_BASELINE_BYTES, MergePlan, TensorPlan
from merge_kernels.recipe import parse_recipe
from merge_kernels.tensor_parameters import TensorParameters

ROOT = Path(__file__).resolve().parents[2]
PARAMS = {"wudi": {"iter_num": 2}}


def plan_for(
    method: str, shape: tuple[int, ...], models: int = 3, rows_per_chunk: int | None = None
) -> MergePlan:
    """A plan of one bfloat16 tensor of ``shape``, its parameters resolved as the recipe's."""
    recipe = parse_recipe(
        {
            "merge_method": method,
            "base_model": "base",
            "models": [{"model": f"ft{i}"} for i in range(models)],
            "parameters": PARAMS.get(method, {}),
        }
    )
    spec = recipe.method
    defaults = spec.defaults(recipe.reference)
    method_values = {k: v for k, v in defaults.items() if k in spec.method_param_names()}
    model_values = {k: v for k, v in defaults.items() if k in spec.model_param_names()}
    params = TensorParameters(
        method=spec.params.model_validate(method_values | PARAMS.get(method, {})),
        models=tuple(spec.model_params.model_validate(model_values) for _ in range(models)),
    )
    tensor = TensorPlan(
        name="model.layers.0.mlp.up_proj.weight",
        shape=shape,
        dtype="BF16",
        sources=("model.layers.0.mlp.up_proj.weight",) * (models + 1),
        params=params,
        rows_per_chunk=rows_per_chunk,
        inputs=tuple(range(models + 1)),
        has_base=True,
    )
    return MergePlan(recipe=recipe, inputs=[], tensors=[tensor])


def per_tensor(plan: MergePlan) -> int:
    """The working set of the plan's one tensor (the estimate doubles it for read-ahead)."""
    return (plan.peak_memory_estimate() - PROCESS_BASELINE_BYTES) // 2


def test_a_spectral_merge_of_a_4096_square_matrix_needs_more_than_linear() -> None:
    shape = (4096, 4096)
    linear = per_tensor(plan_for("linear", shape))
    task_arithmetic = per_tensor(plan_for("task_arithmetic", shape))
    assert task_arithmetic == linear  # no declaration: the elementwise rule
    float32 = 4 * 4096 * 4096
    for method in ("tsv_merge", "iso_c", "iso_cts", "wudi"):
        spectral = per_tensor(plan_for(method, shape))
        # At least the three task vectors, one SVD's U, Vᵀ and LAPACK's copy beyond linear.
        assert spectral >= linear + 3 * float32, method
    # WUDI holds T products of m × m and their gradients.
    assert per_tensor(plan_for("wudi", shape)) >= 6 * 3 * float32
    # A vector is not decomposed: the declaration falls back to a few copies.
    assert per_tensor(plan_for("tsv_merge", (4096,))) < 100 * 4096


def test_a_chunked_tensor_declares_one_chunk() -> None:
    # Consensus merging without a trim is elementwise, so a large tensor merges in row chunks.
    whole = per_tensor(plan_for("consensus", (4096, 4096)))
    chunked = per_tensor(plan_for("consensus", (4096, 4096), rows_per_chunk=256))
    assert chunked * 16 == whole


METHODS = ("tsv_merge", "iso_c", "iso_cts", "wudi", "consensus")
SHAPES = ((384, 384), (512, 192), (192, 512))

# In a fresh process whose large allocations glibc maps and unmaps at once (so the resident
# set follows what is alive, not what malloc keeps for later), reset the peak resident set
# before each merge and report how far it rose above the resident set before it.
_MEASURE = """
import json, sys, torch
from merge_kernels.registry import get_method

def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(key)

results = {}
for name, rows, cols, params in json.loads(sys.argv[1]):
    spec = get_method(name)
    g = torch.Generator().manual_seed(0)
    base = torch.randn(rows, cols, generator=g, dtype=torch.bfloat16)
    models = [base + torch.randn(rows, cols, generator=g, dtype=torch.bfloat16) for _ in range(3)]
    spec.merge_tensors([m[:8, :8] for m in models], base=base[:8, :8], params=params)
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")
    before = status("VmRSS")
    merged = spec.merge_tensors(models, base=base, params=params)
    results[f"{name} {rows}x{cols}"] = status("VmHWM") - before
    del merged, models, base
print(json.dumps(results))
"""


@pytest.fixture(scope="module")
def measured_peaks() -> dict[str, int]:
    cases = [
        [method, rows, cols, PARAMS.get(method, {})] for method in METHODS for rows, cols in SHAPES
    ]
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "OMP_NUM_THREADS": "1",
        "MALLOC_MMAP_THRESHOLD_": "65536",
    }
    result = subprocess.run(
        [sys.executable, "-c", _MEASURE, json.dumps(cases)],
        capture_output=True,
        text=True,
        check=True,
        cwd=ROOT,
        env=env,
    )
    peaks: dict[str, int] = json.loads(result.stdout.splitlines()[-1])
    return peaks


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("shape", SHAPES)
def test_the_estimate_bounds_the_measured_peak(
    measured_peaks: dict[str, int], method: str, shape: tuple[int, int]
) -> None:
    measured = measured_peaks[f"{method} {shape[0]}x{shape[1]}"]
    estimate = per_tensor(plan_for(method, shape))
    # Three bfloat16 inputs and the base alone take 8 bytes per element; an SVD far more.
    assert measured > 4 * 2 * shape[0] * shape[1]
    assert measured <= estimate, (measured, estimate)
    assert estimate <= 3 * measured, (measured, estimate)  # and not far above it
