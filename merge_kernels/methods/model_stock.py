"""Model Stock: interpolate towards the fine-tunes' average by the angle between them.

Jang, Yun & Han, "Model Stock: All we need is just a few fine-tuned models", ECCV 2024
(arXiv 2403.19522). Per layer, with k fine-tunes θᵢ of one base θ₀, let cos θ be the mean
cosine between the pairs of their offsets θᵢ − θ₀. The merge is the point on the segment
from θ₀ to the fine-tunes' average θ̄ = Σθᵢ/k closest to the (unknown) center of the
fine-tunes' distribution::

    t = k·cos θ / (1 + (k − 1)·cos θ),    θ = t·θ̄ + (1 − t)·θ₀

As in mergekit, each cosine's norm product is floored at 1e-6 and clamped to [−1, 1], and
where 1 + (k − 1)·cos θ is within 1e-6 of 0 (no finite estimate) the base is kept.
``filter_wise`` (mergekit's option) takes one angle per row (per vector along the last
axis, an output filter of a linear layer) instead of one per tensor; a tensor of fewer than
two axes is then one row.
"""

from __future__ import annotations

import torch
from pydantic import Field

from merge_kernels.methods.kernel import MergeInputs, MethodParams, NoModelParams, TensorContext
from merge_kernels.methods.steps import task_vector, weighted_sum
from merge_kernels.registry import MethodSpec, register

_NORM_FLOOR = 1e-6  # mergekit's floor for a cosine's norm product
_SINGULAR = 1e-6  # |1 + (k − 1)·cos θ| below this keeps the base


class ModelStockParams(MethodParams):
    """Parameters of Model Stock."""

    filter_wise: bool = Field(
        False,
        description="One angle per row (vector along the last axis) instead of one per "
        "tensor (mergekit's option; the paper uses one per layer).",
    )


def mean_pairwise_cosine(offsets: list[torch.Tensor]) -> torch.Tensor:
    """The mean cosine over all pairs of ``offsets``, along their last axis."""
    cosines = []
    for index, first in enumerate(offsets):
        for second in offsets[index + 1 :]:
            norms = torch.linalg.vector_norm(first, dim=-1) * torch.linalg.vector_norm(
                second, dim=-1
            )
            dot = (first * second).sum(dim=-1)
            cosines.append((dot / norms.clamp(min=_NORM_FLOOR)).clamp(-1.0, 1.0))
    return torch.stack(cosines).mean(dim=0)


def interpolation_ratio(cos_theta: torch.Tensor, count: int) -> torch.Tensor:
    """t = k·cos θ / (1 + (k − 1)·cos θ), and 0 where the denominator is (nearly) 0."""
    denominator = 1 + (count - 1) * cos_theta
    singular = denominator.abs() < _SINGULAR
    safe = torch.where(singular, torch.ones_like(denominator), denominator)
    return torch.where(singular, torch.zeros_like(cos_theta), (count * cos_theta) / safe)


def model_stock(inputs: MergeInputs, params: ModelStockParams, ctx: TensorContext) -> torch.Tensor:
    """t·θ̄ + (1 − t)·θ₀, with t from the mean angle between the fine-tunes' offsets."""
    if inputs.base is None:
        raise ValueError("model_stock needs the base model's tensor")
    if len(inputs.models) < 2:
        raise ValueError("model_stock needs at least two models besides the base")
    shape = inputs.base.shape
    if params.filter_wise and inputs.base.dim() >= 2:
        base, models = inputs.base, list(inputs.models)
    else:
        base = inputs.base.reshape(1, -1)
        models = [model.reshape(1, -1) for model in inputs.models]
    count = len(models)
    cos_theta = mean_pairwise_cosine([task_vector(model, base) for model in models])
    t = interpolation_ratio(cos_theta, count).unsqueeze(-1)
    average = weighted_sum(models, [1.0] * count).div_(count)
    return (t * average + (1 - t) * base).reshape(shape)


register(
    MethodSpec(
        name="model_stock",
        title="Model Stock",
        paper="Jang et al., Model Stock: All we need is just a few fine-tuned models, "
        "ECCV 2024 (arXiv 2403.19522)",
        params=ModelStockParams,
        model_params=NoModelParams,
        kernel=model_stock,
        needs_base=True,
        description="Moves from the base towards the fine-tunes' average by a ratio set by "
        "the angle between their task vectors, per tensor or per row.",
        min_models=2,
        row_local=lambda params: params.filter_wise,  # one angle per row
    )
)
