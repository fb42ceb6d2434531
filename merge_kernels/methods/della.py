"""DELLA: task vectors dropped at random with magnitude-ranked probabilities (MagPrune).

Deep, Bhardwaj, Majumder & Poria, "DELLA-Merging: Reducing Interference in Model Merging
through Magnitude-Based Sampling", 2024 (arXiv 2406.11617). Within each row of a task
vector τᵢ the entries are ranked by |τ|; an entry's keep probability grows linearly with
its rank, from ``density − ε/2`` for the smallest to ``density + ε/2`` for the largest
(the paper's window of width ε around the drop rate), so the expected fraction kept is
``density`` and large entries survive more often. Each surviving entry is divided by its own
keep probability, so the pruned task vector is unbiased. Then, as in TIES, a sign is
elected per entry and the agreeing entries are averaged (``della``), or the pruned task
vectors are summed as in task arithmetic (``della_linear``).

mergekit (``della_magprune``) differs in two ways, both options here: its ``epsilon`` is the
half-width of the window (keep probabilities ``density ± ε``: ``epsilon_span: half_width``)
and it restores each pruned task vector's L1 norm instead of dividing by the probabilities
(``rescale_method: l1``). ``reference: mergekit`` selects both, elects signs on wᵢ·τᵢ and
divides by the agreeing weights.

Ranks are per row (the second axis; a tensor of fewer than two axes is one row), ties in
magnitude ranked by flat index. Keep decisions come from :mod:`random_mask`: a pure function
of (seed, model index, tensor name, element index), so a merge gives the same bits on any
device and thread count. mergekit draws from torch's global generator, so the two agree in
distribution, not bit for bit.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from merge_kernels.methods.kernel import MergeInputs, MethodParams, TensorContext
from merge_kernels.methods.random_mask import dare_key, keep_mask_with_probabilities
from merge_kernels.methods.steps import l1_rescale_
from merge_kernels.methods.task_arithmetic import (
    ConsensusParams,
    SparseModelParams,
    TaskArithmeticParams,
    check_density,
    consensus_combination,
    linear_combination,
    sparsified_task_vectors,
)
from merge_kernels.registry import MethodSpec, register

EpsilonSpan = Literal["width", "half_width"]


class DellaModelParams(SparseModelParams):
    """Per-model parameters of DELLA."""

    epsilon: float = Field(
        0.15,
        ge=0.0,
        description="Spread of the keep probabilities between this model's smallest and "
        "largest entries of a row (see epsilon_span); 0 drops uniformly at random.",
    )


class MagPruneParams(MethodParams):
    """How MagPrune spreads its probabilities and rescales the survivors."""

    epsilon_span: EpsilonSpan = Field(
        "width",
        description="`width`: keep probabilities span density ± epsilon/2 (the paper); "
        "`half_width`: density ± epsilon (mergekit).",
    )
    rescale: bool = Field(True, description="Rescale the surviving entries after the drop.")
    rescale_method: Literal["inverse_probability", "l1"] = Field(
        "inverse_probability",
        description="`inverse_probability`: divide each survivor by its keep probability "
        "(the paper); `l1`: restore the task vector's L1 norm (mergekit).",
    )
    int8_mask: bool = Field(
        False, description="Accepted for mergekit configs; masks are boolean here, so no effect."
    )


class DellaParams(ConsensusParams, MagPruneParams):
    """Parameters of DELLA (MagPrune, then TIES' election and disjoint mean)."""


class DellaLinearParams(TaskArithmeticParams, MagPruneParams):
    """Parameters of DELLA followed by task arithmetic."""


def half_spread(epsilon: float, span: EpsilonSpan) -> float:
    """How far the keep probabilities reach on either side of density."""
    return epsilon / 2 if span == "width" else epsilon


def magprune_probabilities(tau: torch.Tensor, density: float, spread: float) -> torch.Tensor:
    """Each entry's keep probability: ``density − spread`` at the row's smallest |τ|, rising
    linearly with the magnitude rank to ``density + spread`` at its largest.

    Rows run along the second axis (mergekit's ``dim=1``); a tensor of fewer than two axes
    is a single row. A row of one entry keeps it with probability ``density``.
    """
    rows = tau.reshape(1, -1) if tau.dim() < 2 else tau
    n = rows.shape[1]
    # A stable sort ranks tied magnitudes by index, so the ranks (and the mask) are the
    # same on every device.
    order = torch.sort(rows.abs(), dim=1, stable=True).indices
    shape = [1] * rows.dim()
    shape[1] = n
    positions = torch.arange(n, device=tau.device).view(shape).expand_as(order)
    ranks = torch.empty_like(order).scatter_(1, order, positions)
    rank_norm = ranks.float().div_(n - 1) if n > 1 else torch.full_like(rows, 0.5)
    probabilities = rank_norm.mul_(2 * spread).add_(density - spread)
    return probabilities.clamp_(0.0, 1.0).reshape(tau.shape)


def magprune(
    tau: torch.Tensor,
    density: float,
    spread: float,
    *,
    key: int,
    offset: int = 0,
    rescale: Literal["inverse_probability", "l1", "none"] = "inverse_probability",
) -> torch.Tensor:
    """DELLA's MagPrune on one task vector: magnitude-ranked random drop, then rescale.

    Args:
        tau: the task vector (float32, any shape).
        density: the mean keep probability.
        spread: half the width of the keep probabilities' window (see :func:`half_spread`).
        key: the mask key (:func:`~merge_kernels.methods.random_mask.dare_key`).
        offset: flat index of ``tau``'s first element in its tensor.
        rescale: ``inverse_probability`` divides each survivor by its keep probability
            (the paper), ``l1`` restores the L1 norm (mergekit), ``none`` neither.
    """
    probabilities = magprune_probabilities(tau, density, spread)
    kept = keep_mask_with_probabilities(key, probabilities, offset=offset)
    if rescale == "inverse_probability":
        return torch.where(kept, tau / probabilities, 0.0)
    pruned = tau * kept
    return l1_rescale_(pruned, tau) if rescale == "l1" else pruned


def _pruned(
    inputs: MergeInputs, params: MagPruneParams, ctx: TensorContext
) -> tuple[torch.Tensor, list[torch.Tensor], list[float]]:
    """The base, each model's MagPruned task vector, and each model's weight."""
    epsilons = [float(getattr(p, "epsilon", 0.0)) for p in inputs.model_params]
    rescale = params.rescale_method if params.rescale else "none"

    def prune(tau: torch.Tensor, position: int, density: float, ctx: TensorContext) -> torch.Tensor:
        if density >= 1.0:
            return tau
        return magprune(
            tau,
            density,
            half_spread(epsilons[position], params.epsilon_span),
            key=dare_key(ctx.seed, ctx.model_index(position), ctx.name),
            offset=ctx.offset,
            rescale=rescale,
        )

    return sparsified_task_vectors(inputs, ctx, prune)


def della(inputs: MergeInputs, params: DellaParams, ctx: TensorContext) -> torch.Tensor:
    """θ₀ + λ · disjoint mean of the MagPruned task vectors that agree with the elected sign."""
    base, taus, weights = _pruned(inputs, params, ctx)
    merged = consensus_combination(taus, weights, params)
    return torch.add(base, merged, alpha=params.lambda_)


def della_linear(
    inputs: MergeInputs, params: DellaLinearParams, ctx: TensorContext
) -> torch.Tensor:
    """θ₀ + λ Σ wᵢ MagPrune(τᵢ) (÷ Σ wᵢ when ``normalize``)."""
    base, taus, weights = _pruned(inputs, params, ctx)
    merged = linear_combination(taus, weights, params.normalize)
    return torch.add(base, merged, alpha=params.lambda_)


def _check_window(params: MethodParams, model_params: tuple[DellaModelParams, ...]) -> None:
    check_density(params, model_params)
    span: EpsilonSpan = getattr(params, "epsilon_span", "width")
    for position, p in enumerate(model_params):
        density = p.density if p.density is not None else 1.0
        spread = half_spread(p.epsilon, span)
        if density < 1.0 and not (density - spread > 0.0 and density + spread < 1.0):
            reach = "epsilon/2" if span == "width" else "epsilon"
            raise ValueError(
                f"model {position}: density ± {reach} must lie in (0, 1), got density "
                f"{density} and epsilon {p.epsilon}; lower epsilon"
            )


_PAPER = (
    "Deep et al., DELLA-Merging: Reducing Interference in Model Merging through "
    "Magnitude-Based Sampling, 2024 (arXiv 2406.11617)"
)


def _row_local(params: MagPruneParams) -> bool:
    # Ranks are taken within each row; an L1 rescale restores the whole tensor's norm and a
    # majority vote on zero-sum entries looks at the whole tensor's signs.
    l1 = params.rescale and params.rescale_method == "l1"
    return not l1 and getattr(params, "zero_sign", "positive") == "positive"


_MERGEKIT = {"density": 1.0, "epsilon_span": "half_width", "rescale_method": "l1"}

register(
    MethodSpec(
        name="della",
        title="DELLA",
        paper=_PAPER + "; sign election and disjoint mean from TIES-Merging (arXiv 2306.01708)",
        params=DellaParams,
        model_params=DellaModelParams,
        kernel=della,
        needs_base=True,
        description="Drops task-vector entries at random, large magnitudes less often than "
        "small ones (MagPrune), rescales the survivors, then elects a sign per entry and "
        "averages the entries that agree with it.",
        references={
            "mergekit": {**_MERGEKIT, "weighted_election": True, "divisor": "weight_sum"},
        },
        check=_check_window,
        row_local=_row_local,
    )
)

register(
    MethodSpec(
        name="della_linear",
        title="DELLA + task arithmetic",
        paper=_PAPER,
        params=DellaLinearParams,
        model_params=DellaModelParams,
        kernel=della_linear,
        needs_base=True,
        description="Drops task-vector entries at random, large magnitudes less often than "
        "small ones (MagPrune), rescales the survivors, then adds their weighted sum to the "
        "base.",
        references={"mergekit": _MERGEKIT},
        check=_check_window,
        row_local=_row_local,
    )
)
