"""SCE: select, calculate, erase, the fusion step of FuseChat.

Wan et al., "FuseChat: Knowledge Fusion of Chat Models", 2024 (arXiv 2408.07990), as
implemented by mergekit's ``sce``. Per tensor, with task vectors τᵢ = θᵢ − θ₀:

1. Select: keep the entries whose variance across the task vectors is among the top
   ``select_topk`` fraction; the others are zeroed in every τᵢ.
2. Calculate: each model's weight is the mean of its selected τᵢ², normalized to sum to 1
   (uniform when every task vector is zero).
3. Erase: elect the sign of Σᵢ τᵢ per entry (+ on a zero vote) and drop the entries of the
   minority sign; the result is the weighted mean of the agreeing entries.

θ = θ₀ + Σᵢ wᵢ mᵢ τᵢ / max(Σᵢ wᵢ mᵢ, 1e-6), with mᵢ the agreement mask.

mergekit (the authors' code) takes k = ⌊select_topk · #entries of nonzero variance⌋
(``select_among: nonzero_variance``); the paper's text selects the top fraction of all
entries (``select_among: all``). Ties in variance are resolved by flat index.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from merge_kernels.methods.kernel import MergeInputs, MethodParams, NoModelParams, TensorContext
from merge_kernels.methods.magnitude_select import top_k_magnitude_mask
from merge_kernels.methods.steps import (
    agreement_mask,
    disjoint_mean,
    elect_sign,
    task_vector,
)
from merge_kernels.registry import MethodSpec, register

_WEIGHT_EPS = 1e-6  # mergekit's floor for the weight total and the agreeing weights


class SceParams(MethodParams):
    """Parameters of SCE."""

    select_topk: float = Field(
        1.0,
        ge=0.0,
        le=1.0,
        description="Fraction of entries to keep, those of highest variance across the "
        "task vectors; 1 keeps all, 0 none.",
    )
    select_among: Literal["nonzero_variance", "all"] = Field(
        "nonzero_variance",
        description="What select_topk is a fraction of: the entries whose variance is not 0 "
        "(mergekit) or all entries (the paper's text).",
    )
    int8_mask: bool = Field(
        False, description="Accepted for mergekit configs; masks are boolean here, so no effect."
    )


def variance_selection(taus: list[torch.Tensor], fraction: float, among: str) -> torch.Tensor:
    """The entries of highest variance across ``taus`` (population variance), as a bool mask."""
    # A running mean (as torch.var's) is exactly x when every model changed an entry by the
    # same x, so such entries have variance exactly 0 and count as unchanged-in-variance.
    mean = taus[0].clone()
    for count, tau in enumerate(taus[1:], start=2):
        mean.add_(tau - mean, alpha=1.0 / count)
    variance = torch.zeros_like(mean)
    for tau in taus:
        variance.addcmul_(tau - mean, tau - mean)
    variance.div_(len(taus))
    if fraction <= 0.0:
        return torch.zeros(variance.shape, dtype=torch.bool, device=variance.device)
    population = int(torch.count_nonzero(variance)) if among == "nonzero_variance" else mean.numel()
    return top_k_magnitude_mask(variance, int(population * fraction))


def sce_weights(taus: list[torch.Tensor]) -> list[float]:
    """Each model's share of the mean squared task-vector entries (uniform if all are 0)."""
    squares = [float(tau.square().mean()) if tau.numel() else 0.0 for tau in taus]
    total = sum(squares)
    if abs(total) < _WEIGHT_EPS:
        return [1.0 / len(taus)] * len(taus)
    return [square / total for square in squares]


def sce(inputs: MergeInputs, params: SceParams, ctx: TensorContext) -> torch.Tensor:
    """θ₀ + the SCE-weighted mean of the selected task-vector entries of the majority sign."""
    if inputs.base is None:
        raise ValueError("sce needs the base model's tensor")
    taus = [task_vector(model, inputs.base) for model in inputs.models]
    if params.select_topk < 1.0:
        selected = variance_selection(taus, params.select_topk, params.select_among)
        taus = [tau.mul_(selected) for tau in taus]
    gamma = elect_sign(taus, method="total", zero_sign="positive")
    masks = [agreement_mask(tau, gamma) for tau in taus]
    weights = sce_weights(taus)
    merged = disjoint_mean(taus, weights, masks, divisor="none")
    # Not disjoint_mean's weight_sum divisor: mergekit floors the agreeing weights at 1e-6
    # rather than replacing only a zero total, which differs when the weights are tiny.
    total = torch.zeros_like(merged)
    for weight, mask in zip(weights, masks, strict=True):
        total.add_(mask, alpha=weight)
    return torch.add(inputs.base, merged.div_(total.clamp_(min=_WEIGHT_EPS)))


register(
    MethodSpec(
        name="sce",
        title="SCE (select, calculate, erase)",
        paper="Wan et al., FuseChat: Knowledge Fusion of Chat Models, 2024 (arXiv 2408.07990)",
        params=SceParams,
        model_params=NoModelParams,
        kernel=sce,
        needs_base=True,
        description="Keeps the task-vector entries of highest variance across models, weights "
        "each model by its mean squared task vector, and averages the entries that agree "
        "with the majority sign.",
        references={"paper": {"select_among": "all"}},
    )
)
