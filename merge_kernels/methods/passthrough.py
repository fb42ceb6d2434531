"""Passthrough: one input's tensor, unchanged or scaled, as mergekit's ``passthrough``.

mergekit 0.1.5 (``merge_methods/passthrough.py``) takes exactly one input per tensor and
returns it, multiplied by that input's optional ``scale``. It is what layer stacking
("frankenmerges") builds its slices from. The base has no role of its own: a given
``base_model`` is an input like any other, so a recipe names one model in all — the base
listed in ``models``, or one model and no base (a base besides one model makes two inputs,
which mergekit refuses too).
"""

from __future__ import annotations

import torch
from pydantic import Field

from merge_kernels.methods.kernel import MergeInputs, MethodParams, ModelParams, TensorContext
from merge_kernels.registry import MethodSpec, register


class PassthroughParams(MethodParams):
    """Passthrough has no whole-merge parameters."""


class ScaleParams(ModelParams):
    """Per-model parameters of passthrough."""

    scale: float | None = Field(
        None, description="Multiply the tensor by this factor; unset copies it unchanged."
    )


def passthrough(inputs: MergeInputs, params: PassthroughParams, ctx: TensorContext) -> torch.Tensor:
    """The single input, times its ``scale`` when one is set."""
    if inputs.base is not None or len(inputs.models) != 1:
        raise ValueError("passthrough takes exactly one input tensor")
    (model,) = inputs.models
    (own,) = inputs.model_params
    scale = own.scale if isinstance(own, ScaleParams) else None
    # A new tensor even unscaled: the caller may reuse the input's buffer for the next piece.
    return model.clone() if scale is None else model * scale


register(
    MethodSpec(
        name="passthrough",
        title="Passthrough",
        paper="mergekit (Goddard et al., arXiv 2403.13257), merge_methods/passthrough.py",
        params=PassthroughParams,
        model_params=ScaleParams,
        kernel=passthrough,
        needs_base=False,
        description="Copies the one input's tensors, each optionally multiplied by the "
        "input's scale; the building block of layer stacking. Takes exactly one model (a "
        "base_model counts as one).",
        min_models=1,
        max_models=1,
        chunkable=lambda params: True,
    )
)
