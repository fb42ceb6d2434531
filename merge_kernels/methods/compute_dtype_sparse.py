"""DELLA, Model Breadcrumbs and SCE in the recipe's dtype, in mergekit 0.1.5's order of operations.

The companion of :mod:`merge_kernels.methods.compute_dtype` (``compute_dtype: dtype``) for
the sparsifying methods. mergekit computes them in the dtype its inputs were loaded in
(``mergekit/merge_methods/generalized_task_arithmetic.py``, ``sparsify.py``, ``sce.py``):

- ``breadcrumbs``, ``breadcrumbs_ties``: τᵢ = θᵢ − θ₀ in the dtype; the magnitudes are
  ranked in float32 (``magnitude_outliers`` sorts ``|τ|.float()`` on the CPU), the window
  mask is applied and the optional L1 rescale computed in the dtype;
- ``della``, ``della_linear``: ``della_magprune`` ranks |τ| per row and builds the keep
  probabilities from the ranks in a *work dtype*: the dtype itself for bfloat16, float32
  for float16 and float32 (mergekit's CPU rule, ``torch.bernoulli`` having no float16 CPU
  kernel); so for bfloat16 the ranks, their normalization and the probabilities are all
  rounded to bfloat16. The drop and the L1 rescale run in the work dtype and the pruned τ
  is rounded back to the dtype;
- then, for all four, ``GeneralizedTaskArithmeticMerge.merge_group`` in the dtype: the
  weights rounded to the dtype, wᵢ·τᵢ, the sign vote on them, the masked sums, the divisor,
  λ and θ₀ + the result, each rounded (:func:`combine_in_dtype`);
- ``sce``: everything in the dtype: the variance over the models (``torch.var``), the top
  fraction by variance, the sign vote on the unweighted τ, the weights (the mean of τᵢ² in
  the dtype, divided by their sum taken as a Python float), the weighted sums and the
  division by the agreeing weights floored at 1e-6.

tureen keeps its own choices where mergekit's are not determined by the arithmetic: DELLA's
keep decisions come from tureen's keyed masks (mergekit draws from torch's global
generator), and magnitudes or variances tied at a trim edge are ranked by flat index
(mergekit's ``sort``/``argsort``/``topk`` leave that order unspecified). tureen's options
(the paper's keep window, inverse-probability rescale, a frequency vote, a count divisor,
``select_among``...) keep working, each computed in the same dtype.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from merge_kernels.methods.breadcrumbs import OutlierTrimParams, breadcrumb_counts
from merge_kernels.methods.della import MagPruneParams, half_spread
from merge_kernels.methods.kernel import MergeInputs, ModelParams, TensorContext
from merge_kernels.methods.magnitude_select import top_k_magnitude_mask
from merge_kernels.methods.random_mask import dare_key, keep_mask_with_probabilities
from merge_kernels.methods.sce import SceParams
from merge_kernels.methods.steps import (
    agreement_mask,
    elect_sign,
    l1_rescale_,
)
from merge_kernels.methods.task_arithmetic import ConsensusParams

_ZERO_WEIGHT_SUM = 1e-8  # below this |Σ wᵢ| counts as 0 and is not divided by (mergekit)
_SCE_WEIGHT_EPS = 1e-6  # mergekit's floor for SCE's weight total and agreeing weights

# One model's sparsified task vector in the dtype: (τ, position among the models, ctx) -> τ'
DtypeSparsifier = Callable[[torch.Tensor, int, TensorContext], torch.Tensor]


def combine_in_dtype(
    base: torch.Tensor,
    taus: Sequence[torch.Tensor],
    model_params: Sequence[ModelParams],
    params: Any,
) -> torch.Tensor:
    """θ₀ + λ · the (consensus or plain) weighted sum of ``taus``, in their dtype.

    mergekit's ``merge_group`` after its sparsification, step by step: the weights are a
    tensor of the dtype, each product, the vote, the masked sums and the divisions round to
    it. ``params`` is a :class:`ConsensusParams` (sign election and disjoint mean) or has
    ``normalize`` and ``lambda_`` (the weighted sum, divided by Σ wᵢ when normalizing).
    """
    deltas = torch.stack(list(taus))
    weights = torch.tensor(
        [float(getattr(p, "weight", 1.0)) for p in model_params], dtype=deltas.dtype
    )
    while weights.dim() < deltas.dim():
        weights.unsqueeze_(-1)
    weighted = deltas * weights
    if isinstance(params, ConsensusParams):
        electors = weighted if params.weighted_election else deltas
        if params.majority_sign_method == "total":
            vote = electors.sum(dim=0)
        else:
            vote = electors.sign().sum(dim=0)
        gamma = elect_sign([vote], zero_sign=params.zero_sign).to(deltas.dtype)
        mask = agreement_mask(electors, gamma)
        mixed = (weighted * mask).sum(dim=0)
        divisor_rule = params.effective_divisor()
        if divisor_rule == "weight_sum":
            divisor = (weights * mask).sum(dim=0)
            divisor[divisor == 0] = 1
            mixed /= divisor
        elif divisor_rule == "count":
            mixed /= mask.sum(dim=0).clamp(min=1).to(deltas.dtype)
    else:
        mixed = weighted.sum(dim=0)
        if params.normalize:
            divisor = weights.sum(dim=0)
            divisor[divisor.abs() < _ZERO_WEIGHT_SUM] = 1
            mixed /= divisor
    if params.lambda_ != 1:
        mixed *= params.lambda_
    return (base + mixed).to(base.dtype)


def _sparsified_merge(
    inputs: MergeInputs, params: Any, ctx: TensorContext, sparsify: DtypeSparsifier
) -> torch.Tensor:
    if inputs.base is None:
        raise ValueError("task-vector methods need the base model's tensor")
    base = inputs.base
    taus = [sparsify(model - base, position, ctx) for position, model in enumerate(inputs.models)]
    return combine_in_dtype(base, taus, inputs.model_params, params)


def _density(inputs: MergeInputs, position: int) -> float:
    return getattr(inputs.model_params[position], "density", None) or 1.0


def breadcrumbs_in_dtype(inputs: MergeInputs, params: Any, ctx: TensorContext) -> torch.Tensor:
    """``breadcrumbs`` and ``breadcrumbs_ties`` as mergekit computes them in the dtype."""
    assert isinstance(params, OutlierTrimParams)

    def trim(tau: torch.Tensor, position: int, ctx: TensorContext) -> torch.Tensor:
        density = _density(inputs, position)
        if density >= 1.0 and params.outlier_rule == "fit_density":
            return tau  # mergekit returns the task vector untouched, gamma or not
        gamma = float(getattr(inputs.model_params[position], "gamma", 0.0))
        top, keep = breadcrumb_counts(tau.numel(), density, gamma, params.outlier_rule)
        if top == 0 and keep == tau.numel():
            return tau
        # Ranked in float32 (exact for every dtype's magnitudes), masked in the dtype.
        magnitudes = tau.float()
        window = top_k_magnitude_mask(magnitudes, top + keep)
        if top:  # top-k sets are nested, so this removes exactly the top entries
            window &= ~top_k_magnitude_mask(magnitudes, top)
        trimmed = tau * window
        return l1_rescale_(trimmed, tau) if params.rescale else trimmed

    return _sparsified_merge(inputs, params, ctx, trim)


def magprune_work_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype mergekit's ``della_magprune`` ranks, drops and rescales in: bfloat16 stays,
    every other dtype is widened or narrowed to float32 (its rule on the CPU, where the
    reference runs)."""
    return dtype if dtype == torch.bfloat16 else torch.float32


