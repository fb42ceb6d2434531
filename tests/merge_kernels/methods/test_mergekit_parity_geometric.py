"""Per-tensor parity of the geometric and selection methods with mergekit 0.1.5 itself.

Each method's tensor function is compared with mergekit's own merge method, called directly
on float32 tensors through its ``TensorGroup`` interface (mergekit is installed for the
tests only). The largest relative L2 difference allowed is 1e-6 per tensor, under
``reference: mergekit`` and under tureen's own defaults (which agree for these methods).
"""

from __future__ import annotations

import importlib
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from merge_kernels.registry import get_method

SHAPES = [(33,), (17, 9), (4, 6, 5)]
TOLERANCE = 1e-6


def mergekit_merge(
    name: str,
    models: list[torch.Tensor],
    base: torch.Tensor | None = None,
    parameters: dict[str, Any] | None = None,
) -> torch.Tensor:
    """mergekit's ``name`` on one tensor group: the models, then the base (as mergekit
    appends a base that ``models`` does not list)."""
    from mergekit.merge_methods.base import TensorGroup

    method = getattr(importlib.import_module(f"mergekit.merge_methods.{name}"), _ENTRY[name])
    tensors = [*models, base] if base is not None else list(models)
    group = TensorGroup.from_tensors(tensors, base_index=len(models) if base is not None else None)
    (merged,) = method([group], parameters=parameters or {})
    return merged


_ENTRY = {
    "passthrough": "passthrough_merge_method",
    "nuslerp": "nuslerp_merge_method",
    "karcher": "karcher_merge_method",
    "multislerp": "multislerp",
    "nearswap": "nearswap_merge",
    "arcee_fusion": "arcee_fusion_merge_method",
}


def tureen_merge(
    name: str,
    models: list[torch.Tensor],
    base: torch.Tensor | None = None,
    params: dict[str, Any] | None = None,
    model_params: list[dict[str, Any]] | None = None,
    reference: Any = "mergekit",
) -> torch.Tensor:
    return get_method(name).merge_tensors(
        models, base=base, params=params, model_params=model_params, reference=reference
    )


def relative_l2(ours: torch.Tensor, theirs: torch.Tensor) -> float:
    assert ours.shape == theirs.shape and ours.dtype == theirs.dtype
    scale = float(torch.linalg.vector_norm(theirs.double()))
    difference = float(torch.linalg.vector_norm(ours.double() - theirs.double()))
    return difference / scale if scale > 0 else difference


def assert_parity(ours: torch.Tensor, theirs: torch.Tensor) -> None:
    """Within 1e-6 relative L2 of mergekit's finite result (exactly equal when that is 0)."""
    assert bool(torch.isfinite(theirs).all())
    if not bool(theirs.any()):
        assert torch.equal(ours, theirs)
    else:
        assert relative_l2(ours, theirs) <= TOLERANCE


def random(shape: tuple[int, ...], count: int, seed: int = 0, spread: float = 0.3) -> list[Any]:
    """A base and ``count`` models near it."""
    generator = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=generator)
    return [base, *(base + spread * torch.randn(shape, generator=generator) for _ in range(count))]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("scale", [None, 0.5, -2.0, 0.0])
def test_passthrough(shape: tuple[int, ...], scale: float | None) -> None:
    _, model = random(shape, 1)
    ours = tureen_merge("passthrough", [model], model_params=[{"scale": scale}])
    theirs = mergekit_merge("passthrough", [model], parameters={"scale": scale})
    assert_parity(ours, theirs)


def test_passthrough_returns_a_copy() -> None:
    model = torch.arange(6.0)
    out = tureen_merge("passthrough", [model])
    assert torch.equal(out, model) and out.data_ptr() != model.data_ptr()


NUSLERP_MODES = [
    {},
    {"nuslerp_flatten": False},
    {"nuslerp_flatten": False, "nuslerp_row_wise": True},
    {"nuslerp_row_wise": True},
]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("mode", NUSLERP_MODES)
@pytest.mark.parametrize("with_base", [False, True])
def test_nuslerp(shape: tuple[int, ...], mode: dict[str, bool], with_base: bool) -> None:
    base, first, second = random(shape, 2)
    base = base if with_base else None
    # t = 3/4, 0, 1, 1/2 (weights summing to 0) and 3/2 (extrapolation)
    for weights in ((1.0, 3.0), (2.0, 0.0), (0.0, 1.0), (1.0, -1.0), (-1.0, 3.0)):
        per_model = [{"weight": w} for w in weights]
        ours = tureen_merge("nuslerp", [first, second], base, mode, per_model)
        theirs = mergekit_merge("nuslerp", [first, second], base, {"weight": list(weights), **mode})
        assert_parity(ours, theirs)
        defaults = tureen_merge("nuslerp", [first, second], base, mode, per_model, "peft")
        assert torch.equal(defaults, ours)


