"""DARE with density < 1: the drop is random, so its properties are checked statistically."""

from __future__ import annotations

import math

import pytest
import torch

from merge_kernels.methods.kernel import TensorContext
from merge_kernels.registry import get_method

N = 200_000


@pytest.mark.parametrize("density", [0.05, 0.1, 0.3, 0.7])
def test_kept_fraction_and_rescale(density: float) -> None:
    tau = torch.rand(N) + 0.5  # no zeros, so every zero in the output was dropped
    base = torch.zeros(N)
    out = get_method("dare_linear").merge_tensors(
        [tau],
        base=base,
        model_params=[{"density": density}],
        context=TensorContext(name="w", seed=9),
    )
    kept = out != 0
    fraction = float(kept.float().mean())
    sigma = math.sqrt(density * (1 - density) / N)
    assert abs(fraction - density) < 6 * sigma
    assert torch.allclose(out[kept], tau[kept] / density)


@pytest.mark.parametrize("method", ["dare_linear", "dare_ties"])
def test_mean_over_seeds_approaches_task_arithmetic(method: str) -> None:
    generator = torch.Generator().manual_seed(0)
    base = torch.randn(2000, generator=generator)
    # same-signed task vectors, so TIES' election keeps everything and the mean is linear
    taus = [torch.rand(2000, generator=generator) + 0.1 for _ in range(2)]
    weights = [0.7, 0.3]
    spec = get_method(method)
    params: dict[str, object] = {}  # dare_linear: plain sum; dare_ties: mean over agreeing
    seeds = 400
    total = torch.zeros(2000, dtype=torch.float64)
    for seed in range(seeds):
        out = spec.merge_tensors(
            [base + tau for tau in taus],
            base=base,
            params=params,
            model_params=[{"weight": w, "density": 0.3} for w in weights],
            context=TensorContext(name="w", seed=seed),
        )
        total += (out - base).double()
    mean = total / seeds
    expected = (weights[0] * taus[0] + weights[1] * taus[1]).double()
    if method == "dare_ties":
        # Disjoint mean of two same-signed vectors kept with probability p, rescaled by 1/p:
        # both kept (p²): (a + b)/(2p); one kept (p(1−p) each): a/p or b/p; so
        # E = (a + b)(1 − p/2) with a = w₀τ₀, b = w₁τ₁.
        expected = expected * (1 - 0.3 / 2)
    # per-entry standard error of the mean of a scaled Bernoulli, with margin
    relative_error = float(((mean - expected).abs() / expected).mean())
    assert relative_error < 0.06


def test_masks_are_independent_between_models() -> None:
    base = torch.zeros(N)
    ones = torch.ones(N)
    outputs = [
        get_method("dare_linear").merge_tensors(
            [ones],
            base=base,
            model_params=[{"density": 0.5}],
            context=TensorContext(name="w", seed=4, model_indices=(index,)),
        )
        for index in (0, 1)
    ]
    both = float(((outputs[0] != 0) & (outputs[1] != 0)).float().mean())
    assert abs(both - 0.25) < 6 * math.sqrt(0.25 * 0.75 / N)