def magprune_probabilities_in(
    tau: torch.Tensor, density: float, spread: float, work: torch.dtype
) -> torch.Tensor:
    """MagPrune's keep probabilities computed in ``work`` as mergekit does, rows on axis 1.

    ``rank + 1``, its min-max normalization and ``(density − spread) + norm · 2 · spread``
    each round to ``work``. Ranks come from a stable sort (ties in magnitude ranked by flat
    index). A row of one entry keeps it with probability ``density`` (mergekit divides 0 by
    0 there).
    """
    rows = tau.reshape(1, -1) if tau.dim() < 2 else tau
    n = rows.shape[1]
    if n < 2:
        return torch.full(tau.shape, density, dtype=work, device=tau.device)
    order = torch.sort(rows.abs(), dim=1, stable=True).indices
    ranks = order.argsort(dim=1).to(work) + 1
    low = ranks.min(dim=1, keepdim=True).values
    high = ranks.max(dim=1, keepdim=True).values
    rank_norm = ((ranks - low) / (high - low)).clamp(0, 1)
    probabilities = (density - spread) + rank_norm * 2 * spread
    return probabilities.clamp(0.0, 1.0).reshape(tau.shape)


def della_in_dtype(inputs: MergeInputs, params: Any, ctx: TensorContext) -> torch.Tensor:
    """``della`` and ``della_linear`` as mergekit computes them in the dtype."""
    assert isinstance(params, MagPruneParams)
    rescale = params.rescale_method if params.rescale else "none"

    def prune(tau: torch.Tensor, position: int, ctx: TensorContext) -> torch.Tensor:
        density = _density(inputs, position)
        if density >= 1.0:
            return tau
        epsilon = float(getattr(inputs.model_params[position], "epsilon", 0.0))
        work = magprune_work_dtype(tau.dtype)
        probabilities = magprune_probabilities_in(
            tau, density, half_spread(epsilon, params.epsilon_span), work
        )
        key = dare_key(ctx.seed, ctx.model_index(position), ctx.name)
        kept = keep_mask_with_probabilities(key, probabilities.float(), offset=ctx.offset)
        widened = tau.to(work)
        if rescale == "inverse_probability":
            pruned = torch.where(kept, widened / probabilities, 0.0)
        else:
            pruned = widened * kept.to(work)
            if rescale == "l1":
                pruned = l1_rescale_(pruned, widened)
        return pruned.to(tau.dtype)

    return _sparsified_merge(inputs, params, ctx, prune)


