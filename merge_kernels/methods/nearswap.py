"""NearSwap: take the other model's value where it is already near the base's.

mergekit 0.1.5 (``merge_methods/nearswap.py``), after alchemonaut's QuartetAnemoi-70B
(huggingface.co/alchemonaut/QuartetAnemoi-70B-t0.0001). Elementwise, with a the base and b
the one other model::

    w = clamp(t / max(|a − b|, 1e-6), 0, 1)
    θ = w·b + (1 − w)·a

so entries that differ by at most ``t`` become b's, and larger differences move towards b
by ``t`` over the difference: the base is kept where the models disagree. ``t`` ≤ 0 keeps
the base. The math runs in the inputs' dtype (float32, or the recipe's under
``compute_dtype: dtype``), in mergekit's order, so that the kernel as it is gives
mergekit's rounding in bfloat16 or float16 too.
"""

from __future__ import annotations

import torch
from pydantic import Field

from merge_kernels.methods.kernel import MergeInputs, MethodParams, NoModelParams, TensorContext
from merge_kernels.registry import MethodSpec, register

_MIN_DIFFERENCE = 1e-6  # mergekit's floor on |a − b|, so equal entries get weight 1


class NearSwapParams(MethodParams):
    """Parameters of NearSwap."""

    t: float = Field(
        ..., description="Differences up to t take the other model's value (e.g. 0.0001)."
    )


def nearswap(inputs: MergeInputs, params: NearSwapParams, ctx: TensorContext) -> torch.Tensor:
    """The base, swapped towards the other model where the two are within ``t``."""
    if inputs.base is None or len(inputs.models) != 1:
        raise ValueError("nearswap merges exactly two models: the base and one other")
    base, other = inputs.base, inputs.models[0]
    weight = (params.t / torch.abs(base - other).clamp(min=_MIN_DIFFERENCE)).clamp(min=0, max=1)
    return weight * other + (1 - weight) * base


register(
    MethodSpec(
        name="nearswap",
        title="NearSwap",
        paper="alchemonaut, QuartetAnemoi-70B-t0.0001 (Hugging Face model card), "
        "as in mergekit's merge_methods/nearswap.py",
        params=NearSwapParams,
        model_params=NoModelParams,
        kernel=nearswap,
        needs_base=True,
        description="Keeps the base but moves each entry towards the other model by "
        "t / |difference| (capped at 1): entries within t of each other take the other "
        "model's value. Needs base_model and exactly one other model.",
        min_models=1,
        max_models=1,
        chunkable=lambda params: True,
    )
)
