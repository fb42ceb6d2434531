"""SLERP: spherical linear interpolation between two models, per tensor.

Shoemake, "Animating rotation with quaternion curves", SIGGRAPH 1985, as applied to model
weights by mergekit: the flattened tensors are interpolated along the great circle between
their directions, falling back to linear interpolation when they are nearly colinear
(|cos| > 0.9995, mergekit's rule). t = 0 gives the base model, t = 1 the other model.
"""

from __future__ import annotations

import math

import torch
from pydantic import Field

from merge_kernels.methods.kernel import MergeInputs, MethodParams, NoModelParams, TensorContext
from merge_kernels.registry import MethodSpec, register


class SlerpParams(MethodParams):
    """Parameters of SLERP."""

    t: float = Field(..., ge=0.0, le=1.0, description="Interpolation factor: 0 = base, 1 = other.")
    dot_threshold: float = Field(
        0.9995, gt=0.0, le=1.0, description="Above this |cos θ| interpolate linearly."
    )
    eps: float = Field(1e-8, gt=0.0, description="Norms below this are not normalized.")


def slerp(inputs: MergeInputs, params: SlerpParams, ctx: TensorContext) -> torch.Tensor:
    """Spherical interpolation from the base tensor (t = 0) to the other model's (t = 1)."""
    if inputs.base is None or len(inputs.models) != 1:
        raise ValueError("slerp merges exactly two models: the base and one other")
    v0, v1 = inputs.base, inputs.models[0]
    t = params.t
    n0, n1 = torch.linalg.vector_norm(v0), torch.linalg.vector_norm(v1)
    u0 = v0 / n0 if n0 > params.eps else v0
    u1 = v1 / n1 if n1 > params.eps else v1
    dot = float(torch.sum(u0 * u1))
    if abs(dot) > params.dot_threshold:
        return (1 - t) * v0 + t * v1
    theta_0 = math.acos(max(-1.0, min(1.0, dot)))
    sin_theta_0 = math.sin(theta_0)
    theta_t = theta_0 * t
    s0 = math.sin(theta_0 - theta_t) / sin_theta_0
    s1 = math.sin(theta_t) / sin_theta_0
    return s0 * v0 + s1 * v1


register(
    MethodSpec(
        name="slerp",
        title="SLERP",
        paper="Shoemake, Animating rotation with quaternion curves, SIGGRAPH 1985; "
        "per-tensor model interpolation as in mergekit",
        params=SlerpParams,
        model_params=NoModelParams,
        kernel=slerp,
        needs_base=True,
        description="Spherical interpolation between the base and one other model by t.",
        min_models=1,
        max_models=1,
    )
)