@pytest.mark.parametrize("mode", NUSLERP_MODES)
@pytest.mark.parametrize(
    "pair",
    ["parallel", "antiparallel", "identical", "first_zero", "both_zero", "row_zero"],
)
def test_nuslerp_edge_cases(mode: dict[str, bool], pair: str) -> None:
    _, v = random((6, 4), 1)
    w = {
        "parallel": 2.5 * v,
        "antiparallel": -v,
        "identical": v.clone(),
        "first_zero": v,
        "both_zero": torch.zeros_like(v),
        "row_zero": v * torch.tensor([0.0, 1, 1, 1, 1, 1]).view(-1, 1),
    }[pair]
    v = torch.zeros_like(v) if pair in ("first_zero", "both_zero") else v
    for weights in ((1.0, 1.0), (1.0, 3.0)):
        ours = tureen_merge("nuslerp", [v, w], None, mode, [{"weight": x} for x in weights])
        theirs = mergekit_merge("nuslerp", [v, w], None, {"weight": list(weights), **mode})
        assert_parity(ours, theirs)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("count", [1, 2, 3, 4])
def test_karcher(shape: tuple[int, ...], count: int) -> None:
    models = random(shape, count, spread=1.0)[1:]
    for options in ({}, {"max_iter": 2}, {"tol": 1e-3}, {"max_iter": 0}):
        ours = tureen_merge("karcher", models, params=options)
        theirs = mergekit_merge("karcher", models, parameters=options)
        assert_parity(ours, theirs)


@pytest.mark.parametrize(
    "case", ["antiparallel", "identical", "one_zero", "all_zero", "tiny", "opposite_pair"]
)
def test_karcher_edge_cases(case: str) -> None:
    _, a, b = random((5, 7), 2, spread=1.0)
    models = {
        "antiparallel": [a, -a],
        "identical": [a, a.clone(), a.clone()],
        "one_zero": [a, torch.zeros_like(a), b],
        "all_zero": [torch.zeros_like(a), torch.zeros_like(a)],
        "tiny": [a * 1e-7, b],
        "opposite_pair": [a, -a, b],
    }[case]
    ours = tureen_merge("karcher", models)
    theirs = mergekit_merge("karcher", models)
    assert_parity(ours, theirs)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("count", [1, 2, 3, 4])
@pytest.mark.parametrize("with_base", [False, True])
def test_multislerp(shape: tuple[int, ...], count: int, with_base: bool) -> None:
    base, *models = random(shape, count)
    base = base if with_base else None
    for options in ({}, {"normalize_weights": False}, {"eps": 1e-4}):
        weights = [0.5, 2.0, 1.0, 0.25][:count]
        if options.get("normalize_weights") is False:
            weights = [w / sum(weights) for w in weights]
        per_model = [{"weight": w} for w in weights]
        ours = tureen_merge("multislerp", models, base, options, per_model)
        theirs = mergekit_merge("multislerp", models, base, {"weight": weights, **options})
        assert_parity(ours, theirs)


@pytest.mark.parametrize("with_base", [False, True])
def test_multislerp_antipodal_pair_falls_back_to_linear(with_base: bool) -> None:
    base, a = (torch.round(x * 64) / 64 for x in random((3, 8), 1))
    # Multiples of 1/64: the task vectors are exactly opposite in float32.
    models = [base + (a - base), base - (a - base)] if with_base else [a, -a]
    weights = [1.0, 1.0]
    ours = tureen_merge(
        "multislerp", models, base if with_base else None, None, [{"weight": w} for w in weights]
    )
    theirs = mergekit_merge("multislerp", models, base if with_base else None, {"weight": weights})
    assert_parity(ours, theirs)


def test_multislerp_refuses_directions_that_cancel_like_mergekit() -> None:
    _, a, b = random((3, 8), 2)
    models = [a, -a, b, -b]
    weights = [1.0] * 4
    with pytest.raises(ValueError, match="weighted sum of the input tensors is zero"):
        mergekit_merge("multislerp", models, None, {"weight": weights})
    with pytest.raises(ValueError, match="cancel out"):
        tureen_merge("multislerp", models, None, None, [{"weight": w} for w in weights])


