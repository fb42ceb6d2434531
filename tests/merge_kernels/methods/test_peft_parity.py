"""Parity with PEFT's ``merge_utils``, the reference for tureen's default semantics."""

from __future__ import annotations

import pytest
import torch
from peft.utils import merge_utils

from merge_kernels.registry import get_method

SHAPES = [(257,), (16, 33), (4, 8, 9)]
MODEL_COUNTS = [1, 2, 3, 5]


def _inputs(
    shape: tuple[int, ...], count: int, seed: int
) -> tuple[torch.Tensor, list[torch.Tensor], torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    taus = [torch.randn(shape, generator=generator) for _ in range(count)]
    weights = torch.rand(count, generator=generator) * 1.5 + 0.1
    return torch.zeros(shape), taus, weights


def _merge(
    method: str, taus: list[torch.Tensor], weights: torch.Tensor, **params: object
) -> torch.Tensor:
    base = torch.zeros_like(taus[0])
    density = params.pop("density", None)
    model_params = [
        {"weight": float(w), **({"density": density} if density is not None else {})}
        for w in weights
    ]
    return get_method(method).merge_tensors(
        [base + tau for tau in taus], base=base, params=params, model_params=model_params
    )


def _assert_close(ours: torch.Tensor, theirs: torch.Tensor) -> None:
    scale = max(1.0, float(theirs.abs().max()))
    assert float((ours - theirs).abs().max()) <= 1e-6 * scale


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("count", MODEL_COUNTS)
def test_task_arithmetic_matches_peft(shape: tuple[int, ...], count: int) -> None:
    _, taus, weights = _inputs(shape, count, seed=count)
    ours = _merge("task_arithmetic", taus, weights)
    _assert_close(ours, merge_utils.task_arithmetic(taus, weights))


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("count", MODEL_COUNTS)
@pytest.mark.parametrize("density", [0.1, 0.2, 0.5, 1.0])
@pytest.mark.parametrize("sign_method", ["total", "frequency"])
def test_ties_matches_peft(
    shape: tuple[int, ...], count: int, density: float, sign_method: str
) -> None:
    _, taus, weights = _inputs(shape, count, seed=7 * count + int(density * 10))
    ours = _merge("ties", taus, weights, density=density, majority_sign_method=sign_method)
    theirs = merge_utils.ties(taus, weights, density, majority_sign_method=sign_method)  # type: ignore[arg-type]
    _assert_close(ours, theirs)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("count", MODEL_COUNTS)
def test_dare_linear_at_density_one_matches_peft(shape: tuple[int, ...], count: int) -> None:
    _, taus, weights = _inputs(shape, count, seed=11 * count)
    ours = _merge("dare_linear", taus, weights, density=1.0)
    _assert_close(ours, merge_utils.dare_linear(taus, weights, 1.0))


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("count", MODEL_COUNTS)
@pytest.mark.parametrize("sign_method", ["total", "frequency"])
def test_dare_ties_at_density_one_matches_peft(
    shape: tuple[int, ...], count: int, sign_method: str
) -> None:
    _, taus, weights = _inputs(shape, count, seed=13 * count)
    ours = _merge("dare_ties", taus, weights, density=1.0, majority_sign_method=sign_method)
    theirs = merge_utils.dare_ties(taus, weights, 1.0, majority_sign_method=sign_method)  # type: ignore[arg-type]
    _assert_close(ours, theirs)


def test_magnitude_trim_matches_peft_prune() -> None:
    from merge_kernels.methods.steps import magnitude_trim

    generator = torch.Generator().manual_seed(3)
    for shape in SHAPES:
        tau = torch.randn(shape, generator=generator)
        for density in (0.05, 0.2, 0.7):
            ours = magnitude_trim(tau, density)
            theirs = merge_utils.prune(tau, density, method="magnitude")
            assert torch.equal(ours, theirs)


def test_nonzero_base_is_added_back() -> None:
    generator = torch.Generator().manual_seed(5)
    base = torch.randn(64, 64, generator=generator)
    taus = [torch.randn(64, 64, generator=generator) * 0.01 for _ in range(3)]
    weights = torch.tensor([0.5, 1.0, 1.5])
    ours = get_method("ties").merge_tensors(
        [base + tau for tau in taus],
        base=base,
        params={"lambda": 0.7},
        model_params=[{"weight": float(w), "density": 0.3} for w in weights],
    )
    # Differences of float32 sums: compare against PEFT on the task vectors as tureen sees them.
    seen = [(base + tau) - base for tau in taus]
    expected = base + 0.7 * merge_utils.ties(seen, weights, 0.3)
    _assert_close(ours, expected)
