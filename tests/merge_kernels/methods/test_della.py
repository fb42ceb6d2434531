"""DELLA's MagPrune: magnitude-ranked random drops, checked statistically against mergekit.

mergekit draws its masks from torch's global generator and tureen from counter-based
hashes, so the two agree in distribution: each entry's keep frequency over many seeds, the
kept fraction per row, the rescale, and the mean merged tensor over many seeds.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from mergekit.merge_methods import registry as mergekit_methods
from mergekit.merge_methods.base import TensorGroup
from mergekit.sparsify import RescaleNorm, della_magprune

from merge_kernels.methods.della import half_spread, magprune, magprune_probabilities
from merge_kernels.methods.kernel import TensorContext
from merge_kernels.methods.random_mask import dare_key, keep_mask, keep_mask_with_probabilities
from merge_kernels.registry import get_method

SEEDS = 300


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    # Hundreds of draws on small tensors: one thread spares the fork-join of each op.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def taus(shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def mergekit_keep_frequency(tau: torch.Tensor, density: float, epsilon: float) -> torch.Tensor:
    state = torch.get_rng_state()
    try:
        kept = torch.zeros(tau.shape, dtype=torch.float64)
        for seed in range(SEEDS):
            torch.manual_seed(seed)
            kept += (della_magprune(tau, density, epsilon) != 0).double()
    finally:
        torch.set_rng_state(state)
    return kept / SEEDS


def tureen_keep_frequency(tau: torch.Tensor, density: float, spread: float) -> torch.Tensor:
    kept = torch.zeros(tau.shape, dtype=torch.float64)
    for seed in range(SEEDS):
        pruned = magprune(tau, density, spread, key=dare_key(seed, 0, "w"), rescale="none")
        kept += (pruned != 0).double()
    return kept / SEEDS


@pytest.mark.parametrize(
    ("shape", "density", "epsilon"), [((6, 40), 0.5, 0.15), ((90,), 0.3, 0.25), ((6, 40), 0.8, 0.1)]
)
def test_each_entry_is_kept_as_often_as_by_mergekit(
    shape: tuple[int, ...], density: float, epsilon: float
) -> None:
    tau = taus(shape)
    probabilities = magprune_probabilities(tau, density, half_spread(epsilon, "half_width"))
    theirs = mergekit_keep_frequency(tau, density, epsilon)
    ours = tureen_keep_frequency(tau, density, half_spread(epsilon, "half_width"))
    p = probabilities.double()
    sigma = (p * (1 - p) / SEEDS).sqrt()
    # Both frequencies estimate the same per-entry probability, the one computed here.
    assert bool(((theirs - p).abs() <= 5 * sigma + 1e-9).all())
    assert bool(((ours - p).abs() <= 5 * sigma + 1e-9).all())
    # The smallest entry of a row is kept with density − ε, its largest with density + ε.
    rows = tau.reshape(-1, shape[-1])
    smallest = rows.abs().argmin(dim=1)
    largest = rows.abs().argmax(dim=1)
    flat = probabilities.reshape(rows.shape)
    assert torch.allclose(flat.gather(1, smallest[:, None]), torch.tensor(density - epsilon))
    assert torch.allclose(flat.gather(1, largest[:, None]), torch.tensor(density + epsilon))


@pytest.mark.parametrize("span", ["width", "half_width"])
@pytest.mark.parametrize("density", [0.2, 0.5, 0.9])
def test_kept_fraction_per_row_is_density(span: str, density: float) -> None:
    tau = taus((4, 50_000))
    epsilon = 0.09
    pruned = magprune(
        tau, density, half_spread(epsilon, span), key=dare_key(3, 1, "w"), rescale="none"
    )
    fraction = (pruned != 0).double().mean(dim=1)
    sigma = math.sqrt(density * (1 - density) / tau.shape[1])
    assert bool(((fraction - density).abs() < 6 * sigma).all())
    # The quarter of largest magnitudes is kept more often than the quarter of smallest,
    # by about 1.5 spreads (mean ranks 7/8 and 1/8 of the window).
    order = tau.abs().argsort(dim=1)
    quarter = tau.shape[1] // 4
    kept = (pruned != 0).double().gather(1, order)
    gap = float(kept[:, -quarter:].mean() - kept[:, :quarter].mean())
    assert abs(gap - 1.5 * half_spread(epsilon, span)) < 0.02


def test_l1_rescale_restores_each_task_vectors_norm_as_mergekit() -> None:
    tau = taus((8, 300))
    ours = magprune(tau, 0.4, 0.1, key=dare_key(1, 0, "w"), rescale="l1")
    torch.manual_seed(0)
    theirs = della_magprune(tau, 0.4, 0.1, rescale_norm=RescaleNorm.l1)
    for pruned in (ours, theirs):
        assert math.isclose(float(pruned.abs().sum()), float(tau.abs().sum()), rel_tol=1e-5)
        kept = pruned != 0
        ratio = pruned[kept] / tau[kept]
        assert torch.allclose(ratio, ratio[0].expand_as(ratio))


def test_inverse_probability_rescale_is_unbiased() -> None:
    tau = taus((3, 200)) + 3.0  # away from 0, so relative errors are meaningful
    spread = half_spread(0.2, "width")
    probabilities = magprune_probabilities(tau, 0.3, spread)
    total = torch.zeros(tau.shape, dtype=torch.float64)
    seeds = 1000
    for seed in range(seeds):
        pruned = magprune(tau, 0.3, spread, key=dare_key(seed, 0, "w"))
        kept = pruned != 0
        assert torch.allclose(pruned[kept], tau[kept] / probabilities[kept])
        total += pruned.double()
    mean = total / seeds
    # Standard error of the mean of τ·Bernoulli(p)/p is |τ|·sqrt((1 − p)/(p·n)).
    p = probabilities.double()
    sigma = tau.double().abs() * ((1 - p) / (p * seeds)).sqrt()
    assert bool(((mean - tau.double()).abs() < 5 * sigma).all())


@pytest.mark.parametrize("method", ["della", "della_linear"])
def test_mean_over_seeds_matches_mergekit(method: str) -> None:
    generator = torch.Generator().manual_seed(2)
    base = torch.randn(4, 64, generator=generator)
    models = [base + 0.1 * torch.randn(4, 64, generator=generator) for _ in range(3)]
    weights = [0.5, 1.0, 0.8]
    densities = [0.4, 0.6, 0.5]
    model_params = [
        {"weight": w, "density": d, "epsilon": 0.2} for w, d in zip(weights, densities, strict=True)
    ]
    seeds = SEEDS // 2
    group = TensorGroup.from_tensors([base, *models], base_index=0)
    sums = torch.zeros(2, *base.shape, dtype=torch.float64)
    squares = torch.zeros_like(sums)
    state = torch.get_rng_state()
    try:
        for seed in range(seeds):
            ours = get_method(method).merge_tensors(
                models,
                base=base,
                model_params=model_params,
                reference="mergekit",
                context=TensorContext(name="w", seed=seed),
            )
            torch.manual_seed(seed)
            theirs = mergekit_methods.get(method)(
                [group], parameters={"weight": weights, "density": densities, "epsilon": 0.2}
            )[0]
            for row, out in enumerate((ours, theirs)):
                delta = (out - base).double()
                sums[row] += delta
                squares[row] += delta.square()
    finally:
        torch.set_rng_state(state)
    means = sums / seeds
    variances = (squares / seeds - means.square()).clamp(min=0) / (seeds - 1)
    # Per entry, the two means differ by a z-score of the two sampling errors; were the
    # distributions different, the mean squared z would grow with the number of seeds
    # (dividing by the keep probabilities instead of restoring the L1 norm gives about 4).
    z = (means[0] - means[1]) / (variances.sum(dim=0) + 1e-12).sqrt()
    assert float(z.square().mean()) < 1.4
    assert float(z.abs().max()) < 6


def test_epsilon_zero_with_inverse_probability_is_dare() -> None:
    generator = torch.Generator().manual_seed(5)
    base = torch.randn(30, 20, generator=generator)
    models = [base + torch.randn(30, 20, generator=generator) for _ in range(2)]
    context = TensorContext(name="model.layers.2.self_attn.o_proj.weight", seed=17)
    della = get_method("della_linear").merge_tensors(
        models,
        base=base,
        model_params=[{"density": 0.5, "epsilon": 0.0}] * 2,
        context=context,
    )
    dare = get_method("dare_linear").merge_tensors(
        models, base=base, model_params=[{"density": 0.5}] * 2, context=context
    )
    assert torch.equal(della, dare)


@settings(max_examples=30, deadline=None)
@given(
    numel=st.integers(1, 3000),
    cut=st.integers(0, 3000),
    offset=st.integers(0, 2**40),
    density=st.floats(0.01, 1.0),
)
def test_masks_of_slices_are_slices_of_the_mask(
    numel: int, cut: int, offset: int, density: float
) -> None:
    key = dare_key(7, 2, "w")
    probabilities = torch.rand(numel, generator=torch.Generator().manual_seed(numel))
    whole = keep_mask_with_probabilities(key, probabilities, offset=offset)
    cut = min(cut, numel)
    head = keep_mask_with_probabilities(key, probabilities[:cut], offset=offset)
    tail = keep_mask_with_probabilities(key, probabilities[cut:], offset=offset + cut)
    assert torch.equal(torch.cat([head, tail]), whole)
    # A constant probability gives DARE's mask exactly.
    uniform = torch.full((numel,), density, dtype=torch.float64)
    same = keep_mask(key, density, numel, offset=offset)
    assert torch.equal(keep_mask_with_probabilities(key, uniform, offset=offset), same)


def test_probabilities_outside_the_unit_interval_are_refused() -> None:
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        keep_mask_with_probabilities(1, torch.tensor([0.5, 1.5]))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        keep_mask_with_probabilities(1, torch.tensor([float("nan")]))


@pytest.mark.parametrize(
    ("reference", "density", "epsilon", "ok"),
    [
        ("mergekit", 0.1, 0.15, False),  # 0.1 − 0.15 < 0
        ("peft", 0.1, 0.15, True),  # the paper's window: 0.1 ± 0.075
        ("peft", 0.9, 0.3, False),  # 0.9 + 0.15 > 1
        ("mergekit", 1.0, 0.5, True),  # density 1 drops nothing
    ],
)
def test_the_probability_window_must_fit(
    reference: str, density: float, epsilon: float, ok: bool
) -> None:
    def run() -> torch.Tensor:
        return get_method("della").merge_tensors(
            [torch.ones(8)],
            base=torch.zeros(8),
            model_params=[{"density": density, "epsilon": epsilon}],
            reference=reference,  # type: ignore[arg-type]
        )

    if ok:
        assert run().shape == (8,)
    else:
        with pytest.raises(ValueError, match="must lie in"):
            run()


def test_ties_in_magnitude_are_ranked_by_index() -> None:
    tau = torch.tensor([[1.0, -1.0, 1.0, 2.0, 0.5]])
    probabilities = magprune_probabilities(tau, 0.5, 0.2)
    # ranks: 0.5 → 0, the three 1s by index → 1, 2, 3, and 2.0 → 4
    expected = 0.3 + 0.4 * torch.tensor([[1, 2, 3, 4, 0]]) / 4
    assert torch.allclose(probabilities, expected)
