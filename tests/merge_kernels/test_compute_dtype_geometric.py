"""``compute_dtype: dtype`` for the geometric and selection methods: mergekit 0.1.5, bit for bit.

Each method's arithmetic in the dtype (``merge_in_dtype``) is compared with mergekit's own
merge method, called on the same bfloat16 or float16 tensors through its ``TensorGroup``
interface (mergekit is installed for the tests only): same values, same result dtype.
The Karcher mean's shortcut out of cycles is checked against mergekit's full float32 loop,
and tureen's float32 Karcher kernel is checked to stop once it no longer progresses.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

import pytest
import torch

from merge_kernels.methods import karcher as karcher_module
from merge_kernels.methods.arcee_fusion import importance_scores
from merge_kernels.methods.compute_dtype import merge_in_dtype
from merge_kernels.methods.karcher import karcher_mean
from merge_kernels.methods.kernel import MergeInputs, TensorContext
from merge_kernels.registry import get_method

pytest.importorskip("mergekit", reason="mergekit 0.1.5 is the oracle (the test extra)")

DTYPES = [torch.bfloat16, torch.float16]
SHAPES = [(33,), (17, 9), (4, 6, 5)]
_ENTRY = {
    "model_stock": ("model_stock", "model_stock_merge_method"),
    "ram": ("ram", "ram_merge"),
    "ramplus_tl": ("ram", "ramplus_tl_merge"),
    "nuslerp": ("nuslerp", "nuslerp_merge_method"),
    "karcher": ("karcher", "karcher_merge_method"),
    "multislerp": ("multislerp", "multislerp"),
    "nearswap": ("nearswap", "nearswap_merge"),
    "arcee_fusion": ("arcee_fusion", "arcee_fusion_merge_method"),
}


def mergekit_merge(
    name: str,
    models: list[torch.Tensor],
    base: torch.Tensor | None = None,
    parameters: dict[str, Any] | None = None,
) -> torch.Tensor:
    """mergekit's ``name`` on one tensor group, in the group's own dtype."""
    from mergekit.merge_methods.base import TensorGroup  # type: ignore[import-untyped]

    module, entry = _ENTRY[name]
    method = getattr(importlib.import_module(f"mergekit.merge_methods.{module}"), entry)
    tensors = [*models, base] if base is not None else list(models)
    group = TensorGroup.from_tensors(tensors, base_index=len(models) if base is not None else None)
    (merged,) = method([group], parameters=parameters or {})
    assert isinstance(merged, torch.Tensor)
    return merged


def tureen_merge(
    name: str,
    models: list[torch.Tensor],
    base: torch.Tensor | None = None,
    params: dict[str, Any] | None = None,
    model_params: list[dict[str, Any]] | None = None,
) -> torch.Tensor:
    """tureen's ``compute_dtype: dtype`` arithmetic, with mergekit's defaults."""
    spec = get_method(name)
    defaults = spec.defaults("mergekit")
    method = spec.params.model_validate(
        {k: v for k, v in defaults.items() if k in spec.method_param_names()} | (params or {})
    )
    per_model = [
        spec.model_params.model_validate(
            {k: v for k, v in defaults.items() if k in spec.model_param_names()} | given
        )
        for given in (model_params or [{}] * len(models))
    ]
    inputs = MergeInputs(base, models, per_model)
    context = TensorContext(name="model.layers.0.mlp.up_proj.weight", seed=5)
    return merge_in_dtype(name, spec.kernel, inputs, method, context)


def assert_same(ours: torch.Tensor, theirs: torch.Tensor) -> None:
    """Bit for bit: same dtype, same shape, same values (NaN-free)."""
    assert ours.dtype == theirs.dtype and ours.shape == theirs.shape
    assert bool(torch.isfinite(theirs).all())
    difference = (ours.double() - theirs.double()).abs().max()
    assert torch.equal(ours, theirs), f"max difference {float(difference):.3g}"


def near(
    shape: tuple[int, ...], count: int, dtype: torch.dtype, *, seed: int = 0, spread: float = 0.3
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """A base and ``count`` models near it, rounded to ``dtype``."""
    generator = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=generator)
    models = [base + spread * torch.randn(shape, generator=generator) for _ in range(count)]
    return base.to(dtype), [model.to(dtype) for model in models]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("count", [2, 3, 4])
def test_model_stock(dtype: torch.dtype, shape: tuple[int, ...], count: int) -> None:
    base, models = near(shape, count, dtype, seed=count)
    for options in ({}, {"filter_wise": True}):
        ours = tureen_merge("model_stock", models, base, options)
        assert_same(ours, mergekit_merge("model_stock", models, base, options))


@pytest.mark.parametrize("dtype", DTYPES)
def test_model_stock_opposite_offsets_keep_the_base(dtype: torch.dtype) -> None:
    base, (model,) = near((6, 5), 1, dtype)
    models = [model, base - (model - base)]  # cos θ = −1: 1 + (k − 1)·cos θ = 0
    for options in ({}, {"filter_wise": True}):
        ours = tureen_merge("model_stock", models, base, options)
        assert_same(ours, mergekit_merge("model_stock", models, base, options))


def sparse_changes(
    shape: tuple[int, ...], count: int, dtype: torch.dtype, seed: int
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """A base and models that each change about half of its entries, so that entries are
    changed by none, one or several models."""
    generator = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=generator)
    models = []
    for _ in range(count):
        changed = torch.rand(shape, generator=generator) < 0.5
        delta = 0.05 * torch.randn(shape, generator=generator)
        models.append(base + delta * changed)
    return base.to(dtype), [model.to(dtype) for model in models]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("count", [1, 2, 3])
def test_ram_and_ramplus(dtype: torch.dtype, shape: tuple[int, ...], count: int) -> None:
    base, models = sparse_changes(shape, count, dtype, seed=count)
    for epsilon in (1e-5, 0.02):
        options = {"epsilon": epsilon}
        assert_same(
            tureen_merge("ram", models, base, options),
            mergekit_merge("ram", models, base, options),
        )
        for extra in ({}, {"r": 0.5, "alpha": 0.8}):
            plus = options | extra
            ours = tureen_merge("ramplus_tl", models, base, plus)
            theirs = mergekit_merge("ramplus_tl", models, base, plus)
            assert theirs.dtype == torch.float32  # λᵢ is float32 in mergekit
            assert_same(ours, theirs)


NUSLERP_MODES = [
    {},
    {"nuslerp_flatten": False},
    {"nuslerp_flatten": False, "nuslerp_row_wise": True},
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("with_base", [False, True])
def test_nuslerp(dtype: torch.dtype, shape: tuple[int, ...], with_base: bool) -> None:
    base, (first, second) = near(shape, 2, dtype)
    given = base if with_base else None
    for mode in NUSLERP_MODES:
        for weights in ((1.0, 3.0), (0.3, 0.7), (1.0, -1.0), (-1.0, 3.0)):
            per_model = [{"weight": w} for w in weights]
            ours = tureen_merge("nuslerp", [first, second], given, mode, per_model)
            parameters = {"weight": list(weights), **mode}
            assert_same(ours, mergekit_merge("nuslerp", [first, second], given, parameters))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("count", [1, 2, 3])
def test_karcher(dtype: torch.dtype, shape: tuple[int, ...], count: int) -> None:
    _, models = near(shape, count, dtype, spread=1.0, seed=count)
    for options in ({}, {"max_iter": 2}, {"tol": 1e-9, "max_iter": 60}, {"max_iter": 0}):
        ours = tureen_merge("karcher", models, params=options)
        assert_same(ours, mergekit_merge("karcher", models, parameters=options))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", ["one_zero", "all_zero", "antiparallel", "identical"])
def test_karcher_edge_cases(dtype: torch.dtype, case: str) -> None:
    _, (a, b) = near((5, 7), 2, dtype, spread=1.0)
    zero = torch.zeros_like(a)
    models = {
        "one_zero": [a, zero, b],
        "all_zero": [zero, zero.clone()],
        "antiparallel": [a, -a],
        "identical": [a, a.clone(), b],
    }[case]
    assert_same(tureen_merge("karcher", models), mergekit_merge("karcher", models))


def count_steps(monkeypatch: pytest.MonkeyPatch) -> Callable[[], int]:
    """Count the angles the Karcher loops take (one per model and step)."""
    calls = [0]
    arccos = torch.arccos

    def counting(x: torch.Tensor) -> torch.Tensor:
        calls[0] += 1
        return arccos(x)

    monkeypatch.setattr(torch, "arccos", counting)
    return lambda: calls[0]


# float32 inputs whose iterates at tol 1e-9 enter an exact cycle within 10 steps, of period
# 1, 2, 3 and 4 (found by running mergekit's loop on them)
CYCLES = [((64,), 2), ((64,), 0), ((100,), 3), ((100,), 0)]


@pytest.mark.parametrize(("shape", "seed"), CYCLES)
def test_karcher_cycle_shortcut_ends_where_mergekit_does(
    shape: tuple[int, ...], seed: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Every remainder of the iterations left modulo the period must end where mergekit does.
    _, models = near(shape, 2, torch.float32, spread=0.05, seed=seed)
    for max_iter in (97, 98, 99, 100):
        options = {"tol": 1e-9, "max_iter": max_iter}
        theirs = mergekit_merge("karcher", models, parameters=options)
        steps = count_steps(monkeypatch)
        ours = tureen_merge("karcher", models, params=options)
        assert steps() < 2 * 40  # out of the loop early: 100 steps take 200 angles
        assert_same(ours, theirs)
        monkeypatch.undo()


def test_float32_karcher_stops_when_it_no_longer_progresses(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # tol 1e-9 is below float32's rounding floor: mergekit would run every iteration.
    _, models = near((96, 64), 3, torch.float32, spread=0.05, seed=4)
    alphas = [1 / 3] * 3
    exact = karcher_module.karcher_mean(
        [m.double() for m in models], alphas, max_iter=200, tol=1e-12
    )
    steps = count_steps(monkeypatch)
    ours = karcher_mean(models, alphas, max_iter=10**7, tol=1e-9)
    assert steps() < 3 * 50
    monkeypatch.undo()
    relative = (ours.double() - exact).norm() / exact.norm()
    assert float(relative) < 1e-6
    theirs = mergekit_merge("karcher", models, parameters={"tol": 1e-9, "max_iter": 300})
    assert float((ours.double() - theirs.double()).norm() / theirs.double().norm()) < 1e-6


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("count", [1, 2, 3])
@pytest.mark.parametrize("with_base", [False, True])
def test_multislerp(
    dtype: torch.dtype, shape: tuple[int, ...], count: int, with_base: bool
) -> None:
    base, models = near(shape, count, dtype, seed=count)
    given = base if with_base else None
    weights = [0.5, 2.0, 1.0][:count]
    per_model = [{"weight": w} for w in weights]
    for options in ({}, {"normalize_weights": False}, {"eps": 1e-4}):
        ours = tureen_merge("multislerp", models, given, options, per_model)
        theirs = mergekit_merge("multislerp", models, given, {"weight": weights, **options})
        assert_same(ours, theirs)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_nearswap(dtype: torch.dtype, shape: tuple[int, ...]) -> None:
    base, models = near(shape, 1, dtype, spread=0.01)
    for t in (0.0001, 0.005, 0.02, 1.0, -0.5):
        options = {"t": t}
        ours = tureen_merge("nearswap", models, base, options)
        assert_same(ours, mergekit_merge("nearswap", models, base, options))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [*SHAPES, (64, 48)])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_arcee_fusion(dtype: torch.dtype, shape: tuple[int, ...], seed: int) -> None:
    base, models = near(shape, 1, dtype, seed=seed)
    ours = tureen_merge("arcee_fusion", models, base)
    theirs = mergekit_merge("arcee_fusion", models, base)
    assert theirs.dtype == torch.float32  # the mask is float32 in mergekit
    assert bool((ours != base.float()).any())  # some entries take the other model's value
    assert_same(ours, theirs)


def test_arcee_fusion_scores_are_mergekit_s_in_any_dtype() -> None:
    from mergekit.merge_methods.arcee_fusion import (  # type: ignore[import-untyped]
        _compute_importance,
    )

    for dtype in (torch.float32, *DTYPES):
        base, (model,) = near((12, 40), 1, dtype, seed=7)
        assert_same(importance_scores(model, base), _compute_importance(model, base))
