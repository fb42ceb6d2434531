"""Model Breadcrumbs: task vectors trimmed on both sides of their magnitude distribution.

Davari & Belilovsky, "Model Breadcrumbs: Scaling Multi-Task Model Merging with Sparse
Masks", ECCV 2024 (arXiv 2312.06795). Per layer, the entries of each task vector τᵢ are
ranked by |τ|; the largest ones (outliers, the right tail, a fraction ``gamma``) and the
smallest ones (negligible perturbations, the left tail) are masked out, and the masked task
vectors are added to the base: θ = θ₀ + λ Σ wᵢ mask(τᵢ).

Here ``density`` is the fraction kept and ``gamma`` the fraction of largest entries dropped,
as in mergekit's ``magnitude_outliers``. The paper's mask always drops the top ``gamma``
(``outlier_rule: always``: at most 1 − gamma survives, and density 1 still drops the
outliers). mergekit keeps ``density`` first (``outlier_rule: fit_density``): when density +
gamma exceeds 1 fewer outliers are dropped, and density ≥ 1 leaves τ untouched.

``breadcrumbs_ties`` (mergekit's) follows the trim with TIES' sign election and disjoint
mean (Yadav et al., arXiv 2306.01708). ``reference: mergekit`` elects signs on wᵢ·τᵢ,
divides by the agreeing weights, keeps density first and does not normalize the TIES form.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from merge_kernels.methods.kernel import MergeInputs, MethodParams, TensorContext
from merge_kernels.methods.steps import l1_rescale_, magnitude_window_trim
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

OutlierRule = Literal["always", "fit_density"]


class BreadcrumbsModelParams(SparseModelParams):
    """Per-model parameters of Model Breadcrumbs."""

    gamma: float = Field(
        0.01,
        ge=0.0,
        le=1.0,
        description="Fraction of this model's task-vector entries with the largest magnitude "
        "to drop (the outliers), in [0, 1].",
    )


class OutlierTrimParams(MethodParams):
    """How the two-sided trim resolves its two fractions, and whether it rescales."""

    outlier_rule: OutlierRule = Field(
        "always",
        description="`always`: drop the top gamma, keep at most density of what follows "
        "(the paper); `fit_density`: keep density, dropping fewer outliers when density + "
        "gamma > 1, and nothing at density 1 (mergekit).",
    )
    rescale: bool = Field(
        False, description="Scale each trimmed task vector back to its L1 norm (mergekit)."
    )
    int8_mask: bool = Field(
        False, description="Accepted for mergekit configs; masks are boolean here, so no effect."
    )


class BreadcrumbsParams(TaskArithmeticParams, OutlierTrimParams):
    """Parameters of Model Breadcrumbs (trim, then task arithmetic)."""


class BreadcrumbsTiesParams(ConsensusParams, OutlierTrimParams):
    """Parameters of Model Breadcrumbs followed by TIES' election and disjoint mean."""


def breadcrumb_counts(
    numel: int, density: float, gamma: float, rule: OutlierRule
) -> tuple[int, int]:
    """(entries dropped from the top, entries kept after them) for one tensor.

    ``fit_density`` is mergekit's: keep ⌊density·n⌋ and drop ⌊gamma·n⌋ only while room is
    left. ``always`` drops ⌊gamma·n⌋ and keeps ⌊density·n⌋ of the rest, at most all of it.
    """
    target = min(numel, int(density * numel))
    top = min(numel, int(gamma * numel))
    if rule == "fit_density":
        return min(top, numel - target), target
    return top, min(target, numel - top)


def _trimmed(
    inputs: MergeInputs, params: OutlierTrimParams, ctx: TensorContext
) -> tuple[torch.Tensor, list[torch.Tensor], list[float]]:
    """The base, each model's window-trimmed task vector, and each model's weight."""
    gammas = [float(getattr(p, "gamma", 0.0)) for p in inputs.model_params]

    def trim(tau: torch.Tensor, position: int, density: float, ctx: TensorContext) -> torch.Tensor:
        if density >= 1.0 and params.outlier_rule == "fit_density":
            return tau  # mergekit returns the task vector untouched, gamma or not
        top, keep = breadcrumb_counts(tau.numel(), density, gammas[position], params.outlier_rule)
        if top == 0 and keep == tau.numel():
            return tau
        trimmed = magnitude_window_trim(tau, top, keep)
        return l1_rescale_(trimmed, tau) if params.rescale else trimmed

    return sparsified_task_vectors(inputs, ctx, trim)


def breadcrumbs(inputs: MergeInputs, params: BreadcrumbsParams, ctx: TensorContext) -> torch.Tensor:
    """θ₀ + λ Σ wᵢ window(τᵢ) (÷ Σ wᵢ when ``normalize``)."""
    base, taus, weights = _trimmed(inputs, params, ctx)
    merged = linear_combination(taus, weights, params.normalize)
    return torch.add(base, merged, alpha=params.lambda_)


def breadcrumbs_ties(
    inputs: MergeInputs, params: BreadcrumbsTiesParams, ctx: TensorContext
) -> torch.Tensor:
    """θ₀ + λ · disjoint mean of the window-trimmed task vectors that agree in sign."""
    base, taus, weights = _trimmed(inputs, params, ctx)
    merged = consensus_combination(taus, weights, params)
    return torch.add(base, merged, alpha=params.lambda_)


_PAPER = "Davari & Belilovsky, Model Breadcrumbs: Scaling Multi-Task Model Merging with "
_PAPER += "Sparse Masks, ECCV 2024 (arXiv 2312.06795)"
_MERGEKIT = {"density": 1.0, "outlier_rule": "fit_density"}

register(
    MethodSpec(
        name="breadcrumbs",
        title="Model Breadcrumbs",
        paper=_PAPER,
        params=BreadcrumbsParams,
        model_params=BreadcrumbsModelParams,
        kernel=breadcrumbs,
        needs_base=True,
        description="Drops each task vector's largest-magnitude entries (a fraction gamma) "
        "and its smallest ones, keeping a fraction density, then adds the weighted sum of "
        "what is left to the base.",
        references={"mergekit": _MERGEKIT},
        check=check_density,
    )
)

register(
    MethodSpec(
        name="breadcrumbs_ties",
        title="Model Breadcrumbs + TIES",
        paper=_PAPER + "; sign election and disjoint mean from TIES-Merging (arXiv 2306.01708)",
        params=BreadcrumbsTiesParams,
        model_params=BreadcrumbsModelParams,
        kernel=breadcrumbs_ties,
        needs_base=True,
        description="Trims each task vector on both sides of its magnitude distribution as "
        "Model Breadcrumbs does, then elects a sign per entry and averages the entries that "
        "agree with it.",
        references={
            "mergekit": {
                **_MERGEKIT,
                "weighted_election": True,
                "divisor": "weight_sum",
                "normalize": False,
            },
        },
        check=check_density,
    )
)
