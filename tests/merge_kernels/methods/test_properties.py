"""Invariants of every registered merge method, checked with hypothesis."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import assume, given, reject, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from merge_kernels.methods.kernel import TensorContext
from merge_kernels.registry import MethodSpec, get_method, methods

# Parameters under which each method is valid; a new method must be added here.
VALID: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    "linear": ({}, {"weight": 1.0}),
    "task_arithmetic": ({}, {"weight": 1.0}),
    "ties": ({}, {"density": 0.5}),
    "dare_linear": ({}, {"density": 0.5}),
    "dare_ties": ({}, {"density": 0.5}),
    "slerp": ({"t": 0.3}, {}),
    "greedy_soup": ({}, {}),
    "iso_c": ({}, {}),
    "iso_cts": ({}, {}),
    "breadcrumbs": ({"outlier_rule": "fit_density"}, {"density": 0.5, "gamma": 0.1}),
    "breadcrumbs_ties": ({"outlier_rule": "fit_density"}, {"density": 0.5, "gamma": 0.1}),
    "della": ({}, {"density": 0.5}),
    "della_linear": ({}, {"density": 0.5}),
    "sce": ({}, {}),
    "model_stock": ({}, {}),
    "ram": ({}, {}),
    "ramplus_tl": ({}, {}),
    "passthrough": ({}, {}),
    "nuslerp": ({}, {"weight": 1.0}),
    "karcher": ({}, {}),
    "multislerp": ({}, {"weight": 1.0}),
    "nearswap": ({"t": 0.01}, {}),
    "arcee_fusion": ({}, {}),
    "tsv_merge": ({}, {"weight": 1.0}),
    "wudi": ({"iter_num": 5}, {}),
    "consensus": ({"use_ties": True}, {}),
}
ALL = sorted(spec.name for spec in methods())
SOUP_OF_ONE = [
    "linear",
    "task_arithmetic",
    "ties",
    "dare_linear",
    "dare_ties",
    "passthrough",
    "karcher",
    "multislerp",
    "breadcrumbs",
    "breadcrumbs_ties",
    "della",
    "della_linear",
    "sce",
    "ram",
    "ramplus_tl",
    "tsv_merge",
    "wudi",
]
# TSV-M keeps r/T singular components of each task, so T identical models merge to a
# truncation of their task vector, and where the stacked singular vectors are dependent
# (the small, often rank-deficient drawn tensors) the whitening is not unique; its order
# invariance on tasks in general position is tested in test_tsv.py.
LOW_RANK = {"tsv_merge"}
# mergekit's Karcher mean starts from the first direction when the directions cancel
# (a and -a), so its result depends on the models' order there.
# The isotropic merges' singular vectors are not unique where the summed task matrix is
# rank-deficient, so the rounding of a different summation order may pick others.
SPECTRAL = {"iso_c", "iso_cts"}
# Adam's step is about lr · sign(gradient): where a gradient is zero up to rounding, another
# summation order flips it, so WUDI's order invariance holds to lr · steps, tested with
# tasks in general position in test_wudi.py.
OPTIMISED = {"wudi"}
PERMUTABLE = [
    name
    for name in ALL
    if get_method(name).max_models != 1
    and name not in ("karcher", *LOW_RANK, *SPECTRAL, *OPTIMISED)
]
# Methods that refuse inputs whose weighted directions cancel out (mergekit's rule).
MAY_REFUSE = {"multislerp"}

shapes = st.lists(st.integers(1, 6), min_size=1, max_size=3).map(tuple)
finite = st.floats(-4, 4, allow_nan=False, allow_infinity=False, width=32)


def tensors(shape: tuple[int, ...], count: int) -> st.SearchStrategy[list[torch.Tensor]]:
    one = arrays(np.float32, shape, elements=finite).map(torch.from_numpy)
    return st.lists(one, min_size=count, max_size=count)


def run(
    spec: MethodSpec, models: list[torch.Tensor], base: torch.Tensor | None, **overrides: Any
) -> torch.Tensor:
    params, per_model = VALID[spec.name]
    model_params = overrides.pop("model_params", [per_model] * len(models))
    try:
        return spec.merge_tensors(
            models,
            base=base if spec.takes_base else None,
            params=params | overrides.pop("params", {}),
            model_params=model_params,
            context=overrides.pop("context", TensorContext(name="layers.0.w", seed=1)),
        )
    except ValueError as error:
        if spec.name in MAY_REFUSE and "cancel out" in str(error):
            reject()
        raise


def model_count(spec: MethodSpec, wanted: int) -> int:
    count = max(wanted, spec.min_models)
    return min(count, spec.max_models) if spec.max_models is not None else count


def test_every_registered_method_has_valid_parameters_here() -> None:
    assert set(ALL) == set(VALID)


@pytest.mark.parametrize("name", ALL)
@settings(max_examples=25, deadline=None)
@given(data=st.data(), shape=shapes, wanted=st.integers(1, 4))
def test_shape_and_dtype_are_kept(
    name: str, data: st.DataObject, shape: tuple[int, ...], wanted: int
) -> None:
    spec = get_method(name)
    count = model_count(spec, wanted)
    models = data.draw(tensors(shape, count))
    base = data.draw(tensors(shape, 1))[0]
    for dtype in (torch.float32, torch.bfloat16):
        cast = [m.to(dtype) for m in models]
        out = run(spec, cast, base.to(dtype) if spec.takes_base else None)
        assert out.shape == shape
        assert out.dtype == dtype
        assert bool(torch.isfinite(out).all())


@pytest.mark.parametrize("name", SOUP_OF_ONE)
@settings(max_examples=25, deadline=None)
@given(data=st.data(), shape=shapes)
def test_soup_of_one_model_is_that_model(
    name: str, data: st.DataObject, shape: tuple[int, ...]
) -> None:
    spec = get_method(name)
    model, base = data.draw(tensors(shape, 2))
    model_params = [{"density": 1.0}] if "density" in spec.model_param_names() else [{}]
    out = run(spec, [model], base, model_params=model_params)
    assert torch.allclose(out, model, atol=1e-5)


# The isotropic merges flatten the summed task matrix's spectrum, and WUDI and consensus
# merging start from the task vectors' sum: none is an average.
SUMMED = {"wudi", "consensus"}


@pytest.mark.parametrize("name", [name for name in ALL if name not in LOW_RANK | SPECTRAL | SUMMED])
@settings(max_examples=25, deadline=None)
@given(data=st.data(), shape=shapes, wanted=st.integers(2, 4))
def test_normalized_soup_of_identical_models_is_that_model(
    name: str, data: st.DataObject, shape: tuple[int, ...], wanted: int
) -> None:
    spec = get_method(name)
    count = model_count(spec, wanted)
    model, base = data.draw(tensors(shape, 2))
    if name == "model_stock":
        # Its cosine divides by max(|a|·|b|, 1e-6), as mergekit's does: identical task
        # vectors below 1e-3 in norm have a cosine under 1 there, by design.
        assume(bool((model - base).abs().min() >= 1e-2))
    _, per_model = VALID[name]
    if "density" in per_model:
        per_model = {"density": 1.0}
    extra = {"normalize": True} if "normalize" in spec.method_param_names() else {}
    if spec.needs_base and spec.max_models == 1:
        base = model  # slerp's (nearswap's, ...) two inputs are the base and the other model
    out = run(
        spec,
        [model.clone() for _ in range(count)],
        base,
        params=extra,
        model_params=[per_model] * count,
    )
    assert torch.allclose(out, model, atol=1e-5)


@settings(max_examples=40, deadline=None)
@given(data=st.data(), shape=shapes, count=st.integers(1, 4), lam=st.floats(0.1, 2.0))
def test_ties_on_identical_task_vectors_at_density_one(
    data: st.DataObject, shape: tuple[int, ...], count: int, lam: float
) -> None:
    tau, base = data.draw(tensors(shape, 2))
    weights = data.draw(st.lists(st.floats(0.1, 3.0), min_size=count, max_size=count))
    model = base + tau
    out = get_method("ties").merge_tensors(
        [model] * count,
        base=base,
        params={"lambda": lam},
        model_params=[{"weight": w, "density": 1.0} for w in weights],
    )
    seen = model - base  # the task vector as float32 arithmetic produces it
    counted = torch.where(seen != 0, float(count), 1.0)
    expected = base + lam * sum(weights) * seen / counted
    assert torch.allclose(out, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", PERMUTABLE)
@settings(max_examples=25, deadline=None)
@given(data=st.data(), shape=shapes, wanted=st.integers(2, 4))
def test_permuting_models_with_their_weights_changes_nothing(
    name: str, data: st.DataObject, shape: tuple[int, ...], wanted: int
) -> None:
    spec = get_method(name)
    count = model_count(spec, wanted)
    models = data.draw(tensors(shape, count))
    base = data.draw(tensors(shape, 1))[0]
    _, per_model = VALID[name]
    params = [dict(per_model) for _ in range(count)]
    if "weight" in spec.model_param_names():
        weights = data.draw(st.lists(st.floats(0.1, 3.0), min_size=count, max_size=count))
        for p, w in zip(params, weights, strict=True):
            p["weight"] = w
    order = data.draw(st.permutations(range(count)))
    indices = tuple(range(count))
    out = run(
        spec,
        models,
        base,
        model_params=params,
        context=TensorContext(name="w", seed=3, model_indices=indices),
    )
    permuted = run(
        spec,
        [models[i] for i in order],
        base,
        model_params=[params[i] for i in order],
        context=TensorContext(name="w", seed=3, model_indices=tuple(indices[i] for i in order)),
    )
    assert torch.allclose(out, permuted, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ALL)
@settings(max_examples=15, deadline=None)
@given(data=st.data(), shape=shapes, seed=st.integers(0, 2**31))
def test_a_fixed_seed_gives_identical_output(
    name: str, data: st.DataObject, shape: tuple[int, ...], seed: int
) -> None:
    spec = get_method(name)
    count = model_count(spec, 3)
    models = data.draw(tensors(shape, count))
    base = data.draw(tensors(shape, 1))[0]
    context = TensorContext(name="model.layers.1.mlp.up_proj.weight", seed=seed)
    first = run(spec, models, base, context=context)
    second = run(spec, [m.clone() for m in models], base.clone(), context=context)
    assert torch.equal(first, second)
