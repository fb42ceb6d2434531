"""DELLA, Model Breadcrumbs and SCE with ``compute_dtype: dtype`` against mergekit 0.1.5 itself.

mergekit's own kernels (``merge_group`` of its registered methods) run on the same bf16 and
fp16 tensors as tureen's :func:`merge_in_dtype`, with hypothesis drawing shapes, weights and
options. Two of mergekit's choices are not arithmetic and are fixed first, so the results
can be compared bit for bit:

- the order of tied magnitudes or variances, which mergekit's unstable sorts leave
  unspecified, is pinned to tureen's (``tests.mergekit_corpus.pinned_ties``);
- DELLA's keep decisions: mergekit draws them with ``torch.bernoulli`` from its keep
  probabilities; here that call records the probabilities (which must equal tureen's bit
  for bit) and returns tureen's keyed mask drawn from them, so everything after the draw is
  compared exactly too.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from types import ModuleType
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from merge_kernels.methods.compute_dtype import merge_in_dtype
from merge_kernels.methods.compute_dtype_sparse import (
    magprune_probabilities_in,
    magprune_work_dtype,
)
from merge_kernels.methods.kernel import MergeInputs, TensorContext
from merge_kernels.methods.random_mask import dare_key, keep_mask_with_probabilities
from merge_kernels.registry import MethodSpec, get_method
from tests.mergekit_corpus.pinned_ties import pinned_ties

pytest.importorskip("mergekit", reason="mergekit 0.1.5 is the oracle (the test extra)")

from mergekit.merge_methods.base import TensorEntry, TensorGroup  # type: ignore[import-untyped]
from mergekit.merge_methods.registry import get as mergekit_method  # type: ignore[import-untyped]

DTYPES = [torch.bfloat16, torch.float16]
NAME = "model.layers.0.mlp.up_proj.weight"
SEED = 5


@st.composite
def tensors(draw: st.DrawFn, count: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """A base and ``count`` fine-tunes near it (float32; each test rounds them)."""
    shape = draw(st.sampled_from([(4, 6), (3, 8), (12,), (2, 3, 4), (5, 2)]))
    seed = draw(st.integers(0, 2**16))
    generator = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=generator)
    scale = draw(st.sampled_from([0.02, 0.5]))
    models = [base + scale * torch.randn(shape, generator=generator) for _ in range(count)]
    return base, models


def _tureen_params(spec: MethodSpec, options: dict[str, Any]) -> Any:
    """The method's parameters as ``reference: mergekit`` resolves them, plus ``options``."""
    fields = {info.alias or name for name, info in spec.params.model_fields.items()}
    values = {**spec.references.get("mergekit", {}), **options}
    return spec.params.model_validate({k: v for k, v in values.items() if k in fields})


def _mergekit(
    method: str,
    base: torch.Tensor,
    models: list[torch.Tensor],
    params: dict[str, Any],
    patch: AbstractContextManager[None] | None = None,
) -> torch.Tensor:
    """mergekit's kernel on the tensors, its sorts pinned (or ``patch`` active instead)."""
    entries = [TensorEntry("base", base, is_base=True)]
    entries += [TensorEntry(index, model) for index, model in enumerate(models)]
    group = TensorGroup(tuple(entries))
    with patch if patch is not None else pinned_ties():
        result: torch.Tensor = mergekit_method(method).merge_group(group, **params)
    return result


def _tureen(
    method: str,
    base: torch.Tensor,
    models: list[torch.Tensor],
    options: dict[str, Any],
    per_model: list[dict[str, Any]],
) -> torch.Tensor:
    spec = get_method(method)
    inputs = MergeInputs(
        base, models, [spec.model_params.model_validate(values) for values in per_model]
    )
    params = _tureen_params(spec, options)
    return merge_in_dtype(method, spec.kernel, inputs, params, TensorContext(NAME, SEED))


def _assert_same_bits(ours: torch.Tensor, theirs: torch.Tensor) -> None:
    assert ours.dtype == theirs.dtype
    assert torch.equal(ours, theirs), (ours - theirs).abs().max()


def _per_input(values: list[float]) -> dict[int, float]:
    return dict(enumerate(values))


@settings(max_examples=25, deadline=None)
@given(
    method=st.sampled_from(["breadcrumbs", "breadcrumbs_ties"]),
    dtype=st.sampled_from(DTYPES),
    data=st.data(),
)
def test_breadcrumbs_in_the_dtype_equal_mergekit_bit_for_bit(
    method: str, dtype: torch.dtype, data: st.DataObject
) -> None:
    base, models = data.draw(tensors(data.draw(st.integers(1, 3))))
    base, models = base.to(dtype), [m.to(dtype) for m in models]
    weights = [data.draw(st.sampled_from([0.3, 0.5, 1.0, 1.7])) for _ in models]
    densities = [data.draw(st.sampled_from([0.5, 0.9, 1.0])) for _ in models]
    gammas = [data.draw(st.sampled_from([0.0, 0.01, 0.1, 0.3])) for _ in models]
    shared = {
        "normalize": data.draw(st.booleans()),
        "rescale": data.draw(st.booleans()),
        "lambda": data.draw(st.sampled_from([1.0, 0.5])),
    }
    theirs = _mergekit(
        method,
        base,
        models,
        {
            **shared,
            "int8_mask": data.draw(st.booleans()),
            "weight": _per_input(weights),
            "density": _per_input(densities),
            "gamma": _per_input(gammas),
        },
    )
    per_model = [
        {"weight": w, "density": d, "gamma": g}
        for w, d, g in zip(weights, densities, gammas, strict=True)
    ]
    ours = _tureen(method, base, models, shared, per_model)
    _assert_same_bits(ours, theirs)


