"""Arcee Fusion: keep the other model's changes only where they matter most.

mergekit 0.1.5 (``merge_methods/arcee_fusion.py``; "Meet MergeKit v0.1: Arcee Fusion",
arcee.ai blog). With θ₀ the base and θ₁ the one other model, per tensor:

1. Importance: ``|θ₁ − θ₀| · KL(softmax(θ₁) ‖ softmax(θ₀))``, the softmaxes over the last
   dimension (each row of a matrix, the whole vector of a 1-D tensor), 1e-8 added to both
   before the KL sum, one KL value per row.
2. Dynamic threshold: ``median + 1.5·(Q3 − Q1)`` of the importance scores, each quantile
   q being the sorted scores' entry ⌊q·(n − 1)⌋.
3. Entries whose importance reaches the threshold take θ₁'s value; the rest keep θ₀'s.

mergekit estimates the quantiles of a tensor of more than 10⁶ entries from 10⁶ entries
drawn at random (an unseeded draw, so its result varies from run to run); tureen takes the
exact order statistics of every entry, which are what that draw estimates and which equal
mergekit's on tensors up to 10⁶ entries.

The mask is the same on every device, bit for bit: the one KL value per row is computed on
the CPU (transcendental functions and reductions round differently on CUDA), and every
other step is exact on any device: elementwise IEEE arithmetic, comparisons, and order
statistics (an entry of the tensor, the same one whatever the algorithm). The steps run in
the inputs' dtype, in mergekit's order, so that ``compute_dtype: dtype`` runs this kernel
as it is on bfloat16 or float16 inputs (the mask, and so the result, is float32 there,
as in mergekit).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy
import torch

from merge_kernels.methods.kernel import MergeInputs, MethodParams, NoModelParams, TensorContext
from merge_kernels.registry import MethodSpec, register

_KL_EPS = 1e-8  # added to both distributions, as mergekit does
_IQR_FACTOR = 1.5


class ArceeFusionParams(MethodParams):
    """Arcee Fusion has no parameters."""


def row_divergences(model: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """KL(softmax(θ₁) ‖ softmax(θ₀)) of each row (along the last axis), shape (..., 1).

    Computed on the CPU whatever the inputs' device: the exponentials, logarithms and row
    sums are the only steps whose last bits differ between CPU and CUDA, and a score a bit
    off could fall on the other side of the threshold.
    """
    model, base = model.cpu(), base.cpu()
    p = torch.softmax(model, dim=-1) + _KL_EPS
    q = torch.softmax(base, dim=-1) + _KL_EPS
    return torch.sum(p * torch.log(p / q), dim=-1, keepdim=True)


def importance_scores(model: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """|θ₁ − θ₀| times the KL divergence of the rows' softmaxes (one value per row)."""
    kl = row_divergences(model, base).to(model.device)
    return (model - base).abs() * kl


def dynamic_threshold(scores: torch.Tensor) -> torch.Tensor:
    """``median + 1.5·IQR`` of the scores, quantile q at sorted index ⌊q·(n − 1)⌋."""
    flat = scores.reshape(-1)
    last = flat.numel() - 1
    q1, median, q3 = order_statistics(flat, (last // 4, last // 2, 3 * last // 4))
    return median + _IQR_FACTOR * (q3 - q1)


def order_statistics(flat: torch.Tensor, positions: Sequence[int]) -> list[torch.Tensor]:
    """The entries at ``positions`` (from 0) of ``flat`` sorted ascending, as 0-d tensors.

    The same entries on every device, by whatever algorithm is fastest there: on the CPU one
    introselect for all positions (``numpy.partition``; bfloat16, which numpy lacks, is
    widened to float32 exactly), on CUDA one sort (its ``kthvalue`` gives a whole row to one
    thread block, seconds for a tensor of hundreds of millions of entries).
    """
    if flat.device.type != "cpu":
        ordered = torch.sort(flat).values
        return [ordered[i] for i in positions]
    exact = flat.float() if flat.dtype == torch.bfloat16 else flat
    parted = numpy.partition(exact.numpy(), list(positions))
    return [torch.tensor(parted[i].item(), dtype=flat.dtype) for i in positions]


def arcee_fusion(
    inputs: MergeInputs, params: ArceeFusionParams, ctx: TensorContext
) -> torch.Tensor:
    """The base, with the other model's values where their importance passes the threshold."""
    if inputs.base is None or len(inputs.models) != 1:
        raise ValueError("arcee_fusion merges exactly two models: the base and one other")
    base, model = inputs.base, inputs.models[0]
    if base.numel() == 0:
        return base.clone()
    scores = importance_scores(model, base)
    mask = (scores >= dynamic_threshold(scores)).float()
    return base + (model - base) * mask


register(
    MethodSpec(
        name="arcee_fusion",
        title="Arcee Fusion",
        paper="Arcee AI, Meet MergeKit v0.1: Arcee Fusion (arcee.ai blog, 2025), "
        "as in mergekit's merge_methods/arcee_fusion.py",
        params=ArceeFusionParams,
        model_params=NoModelParams,
        kernel=arcee_fusion,
        needs_base=True,
        description="Takes the other model's value only where the importance |Δ|·KL(softmax) "
        "reaches median + 1.5·IQR of the tensor's importance scores, keeping the base "
        "elsewhere. Needs base_model and exactly one other model.",
        min_models=1,
        max_models=1,
    )
)
