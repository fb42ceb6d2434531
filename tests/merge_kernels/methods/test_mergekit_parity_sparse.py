"""Breadcrumbs, SCE, Model Stock and RAM under ``reference: mergekit`` match mergekit 0.1.5.

mergekit's own merge methods are called on the same float32 tensors (no magnitude or
variance ties, so the two tie rules cannot differ) and every merged tensor must agree to a
relative L2 difference of 1e-6. DELLA draws at random and is compared statistically in
``test_della.py``, except at density 1, where it is deterministic.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from mergekit.merge_methods import registry as mergekit_methods
from mergekit.merge_methods.base import TensorGroup

from merge_kernels.methods.kernel import TensorContext
from merge_kernels.registry import get_method

SHAPES = [(48,), (24, 40), (6, 5, 8)]
WEIGHTS = [0.7, 1.0, -0.4]


def inputs(shape: tuple[int, ...], count: int = 3, seed: int = 0) -> list[torch.Tensor]:
    """A base and ``count`` fine-tunes in float32, their task vectors free of ties."""
    generator = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=generator)
    return [base] + [base + 0.1 * torch.randn(shape, generator=generator) for _ in range(count)]


def mergekit_merge(
    name: str, tensors: list[torch.Tensor], parameters: dict[str, Any]
) -> torch.Tensor:
    group = TensorGroup.from_tensors(tensors, base_index=0, name="model.layers.0.mlp.up_proj")
    return mergekit_methods.get(name)([group], parameters=parameters)[0]


def tureen_merge(
    name: str,
    tensors: list[torch.Tensor],
    params: dict[str, Any],
    model_params: list[dict[str, Any]] | None = None,
) -> torch.Tensor:
    return get_method(name).merge_tensors(
        tensors[1:],
        base=tensors[0],
        params=params,
        model_params=model_params,
        reference="mergekit",
        context=TensorContext(name="model.layers.0.mlp.up_proj.weight", seed=5),
    )


def assert_parity(ours: torch.Tensor, theirs: torch.Tensor) -> None:
    assert ours.shape == theirs.shape
    assert ours.dtype == theirs.dtype == torch.float32
    difference = float(torch.linalg.vector_norm(ours - theirs))
    assert difference <= 1e-6 * float(torch.linalg.vector_norm(theirs))


def per_model(values: dict[str, list[float]]) -> list[dict[str, float]]:
    count = len(next(iter(values.values())))
    return [{key: column[i] for key, column in values.items()} for i in range(count)]


BREADCRUMBS_CASES: list[tuple[dict[str, Any], dict[str, list[float]]]] = [
    ({}, {"weight": WEIGHTS, "density": [0.6, 0.5, 0.8], "gamma": [0.05, 0.1, 0.0]}),
    ({"rescale": True}, {"weight": WEIGHTS, "density": [0.3, 0.9, 0.5], "gamma": [0.2, 0.3, 0.01]}),
    ({"normalize": True, "lambda": 0.6}, {"weight": [1.0, 2.0, 0.5], "density": [0.4] * 3}),
    ({"lambda": 1.3}, {"weight": WEIGHTS, "density": [1.0, 0.7, 0.2], "gamma": [0.5, 0.4, 0.9]}),
]


@pytest.mark.parametrize("method", ["breadcrumbs", "breadcrumbs_ties"])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize(("shared", "models"), BREADCRUMBS_CASES)
def test_breadcrumbs(
    method: str,
    shape: tuple[int, ...],
    shared: dict[str, Any],
    models: dict[str, list[float]],
) -> None:
    tensors = inputs(shape)
    ours = tureen_merge(method, tensors, shared, per_model(models))
    assert_parity(ours, mergekit_merge(method, tensors, shared | models))


@pytest.mark.parametrize("method", ["breadcrumbs", "breadcrumbs_ties", "della", "della_linear"])
def test_defaults_at_density_one(method: str) -> None:
    # mergekit's default density is 1: no trim or drop at all, gamma and epsilon aside.
    tensors = inputs((16, 12))
    ours = tureen_merge(method, tensors, {}, [{"weight": w} for w in WEIGHTS])
    assert_parity(ours, mergekit_merge(method, tensors, {"weight": WEIGHTS}))


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize(
    "parameters", [{}, {"select_topk": 0.3}, {"select_topk": 0.75}, {"select_topk": 0.0}]
)
def test_sce(shape: tuple[int, ...], parameters: dict[str, Any]) -> None:
    tensors = inputs(shape, count=4)
    assert_parity(
        tureen_merge("sce", tensors, parameters), mergekit_merge("sce", tensors, parameters)
    )


def test_sce_counts_only_entries_of_nonzero_variance() -> None:
    # Half the entries are changed identically by every model (variance 0): mergekit's k is
    # a fraction of the other half.
    base, *models = inputs((20, 10), count=3)
    models = [torch.cat([m[:10], base[10:] + 0.05]) for m in models]
    tensors = [base, *models]
    parameters = {"select_topk": 0.5}
    assert_parity(
        tureen_merge("sce", tensors, parameters), mergekit_merge("sce", tensors, parameters)
    )


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("filter_wise", [False, True])
@pytest.mark.parametrize("count", [2, 3, 5])
def test_model_stock(shape: tuple[int, ...], filter_wise: bool, count: int) -> None:
    tensors = inputs(shape, count=count)
    parameters = {"filter_wise": filter_wise}
    ours = tureen_merge("model_stock", tensors, parameters)
    assert_parity(ours, mergekit_merge("model_stock", tensors, parameters))


def test_model_stock_on_a_scalar_is_one_filter() -> None:
    tensors = [t.reshape(()) for t in inputs((1,), count=3)]
    whole = tureen_merge("model_stock", tensors, {})
    assert_parity(whole, mergekit_merge("model_stock", tensors, {}))
    # mergekit takes no row norm of a 0-d tensor; here it is one filter, as a 1-d one is.
    assert torch.equal(tureen_merge("model_stock", tensors, {"filter_wise": True}), whole)


def test_model_stock_keeps_the_base_at_the_singularity() -> None:
    base = torch.zeros(4)
    # Two opposite offsets: cos θ = −1, so 1 + (k − 1)·cos θ = 0.
    tensors = [base, torch.tensor([1.0, 2, 3, 4]), torch.tensor([-1.0, -2, -3, -4])]
    ours = tureen_merge("model_stock", tensors, {})
    assert torch.equal(ours, base)
    assert_parity(ours + 1, mergekit_merge("model_stock", tensors, {}) + 1)


def sparse_inputs(shape: tuple[int, ...], count: int = 3) -> list[torch.Tensor]:
    """Fine-tunes that each change a random subset of entries, overlapping in places."""
    tensors = inputs(shape, count=count, seed=3)
    generator = torch.Generator().manual_seed(4)
    base = tensors[0]
    out = [base]
    for model in tensors[1:]:
        changed = torch.rand(shape, generator=generator) < 0.4
        out.append(torch.where(changed, model, base))
    return out


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize(
    ("method", "parameters"),
    [
        ("ram", {}),
        ("ram", {"epsilon": 0.05}),
        ("ramplus_tl", {}),
        ("ramplus_tl", {"epsilon": 0.02, "r": 0.5, "alpha": 1.0}),
        ("ramplus_tl", {"r": -0.3, "alpha": 0.05}),
    ],
)
def test_ram(shape: tuple[int, ...], method: str, parameters: dict[str, Any]) -> None:
    tensors = sparse_inputs(shape)
    ours = tureen_merge(method, tensors, parameters)
    assert_parity(ours, mergekit_merge(method, tensors, parameters))


def test_parameter_scopes_match_mergekit() -> None:
    """Whole-merge vs per-model parameters, and their defaults, are mergekit's."""
    for name in (
        "breadcrumbs",
        "breadcrumbs_ties",
        "della",
        "della_linear",
        "sce",
        "model_stock",
        "ram",
        "ramplus_tl",
    ):
        theirs = mergekit_methods.get(name).spec.parameters
        spec = get_method(name)
        defaults = spec.defaults("mergekit")
        for parameter in theirs:
            shared = parameter.scope.value == "shared"
            names = spec.method_param_names() if shared else spec.model_param_names()
            assert parameter.name in names, (name, parameter.name)
            if not parameter.required:
                assert defaults[parameter.name] == parameter.default, (name, parameter.name)
