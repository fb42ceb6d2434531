"""Greedy soup: Wortsman et al., "Model soups", ICML 2022 (arXiv 2203.05482), recipe 2.

Ingredients are scored alone on a held-out split and added best first; each is kept only if
the uniform soup with it scores better than the best so far. The tensor function is the
uniform average of the kept ingredients; choosing them needs an evaluator, so the method is
marked ``needs_evaluation`` and runs through the evaluation loop, never as a plain merge.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from merge_kernels.methods.kernel import MergeInputs, MethodParams, NoModelParams, TensorContext
from merge_kernels.methods.steps import weighted_sum
from merge_kernels.registry import MethodSpec, register


class GreedySoupParams(MethodParams):
    """Parameters of the greedy soup's selection loop."""

    keep_rule: Literal[">", ">="] = Field(
        ">", description="Keep a candidate if its score is > (the reference code) or >= the best."
    )
    max_ingredients: int | None = Field(
        None, ge=1, description="Stop once the soup holds this many ingredients."
    )


def uniform_soup(inputs: MergeInputs, params: GreedySoupParams, ctx: TensorContext) -> torch.Tensor:
    """The uniform average of the kept ingredients."""
    count = len(inputs.models)
    return weighted_sum(inputs.models, [1.0 / count] * count)


register(
    MethodSpec(
        name="greedy_soup",
        title="Greedy soup",
        paper="Wortsman et al., Model soups, ICML 2022 (arXiv 2203.05482)",
        params=GreedySoupParams,
        model_params=NoModelParams,
        kernel=uniform_soup,
        needs_base=False,
        description="Adds ingredients best first, keeping each only if the held-out score of "
        "the uniform soup improves; needs an evaluator.",
        min_models=2,
        chunkable=lambda params: True,
        needs_evaluation=True,
    )
)
