"""Worked examples and invariants of Breadcrumbs, SCE, Model Stock and RAM."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from merge_kernels.methods.breadcrumbs import breadcrumb_counts
from merge_kernels.methods.kernel import TensorContext
from merge_kernels.methods.steps import magnitude_window_trim
from merge_kernels.registry import get_method


def t(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32)


finite = st.floats(-4, 4, allow_nan=False, allow_infinity=False, width=32)
shapes = st.lists(st.integers(1, 6), min_size=1, max_size=3).map(tuple)


def tensors(shape: tuple[int, ...], count: int) -> st.SearchStrategy[list[torch.Tensor]]:
    one = arrays(np.float32, shape, elements=finite).map(torch.from_numpy)
    return st.lists(one, min_size=count, max_size=count)


@pytest.mark.parametrize(
    ("numel", "density", "gamma", "rule", "expected"),
    [
        (100, 0.9, 0.3, "fit_density", (10, 90)),  # mergekit keeps density, drops fewer
        (100, 0.9, 0.3, "always", (30, 70)),  # the paper drops the outliers first
        (100, 0.5, 0.1, "fit_density", (10, 50)),
        (100, 0.5, 0.1, "always", (10, 50)),
        (100, 1.0, 0.05, "always", (5, 95)),
        (7, 0.5, 0.2, "always", (1, 3)),
    ],
)
def test_breadcrumb_counts(
    numel: int, density: float, gamma: float, rule: str, expected: tuple[int, int]
) -> None:
    assert breadcrumb_counts(numel, density, gamma, rule) == expected  # type: ignore[arg-type]


def test_breadcrumbs_drops_both_tails() -> None:
    tau = t(0.1, -0.9, 0.5, 0.3, -0.7, 0.2, 0.05, 0.4, -0.6, 0.8)
    # density 0.5, gamma 0.2: drop .9 and .8, keep the next five: .7 .6 .5 .4 .3
    out = get_method("breadcrumbs").merge_tensors(
        [tau], base=torch.zeros(10), model_params=[{"density": 0.5, "gamma": 0.2}]
    )
    assert torch.equal(out, t(0, 0, 0.5, 0.3, -0.7, 0, 0, 0.4, -0.6, 0))
    assert torch.equal(magnitude_window_trim(tau, 2, 5), out)


@settings(max_examples=40, deadline=None)
@given(
    data=st.data(),
    shape=shapes,
    count=st.integers(1, 3),
    rule=st.sampled_from(["always", "fit_density"]),
)
def test_breadcrumbs_at_density_one_and_gamma_zero_is_task_arithmetic(
    data: st.DataObject, shape: tuple[int, ...], count: int, rule: str
) -> None:
    models = data.draw(tensors(shape, count))
    base = data.draw(tensors(shape, 1))[0]
    weights = data.draw(st.lists(st.floats(-2, 2, width=32), min_size=count, max_size=count))
    lam = data.draw(st.floats(0.1, 2.0))
    out = get_method("breadcrumbs").merge_tensors(
        models,
        base=base,
        params={"lambda": lam, "outlier_rule": rule},
        model_params=[{"weight": w, "density": 1.0, "gamma": 0.0} for w in weights],
    )
    expected = get_method("task_arithmetic").merge_tensors(
        models, base=base, params={"lambda": lam}, model_params=[{"weight": w} for w in weights]
    )
    assert torch.equal(out, expected)


@settings(max_examples=40, deadline=None)
@given(
    numel=st.integers(1, 200),
    top=st.integers(0, 200),
    keep=st.integers(0, 200),
    seed=st.integers(0, 2**16),
)
def test_the_window_keeps_the_ranks_between_its_edges(
    numel: int, top: int, keep: int, seed: int
) -> None:
    top = min(top, numel)
    keep = min(keep, numel - top)
    generator = torch.Generator().manual_seed(seed)
    # Distinct magnitudes in random order and random signs, so ranks are unambiguous.
    magnitudes = torch.randperm(numel, generator=generator).float() + 1
    signs = torch.randint(0, 2, (numel,), generator=generator).float() * 2 - 1
    tau = magnitudes * signs
    out = magnitude_window_trim(tau, top, keep)
    kept = out != 0
    assert int(kept.sum()) == keep
    # rank 1 is the largest magnitude: kept exactly where top < rank <= top + keep
    rank = numel + 1 - magnitudes
    assert torch.equal(kept, (rank > top) & (rank <= top + keep))
    assert torch.equal(out[kept], tau[kept])


def test_model_stock_by_hand() -> None:
    base = t(0, 0)
    # offsets (1, 0) and (1, 1): cos θ = 1/√2, t = 2c / (1 + c)
    out = get_method("model_stock").merge_tensors([t(1, 0), t(1, 1)], base=base)
    c = 1 / math.sqrt(2)
    ratio = 2 * c / (1 + c)
    assert torch.allclose(out, ratio * t(1, 0.5))
    # orthogonal offsets: t = 0, the base
    assert torch.equal(get_method("model_stock").merge_tensors([t(1, 0), t(0, 1)], base=base), base)


def test_model_stock_filter_wise_takes_one_angle_per_row() -> None:
    base = torch.zeros(2, 2)
    first = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    second = torch.tensor([[0.0, 1.0], [2.0, 0.0]])  # row 0 orthogonal, row 1 parallel
    out = get_method("model_stock").merge_tensors(
        [first, second], base=base, params={"filter_wise": True}
    )
    assert torch.allclose(out, torch.tensor([[0.0, 0.0], [1.5, 0.0]]))


def test_ram_by_hand() -> None:
    base = t(0, 0, 0, 0)
    models = [t(1, 0, 2, 0), t(3, 0, 0, 0.5)]
    # entry 0 changed by both (mean), 2 and 3 by one each (kept whole), 1 by neither
    ram = get_method("ram").merge_tensors(models, base=base)
    assert torch.allclose(ram, t(2, 0, 2, 0.5))
    # RAM+: each model shares 1 entry and owns 1, ρ = 1, λ = 1 + r·min(ρ, alpha)
    plus = get_method("ramplus_tl").merge_tensors(
        models, base=base, params={"r": 0.5, "alpha": 0.4}
    )
    assert torch.allclose(plus, t(2, 0, 2 * 1.2, 0.5 * 1.2))


def test_ram_ignores_changes_at_or_below_epsilon() -> None:
    out = get_method("ram").merge_tensors(
        [t(0.1, 0.5), t(0.3, 0.05)], base=t(0, 0), params={"epsilon": 0.1}
    )
    assert torch.allclose(out, t(0.3, 0.5))


@settings(max_examples=30, deadline=None)
@given(data=st.data(), rows=st.integers(2, 12), cols=st.integers(1, 8), cut=st.integers(1, 11))
def test_ram_row_chunks_give_the_whole_merge(
    data: st.DataObject, rows: int, cols: int, cut: int
) -> None:
    base, *models = data.draw(tensors((rows, cols), 4))
    cut = min(cut, rows - 1)
    spec = get_method("ram")
    whole = spec.merge_tensors(models, base=base, params={"epsilon": 0.5})
    pieces = [
        spec.merge_tensors(
            [m[part] for m in models],
            base=base[part],
            params={"epsilon": 0.5},
            context=TensorContext(name="w", offset=part.start * cols),
        )
        for part in (slice(0, cut), slice(cut, rows))
    ]
    assert torch.equal(torch.cat(pieces), whole)


def test_sce_by_hand() -> None:
    base = t(0, 0, 0)
    models = [t(1, -1, 2), t(3, 1, -1)]
    # weights ∝ mean τ²: (1 + 1 + 4)/3 = 2 and (9 + 1 + 1)/3 = 11/3 → 6/17, 11/17
    # signs: Σ = (4, 0, 1) → (+, +, +); entry 1: only model 1 agrees; entry 2: model 0
    w0, w1 = 6 / 17, 11 / 17
    expected = t((w0 * 1 + w1 * 3) / (w0 + w1), 1.0, 2.0)
    assert torch.allclose(get_method("sce").merge_tensors(models, base=base), expected)
    # select_topk 1/3: variance (1, 1, 2.25) keeps entry 2 only, where model 1 disagrees
    selected = get_method("sce").merge_tensors(
        models, base=base, params={"select_topk": 1 / 3 + 1e-6}
    )
    assert torch.allclose(selected, t(0, 0, 2.0))


@pytest.mark.parametrize("reference", ["peft", "paper"])
def test_sce_select_among_all_entries(reference: str) -> None:
    base = torch.zeros(4)
    # entries 2 and 3 changed identically by both models: variance 0
    models = [t(1, 2, 5, 5), t(-1, 0, 5, 5)]
    out = get_method("sce").merge_tensors(
        models,
        base=base,
        params={"select_topk": 0.5},
        reference=reference,  # type: ignore[arg-type]
    )
    if reference == "paper":  # k = ⌊0.5·4⌋ = 2: entries 0 and 1 (variance 1 and 1)
        assert bool((out[2:] == 0).all()) and bool((out[:2] != 0).any())
    else:  # k = ⌊0.5·2⌋ = 1 of the two entries of nonzero variance: entry 0 (first tie)
        assert bool((out[1:] == 0).all())