def test_multislerp_of_zero_task_vectors_is_the_base() -> None:
    # A tensor no model changed: mergekit refuses three zero task vectors as "cancelling";
    # tureen gives the base, as mergekit itself does for two.
    base, _ = random((4, 4), 1)
    two = [base.clone(), base.clone()]
    ours = tureen_merge("multislerp", two, base, None, [{"weight": 1.0}] * 2)
    assert torch.equal(ours, mergekit_merge("multislerp", two, base, {"weight": [1.0, 1.0]}))
    three = [base.clone() for _ in range(3)]
    assert torch.equal(tureen_merge("multislerp", three, base, None, [{"weight": 1.0}] * 3), base)


def test_multislerp_weights_summing_to_zero_are_refused() -> None:
    _, a, b = random((4,), 2)
    with pytest.raises(ValueError, match="normalize_weights"):
        tureen_merge("multislerp", [a, b], None, None, [{"weight": 1.0}, {"weight": -1.0}])


@pytest.mark.parametrize("shape", SHAPES)
def test_nearswap(shape: tuple[int, ...]) -> None:
    base, model = random(shape, 1)
    model = torch.where(torch.arange(model.numel()).view(shape) % 3 == 0, base, model)
    for t in (0.0, 1e-4, 0.05, 0.3, 10.0, -1.0):
        ours = tureen_merge("nearswap", [model], base, {"t": t})
        theirs = mergekit_merge("nearswap", [model], base, {"t": t})
        assert_parity(ours, theirs)


@pytest.mark.parametrize("shape", [*SHAPES, (1, 64), (300, 40)])
@pytest.mark.parametrize("case", ["random", "identical", "zero_base", "sparse_change"])
def test_arcee_fusion(shape: tuple[int, ...], case: str) -> None:
    base, model = random(shape, 1)
    if case == "identical":
        model = base.clone()
    elif case == "zero_base":
        base = torch.zeros_like(base)
    elif case == "sparse_change":
        model = torch.where(torch.arange(base.numel()).view(shape) % 5 == 0, model, base)
    ours = tureen_merge("arcee_fusion", [model], base)
    theirs = mergekit_merge("arcee_fusion", [model], base)
    assert_parity(ours, theirs)
    if case == "random":  # the fusion takes some changes and leaves others
        taken = ours != base
        assert bool(taken.any()) and not bool(taken.all())


finite = st.floats(-3, 3, allow_nan=False, allow_infinity=False, width=32)


def vectors(size: int) -> st.SearchStrategy[torch.Tensor]:
    return st.lists(finite, min_size=size, max_size=size).map(torch.tensor)


@settings(max_examples=40, deadline=None)
@given(
    model=vectors(6),
    base=vectors(6),
    weights=st.tuples(st.floats(0.1, 4), st.floats(0.1, 4)),
    flatten=st.booleans(),
    with_base=st.booleans(),
)
def test_nuslerp_of_identical_models_is_the_model(
    model: torch.Tensor,
    base: torch.Tensor,
    weights: tuple[float, float],
    flatten: bool,
    with_base: bool,
) -> None:
    model, base = model.view(2, 3), base.view(2, 3)
    out = tureen_merge(
        "nuslerp",
        [model, model.clone()],
        base if with_base else None,
        {"nuslerp_flatten": flatten},
        [{"weight": w} for w in weights],
    )
    assert torch.allclose(out, model, atol=1e-5)


@settings(max_examples=40, deadline=None)
@given(model=vectors(8), other=vectors(8), flatten=st.booleans())
def test_nuslerp_at_t_zero_and_one_gives_the_end_points(
    model: torch.Tensor, other: torch.Tensor, flatten: bool
) -> None:
    params = {"nuslerp_flatten": flatten}
    start = tureen_merge("nuslerp", [model, other], None, params, [{"weight": 1}, {"weight": 0}])
    end = tureen_merge("nuslerp", [model, other], None, params, [{"weight": 0}, {"weight": 1}])
    assert torch.allclose(start, model, atol=1e-5)
    assert torch.allclose(end, other, atol=1e-5)


@settings(max_examples=40, deadline=None)
@given(model=vectors(10), max_iter=st.integers(0, 20))
def test_karcher_of_one_model_is_that_model(model: torch.Tensor, max_iter: int) -> None:
    out = tureen_merge("karcher", [model], params={"max_iter": max_iter})
    assert torch.equal(out, model)


@settings(max_examples=40, deadline=None)
@given(base=vectors(10), model=vectors(10))
def test_nearswap_with_a_large_t_is_the_other_model(
    base: torch.Tensor, model: torch.Tensor
) -> None:
    t = float((base - model).abs().max()) + 1.0
    out = tureen_merge("nearswap", [model], base, {"t": t})
    assert torch.allclose(out, model, atol=1e-6)
