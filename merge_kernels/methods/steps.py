"""The steps that the task-vector methods (task arithmetic, TIES, DARE, DELLA, ...) are built from.

Each step is a small pure function on float32 tensors, so each method is a composition of
the same pieces rather than a copy of a loop: task vectors (τᵢ = θᵢ − θ₀), magnitude trim
(TIES) and its two-sided form (Model Breadcrumbs), random drop and rescale (DARE), the L1
rescale (mergekit), sign election and the disjoint mean (TIES).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch

from merge_kernels.methods.magnitude_select import (
    MagnitudeThreshold,
    apply_threshold_mask,
    top_k_magnitude_mask,
)
from merge_kernels.methods.random_mask import dare_key, keep_mask

TieRule = Literal["exact_k", "threshold"]
SignMethod = Literal["total", "frequency"]
ZeroSign = Literal["positive", "majority"]
Divisor = Literal["count", "weight_sum", "none"]
Rescale = Literal["inverse_density", "l1", "none"]

_NORM_EPS = 1e-7  # below this an L1 norm counts as zero (mergekit's tolerance)


def task_vector(model: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """τ = θ − θ₀, as a new tensor."""
    return torch.sub(model, base)


def weighted_sum(tensors: Sequence[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    """Σ wᵢ·xᵢ, accumulated in place into one new tensor (no stacked copy of the inputs)."""
    if not tensors:
        raise ValueError("weighted_sum needs at least one tensor")
    out = torch.mul(tensors[0], weights[0])
    for tensor, weight in zip(tensors[1:], weights[1:], strict=True):
        out.add_(tensor, alpha=weight)
    return out


def trim_count(density: float, numel: int) -> int:
    """How many entries a trim to ``density`` keeps: ⌊density·numel⌋, as PEFT and mergekit."""
    return min(numel, int(density * numel))


def magnitude_trim(tau: torch.Tensor, density: float, *, ties: TieRule = "exact_k") -> torch.Tensor:
    """TIES step 1 on one tensor: keep the ⌊density·n⌋ entries of largest |τ|, zero the rest.

    Ties at the threshold: ``exact_k`` keeps exactly k, choosing the tied entries with the
    lowest flat (row-major) index; ``threshold`` keeps every |τ| ≥ the k-th magnitude, as
    the TIES paper does.
    """
    if density >= 1.0:
        return tau.clone()
    mask = top_k_magnitude_mask(tau, trim_count(density, tau.numel()), ties=ties)
    return tau * mask


def magnitude_trim_given(
    tau: torch.Tensor, threshold: MagnitudeThreshold, ties_before: int, *, ties: TieRule
) -> torch.Tensor:
    """TIES step 1 with a threshold found beforehand (model-wide trim or a chunked tensor).

    ``ties_before`` counts the entries equal to the threshold that precede this tensor in
    the flat order the threshold was computed over.
    """
    mask, _ = apply_threshold_mask(tau.reshape(-1), threshold, ties_before, ties=ties)
    return tau * mask.reshape(tau.shape)


def random_drop(
    tau: torch.Tensor,
    density: float,
    *,
    seed: int,
    model_index: int,
    tensor_name: str,
    offset: int = 0,
    rescale: Rescale = "inverse_density",
) -> torch.Tensor:
    """DARE: keep each entry with probability ``density`` and rescale the survivors.

    The mask is a pure function of (seed, model index, tensor name, flat element index),
    so chunks, devices and thread counts all give the same bits. ``inverse_density``
    divides by density (the paper and PEFT); ``l1`` scales the dropped tensor back to the
    original's L1 norm (mergekit); ``none`` leaves the survivors as they are.

    Raises:
        ValueError: density outside (0, 1].
    """
    if not 0.0 < density <= 1.0:
        raise ValueError(f"density must be in (0, 1], got {density}")
    if density == 1.0:
        return tau.clone()
    key = dare_key(seed, model_index, tensor_name)
    mask = keep_mask(key, density, tau.numel(), offset=offset, device=tau.device)
    dropped = tau * mask.reshape(tau.shape)
    if rescale == "inverse_density":
        dropped.div_(density)
    elif rescale == "l1":
        l1_rescale_(dropped, tau)
    return dropped


def l1_rescale_(sparse: torch.Tensor, original: torch.Tensor) -> torch.Tensor:
    """Scale ``sparse`` in place so its L1 norm is the original's (mergekit's ``rescale``).

    Left as it is when either norm is below 1e-7 (mergekit's tolerance), so an all-dropped
    or all-zero task vector stays zero instead of becoming NaN.
    """
    before = original.abs().sum()
    after = sparse.abs().sum()
    if before >= _NORM_EPS and after >= _NORM_EPS:
        sparse.mul_(before / after)
    return sparse


def magnitude_window_trim(
    tau: torch.Tensor, top: int, keep: int, *, ties: TieRule = "exact_k"
) -> torch.Tensor:
    """Model Breadcrumbs' two-sided trim: drop the ``top`` largest |τ|, keep the next ``keep``.

    The entries ranked ``top + 1 … top + keep`` by magnitude survive; ties at either edge
    are resolved as in :func:`magnitude_trim` (``exact_k``: lowest flat index first, so
    exactly ``keep`` entries survive).

    Raises:
        ValueError: ``top`` or ``keep`` negative, or ``top + keep`` above ``tau.numel()``.
    """
    numel = tau.numel()
    if top < 0 or keep < 0 or top + keep > numel:
        raise ValueError(f"cannot drop {top} and keep {keep} of {numel} entries")
    upper = top_k_magnitude_mask(tau, top + keep, ties=ties)
    if top:
        # Top-k sets are nested under one tie rule, so this removes exactly the top entries.
        upper &= ~top_k_magnitude_mask(tau, top, ties=ties)
    return tau * upper


def elect_sign(
    candidates: Sequence[torch.Tensor],
    *,
    method: SignMethod = "total",
    zero_sign: ZeroSign = "positive",
) -> torch.Tensor:
    """TIES step 2: the elected sign γ per entry, as float32 in {−1, +1}.

    ``total`` elects sign(Σᵢ τᵢ) (the paper's "mass"); ``frequency`` elects sign(Σᵢ sign τᵢ).
    Where the vote is zero, ``positive`` takes +1 (PEFT, mergekit); ``majority`` takes the
    sign of Σγ over the tensor (the paper), and −1 if that too is zero (the reference code
    then keeps the negative entries).
    """
    if method == "total":
        vote = weighted_sum(candidates, [1.0] * len(candidates))
    else:
        vote = weighted_sum([c.sign() for c in candidates], [1.0] * len(candidates))
    if zero_sign == "positive":
        return torch.where(vote >= 0, 1.0, -1.0).to(vote.dtype)
    gamma = vote.sign()
    fallback = gamma.sum().sign()
    # The reference code agrees on where(γ > 0, τ > 0, τ < 0): a γ still 0 after the
    # fallback counts as negative, so it becomes −1 here.
    fallback = fallback if fallback != 0 else fallback - 1
    return torch.where(gamma == 0, fallback, gamma)


def agreement_mask(candidate: torch.Tensor, gamma: torch.Tensor) -> torch.Tensor:
    """Entries of ``candidate`` whose sign is the elected γ ∈ {−1, +1}; zeros never agree."""
    return torch.mul(candidate, gamma) > 0


def disjoint_mean(
    values: Sequence[torch.Tensor],
    weights: Sequence[float],
    masks: Sequence[torch.Tensor],
    *,
    divisor: Divisor = "count",
) -> torch.Tensor:
    """TIES step 3: Σ of the agreeing wᵢ·τᵢ, divided per entry.

    ``count`` divides by how many models agree, at least 1 (the paper, PEFT);
    ``weight_sum`` divides by Σ of the agreeing weights, 1 where that is 0 (mergekit's
    ``normalize``); ``none`` does not divide.
    """
    total = torch.zeros_like(values[0])
    for value, weight, mask in zip(values, weights, masks, strict=True):
        total.add_(value * mask, alpha=weight)
    if divisor == "none":
        return total
    if divisor == "count":
        count = torch.zeros_like(total)
        for mask in masks:
            count.add_(mask)
        return total.div_(count.clamp_(min=1.0))
    weight_total = torch.zeros_like(total)
    for weight, mask in zip(weights, masks, strict=True):
        weight_total.add_(mask, alpha=weight)
    weight_total[weight_total == 0] = 1.0
    return total.div_(weight_total)
