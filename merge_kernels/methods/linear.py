"""Uniform and weighted soups: Wortsman et al., "Model soups", ICML 2022 (arXiv 2203.05482).

θ = Σ wᵢ θᵢ, divided by Σ wᵢ when ``normalize`` (the default), so equal weights give the
uniform soup of the reference code (mlfoundations/model-soups), and mergekit's ``linear``.
"""

from __future__ import annotations

import torch
from pydantic import Field

from merge_kernels.fused import WeightedSum
from merge_kernels.methods.kernel import MergeInputs, MethodParams, TensorContext
from merge_kernels.methods.steps import weighted_sum
from merge_kernels.methods.task_arithmetic import WeightParams, check_normalized_weights
from merge_kernels.registry import MethodSpec, register


class LinearParams(MethodParams):
    """Parameters of the weighted soup."""

    normalize: bool = Field(True, description="Divide by Σ wᵢ, so the weights need not sum to 1.")


def linear(inputs: MergeInputs, params: LinearParams, ctx: TensorContext) -> torch.Tensor:
    """Σ wᵢ θᵢ (÷ Σ wᵢ when ``normalize``)."""
    weights = [p.weight for p in inputs.model_params if isinstance(p, WeightParams)]
    merged = weighted_sum(inputs.models, weights)
    if params.normalize:
        merged.div_(sum(weights))
    return merged


def _weighted_form(params: LinearParams, models: tuple[WeightParams, ...]) -> WeightedSum:
    weights = tuple(p.weight for p in models)
    return WeightedSum(weights, sum(weights) if params.normalize else None)


register(
    MethodSpec(
        name="linear",
        title="Uniform / weighted soup",
        paper="Wortsman et al., Model soups, ICML 2022 (arXiv 2203.05482)",
        params=LinearParams,
        model_params=WeightParams,
        kernel=linear,
        needs_base=False,
        description="The (weighted) average of the models' weights.",
        chunkable=lambda params: True,
        check=check_normalized_weights,
        weighted_form=_weighted_form,
    )
)