@settings(max_examples=25, deadline=None)
@given(dtype=st.sampled_from(DTYPES), data=st.data())
def test_sce_in_the_dtype_equals_mergekit_bit_for_bit(
    dtype: torch.dtype, data: st.DataObject
) -> None:
    base, models = data.draw(tensors(data.draw(st.integers(1, 4))))
    base, models = base.to(dtype), [m.to(dtype) for m in models]
    topk = data.draw(st.sampled_from([1.0, 0.7, 0.5, 0.1, 0.0]))
    theirs = _mergekit("sce", base, models, {"int8_mask": False, "select_topk": topk})
    ours = _tureen("sce", base, models, {"select_topk": topk}, [{} for _ in models])
    _assert_same_bits(ours, theirs)


class _TureenDraws(ModuleType):
    """``torch`` as mergekit's ``sparsify`` sees it in the DELLA test: ``argsort`` is stable
    (tied magnitudes ranked by index, as tureen ranks them), and ``bernoulli`` records the
    keep probabilities and returns tureen's keyed mask drawn from them for the model being
    pruned (mergekit prunes the models in order, skipping those of density 1)."""

    def __init__(self, pruned: list[int]) -> None:
        super().__init__("torch")
        self.pruned = pruned
        self.probabilities: list[torch.Tensor] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(torch, name)

    @staticmethod
    def argsort(values: torch.Tensor, dim: int = -1, descending: bool = False) -> torch.Tensor:
        return torch.sort(values, dim=dim, descending=descending, stable=True).indices

    def bernoulli(self, probabilities: torch.Tensor) -> torch.Tensor:
        position = self.pruned[len(self.probabilities)]
        self.probabilities.append(probabilities.clone())
        mask = keep_mask_with_probabilities(dare_key(SEED, position, NAME), probabilities.float())
        return mask.to(probabilities.dtype)


@contextmanager
def _drawing_as_tureen(draws: _TureenDraws) -> Iterator[None]:
    import mergekit.sparsify  # type: ignore[import-untyped]

    original = mergekit.sparsify.torch
    mergekit.sparsify.torch = draws
    try:
        yield
    finally:
        mergekit.sparsify.torch = original


@settings(max_examples=25, deadline=None)
@given(
    method=st.sampled_from(["della", "della_linear"]),
    dtype=st.sampled_from(DTYPES),
    data=st.data(),
)
def test_della_in_the_dtype_equals_mergekit_bit_for_bit_given_the_same_draws(
    method: str, dtype: torch.dtype, data: st.DataObject
) -> None:
    base, models = data.draw(tensors(data.draw(st.integers(1, 3))))
    base, models = base.to(dtype), [m.to(dtype) for m in models]
    weights = [data.draw(st.sampled_from([0.3, 0.5, 1.0, 1.7])) for _ in models]
    densities = [data.draw(st.sampled_from([0.3, 0.5, 0.7, 1.0])) for _ in models]
    epsilons = [data.draw(st.sampled_from([0.0, 0.05, 0.1, 0.2])) for _ in models]
    shared = {
        "normalize": data.draw(st.booleans()),
        "rescale": data.draw(st.booleans()),
        "lambda": data.draw(st.sampled_from([1.0, 0.5])),
    }
    pruned = [position for position, density in enumerate(densities) if density < 1.0]
    draws = _TureenDraws(pruned)
    per_input = {"weight": weights, "density": densities, "epsilon": epsilons}
    params = {**shared, "int8_mask": False, **{k: _per_input(v) for k, v in per_input.items()}}
    theirs = _mergekit(method, base, models, params, _drawing_as_tureen(draws))
    per_model = [
        {"weight": w, "density": d, "epsilon": e}
        for w, d, e in zip(weights, densities, epsilons, strict=True)
    ]
    ours = _tureen(method, base, models, shared, per_model)
    _assert_same_bits(ours, theirs)
    assert len(draws.probabilities) == len(pruned)
    work = magprune_work_dtype(dtype)
    for position, recorded in zip(pruned, draws.probabilities, strict=True):
        tau = models[position] - base
        expected = magprune_probabilities_in(tau, densities[position], epsilons[position], work)
        assert recorded.dtype == work
        assert torch.equal(recorded.reshape(tau.shape), expected)


def test_della_work_dtype_is_mergekit_cpu_rule() -> None:
    assert magprune_work_dtype(torch.bfloat16) == torch.bfloat16
    assert magprune_work_dtype(torch.float16) == torch.float32
    assert magprune_work_dtype(torch.float32) == torch.float32


