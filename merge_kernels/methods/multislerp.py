"""Multi-SLERP: barycentric interpolation of any number of models on a hypersphere.

mergekit 0.1.5 (``merge_methods/multislerp.py``; C. Goddard, "Multi-SLERP",
goddard.blog/posts/multislerp-wow-what-a-cool-idea). The base is optional: when
``base_model`` is given the task vectors ``θᵢ − θ₀`` are interpolated and the base added back.

Per tensor, each input flattened to one vector, in the inputs' dtype (float32, or the
recipe's under ``compute_dtype: dtype``: the steps are mergekit's, in its order, so that
the kernel as it is gives mergekit's rounding in bfloat16 or float16 too):

1. One model alone is returned unchanged (the base is not added to it).
2. Weights are divided by their sum when ``normalize_weights`` (the default).
3. Each vector is projected to the unit sphere, ``uᵢ = vᵢ / (‖vᵢ‖ + eps)``, and the mean
   direction is ``m = Σ wᵢuᵢ``. If every vector is zero the result is zero (mergekit
   refuses this for more than two inputs); else if ‖m‖ < eps the directions cancel: two
   inputs are then averaged linearly (``w₁v₁ + w₂v₂``), more are refused.
4. The directions are projected onto the tangent space at ``m/‖m‖``, averaged there with
   the weights, and mapped back by the exponential map (its norm offset by eps).
5. The result is scaled by the weighted mean norm ``Σ wᵢ‖vᵢ‖``.
"""

from __future__ import annotations

import torch
from pydantic import Field

from merge_kernels.methods.kernel import MergeInputs, MethodParams, TensorContext
from merge_kernels.methods.task_arithmetic import WeightParams
from merge_kernels.registry import MethodSpec, register


class MultiSlerpParams(MethodParams):
    """Whole-merge parameters of Multi-SLERP."""

    normalize_weights: bool = Field(True, description="Divide the weights by their sum.")
    eps: float = Field(
        1e-8,
        ge=0.0,
        description="Added to norms before dividing; a mean direction shorter than this "
        "counts as zero.",
    )


def multislerp(inputs: MergeInputs, params: MultiSlerpParams, ctx: TensorContext) -> torch.Tensor:
    """Spherical barycentric interpolation of the models (of their task vectors with a base)."""
    if len(inputs.models) == 1:
        return inputs.models[0].clone()
    eps = params.eps
    base = inputs.base
    stacked = torch.stack(list(inputs.models), dim=0)
    if base is not None:
        stacked -= base
    shape = stacked.shape[1:]
    flat = stacked.view(stacked.shape[0], -1)
    given = [p.weight for p in inputs.model_params if isinstance(p, WeightParams)]
    weights = torch.tensor(given, dtype=flat.dtype, device=flat.device)
    if params.normalize_weights:
        weights = weights / weights.sum()

    norms: torch.Tensor = torch.norm(flat, dim=-1, keepdim=True)
    units = flat / (norms + eps)
    mean = (units * weights.view(-1, 1)).sum(0)
    mean_norm: torch.Tensor = torch.norm(mean)
    if not bool(norms.any()):
        # Every vector is zero (e.g. a layer no model changed from the base): their mean is
        # zero. mergekit refuses this for more than two models, as if they cancelled out.
        zero = torch.zeros_like(stacked[0])
        return zero + base if base is not None else zero
    if mean_norm < eps:
        if flat.shape[0] != 2:
            raise ValueError(
                "the weighted directions of the models cancel out (antipodal vectors with "
                "weights that balance exactly, e.g. a and -a with equal weights); change the "
                "weights"
            )
        # Two opposite directions: mergekit falls back to the linear combination.
        linear = (stacked[0] * weights[0] + stacked[1] * weights[1]).view(shape)
        return linear + base if base is not None else linear
    mean = mean / mean_norm

    dots = (units * mean).sum(-1, keepdim=True)
    tangents = units - dots * mean
    tangent = (tangents * weights.view(-1, 1)).sum(0)
    tangent_norm: torch.Tensor = torch.norm(tangent) + eps
    result = mean * torch.cos(tangent_norm) + tangent * (torch.sin(tangent_norm) / tangent_norm)
    result = (result * (norms.squeeze(-1) * weights).sum()).view(shape)
    return result + base if base is not None else result


def _check_weights(params: MultiSlerpParams, model_params: tuple[WeightParams, ...]) -> None:
    # mergekit would divide by zero and write NaN; a recipe error says what to change.
    if params.normalize_weights and sum(p.weight for p in model_params) == 0:
        raise ValueError(
            "weights sum to 0 with normalize_weights: true; change a weight or set "
            "normalize_weights: false"
        )


register(
    MethodSpec(
        name="multislerp",
        title="Multi-SLERP",
        paper="C. Goddard, Multi-SLERP (goddard.blog/posts/multislerp-wow-what-a-cool-idea), "
        "as in mergekit's merge_methods/multislerp.py",
        params=MultiSlerpParams,
        model_params=WeightParams,
        kernel=multislerp,
        needs_base=False,
        optional_base=True,
        description="Weighted spherical barycenter of any number of models: directions are "
        "averaged in the tangent space at their weighted mean and mapped back to the sphere, "
        "scaled by the weighted mean norm; with a base_model, of the task vectors, added back "
        "to the base.",
        min_models=1,
        check=_check_weights,
    )
)
