"""NuSLERP: spherical interpolation of two models by relative weights, as mergekit's ``nuslerp``.

mergekit 0.1.5 (``merge_methods/nuslerp.py``). Exactly two models besides an optional base.
The interpolation factor is ``t = w₂ / (w₁ + w₂)`` from the two per-model weights (0.5 when
|w₁ + w₂| < 1e-6). With a base the two task vectors ``θᵢ − θ₀`` are interpolated and the
base added back; without one the models themselves are.

The vectors interpolated are chosen by two switches:

- ``nuslerp_flatten`` (default true): the whole tensor is one vector;
- otherwise each vector along the last dimension (each row of a matrix), or, with
  ``nuslerp_row_wise: true``, each vector along the first dimension (each column).

Per vector: directions are normalized with norms clamped at 1e-7, ``cos θ`` is clamped to
[−1, 1], and where ``1 − cos²θ ≤ eps²`` (eps = 1e-8: parallel or antiparallel) the result is
the linear ``(1 − t)·v₀ + t·v₁``; elsewhere it is
``(sin((1 − t)θ)·v₀ + sin(tθ)·v₁) / sin θ``. The math runs in the inputs' dtype (float32,
or the recipe's under ``compute_dtype: dtype``), step for step in mergekit's order, so that
the kernel as it is gives mergekit's rounding in bfloat16 or float16 too.
"""

from __future__ import annotations

import torch
from pydantic import Field

from merge_kernels.methods.kernel import MergeInputs, MethodParams, TensorContext
from merge_kernels.methods.task_arithmetic import WeightParams
from merge_kernels.registry import MethodSpec, register

_NORM_CLAMP = 1e-7  # mergekit's floor on a direction's norm
_COLINEAR_EPS = 1e-8  # 1 − cos²θ at or below eps² counts as parallel
_ZERO_TOTAL = 1e-6  # weights summing to less than this in magnitude give t = 0.5


class NuSlerpParams(MethodParams):
    """Whole-merge parameters of NuSLERP."""

    nuslerp_row_wise: bool = Field(
        False,
        description="Without flattening, interpolate the vectors along the first dimension "
        "(columns of a matrix) instead of the last (rows).",
    )
    nuslerp_flatten: bool = Field(True, description="Interpolate the whole tensor as one vector.")


def _unit(x: torch.Tensor) -> torch.Tensor:
    norm: torch.Tensor = torch.norm(x, dim=-1, keepdim=True)
    return x / norm.clamp(min=_NORM_CLAMP)


def nuslerp_vectors(
    t: float, v0: torch.Tensor, v1: torch.Tensor, *, dim: int = -1, flatten: bool = False
) -> torch.Tensor:
    """Spherical interpolation from ``v0`` (t = 0) to ``v1`` (t = 1), vector by vector.

    Args:
        t: the interpolation factor (any real; outside [0, 1] extrapolates).
        v0: the first tensor.
        v1: the second tensor, of the same shape.
        dim: the dimension along which the vectors lie (-1 or 0), unless ``flatten``.
        flatten: treat the whole tensor as one vector.

    Returns:
        A new tensor of ``v0``'s shape.
    """
    shape = v0.shape
    if flatten:
        v0, v1 = v0.reshape(-1), v1.reshape(-1)
    elif dim != -1:
        v0, v1 = v0.transpose(dim, -1), v1.transpose(dim, -1)
    cos_theta = torch.sum(_unit(v0) * _unit(v1), dim=-1, keepdim=True).clamp(-1, 1)
    colinear = (1 - cos_theta.square()) <= _COLINEAR_EPS**2
    # acos(0) on the parallel entries keeps the unused spherical branch finite.
    theta = torch.acos(torch.where(colinear, 0, cos_theta))
    spherical = (torch.sin((1 - t) * theta) * v0 + torch.sin(t * theta) * v1) / torch.sin(theta)
    result = torch.where(colinear, (1 - t) * v0 + t * v1, spherical)
    if dim != -1 and not flatten:
        result = result.transpose(dim, -1)
    return result.reshape(shape)


def interpolation_factor(weights: tuple[float, float]) -> float:
    """``t = w₂ / (w₁ + w₂)``, or 0.5 when the weights sum to about zero (mergekit's rule)."""
    total = weights[0] + weights[1]
    return 0.5 if abs(total) < _ZERO_TOTAL else weights[1] / total


def nuslerp(inputs: MergeInputs, params: NuSlerpParams, ctx: TensorContext) -> torch.Tensor:
    """NuSLERP of the two models, on their task vectors when a base is given."""
    if len(inputs.models) != 2:
        raise ValueError("nuslerp interpolates exactly two models besides the base")
    weights = [p.weight for p in inputs.model_params if isinstance(p, WeightParams)]
    t = interpolation_factor((weights[0], weights[1]))
    dim = 0 if params.nuslerp_row_wise else -1
    first, second = inputs.models
    base = inputs.base
    if base is None:
        return nuslerp_vectors(t, first, second, dim=dim, flatten=params.nuslerp_flatten)
    moved = nuslerp_vectors(t, first - base, second - base, dim=dim, flatten=params.nuslerp_flatten)
    return moved.add_(base)


def _row_local(params: NuSlerpParams) -> bool:
    # Vectors along the last dimension of a tensor of two or more axes lie within one row
    # of dim 0; a flattened tensor or column vectors span every row.
    return not params.nuslerp_flatten and not params.nuslerp_row_wise


register(
    MethodSpec(
        name="nuslerp",
        title="NuSLERP",
        paper="mergekit (Goddard et al., arXiv 2403.13257), merge_methods/nuslerp.py; "
        "after Shoemake, SIGGRAPH 1985",
        params=NuSlerpParams,
        model_params=WeightParams,
        kernel=nuslerp,
        needs_base=False,
        optional_base=True,
        description="Spherical interpolation between two models at t = w₂/(w₁+w₂), of the "
        "whole tensor (nuslerp_flatten, the default) or of each row (or column, "
        "nuslerp_row_wise); with a base_model, of the task vectors, added back to the base. "
        "Parallel vectors are interpolated linearly.",
        min_models=2,
        max_models=2,
        row_local=_row_local,
    )
)