def test_breadcrumbs_in_bfloat16_rounds_at_each_step_unlike_float32() -> None:
    """The dtype path is not the float32 kernel rounded once: on inputs where the two
    differ, mergekit's own result is the dtype path's."""
    generator = torch.Generator().manual_seed(0)
    base = torch.randn(8, 16, generator=generator).to(torch.bfloat16)
    models = [(base.float() + 0.05 * torch.randn(8, 16, generator=generator)).to(torch.bfloat16)]
    models.append(
        (base.float() + 0.05 * torch.randn(8, 16, generator=generator)).to(torch.bfloat16)
    )
    per_model = [
        {"weight": 0.3, "density": 0.9, "gamma": 0.01},
        {"weight": 0.7, "density": 0.9, "gamma": 0.01},
    ]
    shared = {"lambda": 0.5}
    spec = get_method("breadcrumbs")
    inputs = MergeInputs(base, models, [spec.model_params.model_validate(v) for v in per_model])
    params = _tureen_params(spec, shared)
    once = spec.kernel(
        MergeInputs(base.float(), [m.float() for m in models], inputs.model_params),
        params,
        TensorContext(NAME, SEED),
    ).to(torch.bfloat16)
    ours = _tureen("breadcrumbs", base, models, shared, per_model)
    theirs = _mergekit(
        "breadcrumbs",
        base,
        models,
        {
            **shared,
            "normalize": False,
            "rescale": False,
            "int8_mask": False,
            "weight": {0: 0.3, 1: 0.7},
            "density": {0: 0.9, 1: 0.9},
            "gamma": {0: 0.01, 1: 0.01},
        },
    )
    _assert_same_bits(ours, theirs)
    assert not torch.equal(once, theirs)


CONSENSUS = {
    "weighted_election": st.booleans(),
    "divisor": st.sampled_from(["count", "weight_sum"]),
    "normalize": st.booleans(),
    "majority_sign_method": st.sampled_from(["total", "frequency"]),
    "zero_sign": st.sampled_from(["positive", "majority"]),
    "lambda": st.sampled_from([1.0, 0.7]),
}
MAGPRUNE = {
    "epsilon_span": st.sampled_from(["width", "half_width"]),
    "rescale": st.booleans(),
    "rescale_method": st.sampled_from(["inverse_probability", "l1"]),
}
OUTLIERS = {"outlier_rule": st.sampled_from(["always", "fit_density"]), "rescale": st.booleans()}
LINEAR = {"normalize": st.booleans(), "lambda": st.sampled_from([1.0, 0.7])}
OPTIONS: dict[str, st.SearchStrategy[dict[str, Any]]] = {
    "della": st.fixed_dictionaries({**CONSENSUS, **MAGPRUNE}),
    "della_linear": st.fixed_dictionaries({**LINEAR, **MAGPRUNE}),
    "breadcrumbs": st.fixed_dictionaries({**LINEAR, **OUTLIERS}),
    "breadcrumbs_ties": st.fixed_dictionaries({**CONSENSUS, **OUTLIERS}),
    "sce": st.fixed_dictionaries(
        {
            "select_topk": st.sampled_from([1.0, 0.5, 0.2]),
            "select_among": st.sampled_from(["nonzero_variance", "all"]),
        }
    ),
}


@settings(max_examples=60, deadline=None)
@given(method=st.sampled_from(sorted(OPTIONS)), data=st.data())
def test_float32_arithmetic_agrees_with_the_float32_kernels_for_every_option(
    method: str, data: st.DataObject
) -> None:
    """In float32 the dtype path differs from tureen's own kernel only in the order of
    operations, so every option must give the kernel's result up to float32 rounding."""
    spec = get_method(method)
    base, models = data.draw(tensors(data.draw(st.integers(1, 3))))
    fields = spec.model_params.model_fields
    per_model: list[dict[str, Any]] = []
    for _ in models:
        values: dict[str, Any] = {}
        if "weight" in fields:
            values["weight"] = data.draw(st.sampled_from([0.3, 1.0, 1.7]))
        if "density" in fields:
            values["density"] = data.draw(st.sampled_from([0.3, 0.5, 0.7, 1.0]))
        if "gamma" in fields:
            values["gamma"] = data.draw(st.sampled_from([0.0, 0.1, 0.3]))
        if "epsilon" in fields:
            values["epsilon"] = data.draw(st.sampled_from([0.0, 0.1, 0.2]))
        per_model.append(values)
    params = spec.params.model_validate(data.draw(OPTIONS[method]))
    inputs = MergeInputs(base, models, [spec.model_params.model_validate(v) for v in per_model])
    context = TensorContext(NAME, SEED)
    expected = spec.kernel(inputs, params, context)
    got = merge_in_dtype(method, spec.kernel, inputs, params, context)
    assert got.dtype == torch.float32
    scale = max(1.0, float(expected.abs().max()))
    assert torch.allclose(got, expected, rtol=1e-5, atol=1e-5 * scale), (method, params)