def sce_in_dtype(inputs: MergeInputs, params: Any, ctx: TensorContext) -> torch.Tensor:
    """mergekit's ``sce_merge`` in the dtype (its weights ignore the recipe's ``weight``)."""
    assert isinstance(params, SceParams)
    base = inputs.base
    if base is None:
        raise ValueError("sce needs the base model's tensor")
    taus = torch.stack([model - base for model in inputs.models])
    if params.select_topk < 1.0:
        taus = taus * _variance_selection_in(taus, params.select_topk, params.select_among)
    vote = taus.sum(dim=0)
    gamma = elect_sign([vote], zero_sign="positive").to(taus.dtype)
    erase = agreement_mask(taus, gamma)
    weights = _sce_weights_in(taus)
    while weights.dim() < taus.dim():
        weights = weights.unsqueeze(-1)
    erased = weights * erase
    merged = (taus * erased).sum(dim=0)
    return base + merged / erased.sum(dim=0).clamp(min=_SCE_WEIGHT_EPS)


def _variance_selection_in(taus: torch.Tensor, fraction: float, among: str) -> torch.Tensor:
    """The entries of highest variance across the models (variance in the dtype), as a
    mask of the dtype; ties in variance ranked by flat index."""
    if fraction <= 0.0:
        return torch.zeros_like(taus[0])
    variance = torch.var(taus, dim=0, unbiased=False)
    population = int(torch.count_nonzero(variance)) if among == "nonzero_variance" else None
    k = int((variance.numel() if population is None else population) * fraction)
    return top_k_magnitude_mask(variance.float(), k).to(taus.dtype)


def _sce_weights_in(taus: torch.Tensor) -> torch.Tensor:
    """mergekit's ``sce_weight``: the mean of each τᵢ² in the dtype over their sum (a Python
    float), or uniform when that sum is below 1e-6."""
    squares = taus.square().reshape(taus.shape[0], -1).mean(dim=1)
    total = torch.sum(squares).item()
    if abs(total) < _SCE_WEIGHT_EPS:
        return torch.ones_like(squares) / squares.shape[0]
    return squares / total
