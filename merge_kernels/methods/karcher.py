"""Karcher mean: the Riemannian barycenter of the models' directions, as mergekit's ``karcher``.

mergekit 0.1.5 (``merge_methods/karcher.py``), after "Functionality-Oriented LLM Merging on
the Fisher-Rao Manifold" (arXiv 2603.04972). Every input counts equally (αᵢ = 1/n; mergekit
takes no per-model weights) and a given ``base_model`` is one more input, not an origin.

Per tensor, flattened, in float32:

1. One model alone is returned unchanged. Each tensor has norm ‖θᵢ‖ and direction
   uᵢ = θᵢ/‖θᵢ‖ (zero for a zero tensor). Tensors of norm ≤ ``tol`` take no part in the
   mean; if none is left the result is zero.
2. The weights of the remaining directions are renormalized to sum to 1, and the start
   point is their normalized weighted sum (the first direction if that sum's norm < tol).
3. At most ``max_iter`` times: the tangent vector Σ αᵢ·θᵢ/sin θᵢ·(uᵢ − cos θᵢ·m) over the
   directions at angle θᵢ ≥ tol from the mean m; stop once its norm is below ``tol``,
   else step along the great circle by that norm and renormalize. Unlike mergekit, the
   loop also stops once that norm has not reached a new low for 3 steps: it is then at
   float32's rounding floor (about 1e-7), which a ``tol`` like 1e-9 never gets under, and
   mergekit's further steps move the mean by rounding noise alone (under
   ``compute_dtype: dtype`` mergekit's loop is followed exactly, see
   :mod:`merge_kernels.methods.compute_dtype_geometric`).
4. The result is the mean direction times Σ αᵢ‖θᵢ‖ over all inputs (the zero-norm ones
   count in this average norm with their original weights, as in mergekit).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from pydantic import Field

from merge_kernels.methods.kernel import MergeInputs, MethodParams, NoModelParams, TensorContext
from merge_kernels.registry import MethodSpec, register

_PATIENCE = 3  # steps without a smaller tangent after which the iteration has stalled


class KarcherParams(MethodParams):
    """Whole-merge parameters of the Karcher mean."""

    max_iter: int = Field(10, ge=0, description="Most iterations of the mean's update.")
    tol: float = Field(
        1e-5,
        ge=0.0,
        description="Stop when the tangent step is below this; also the norm below which "
        "a tensor is left out of the mean and the angle below which it pulls no more.",
    )


def karcher_mean(
    tensors: Sequence[torch.Tensor], alphas: Sequence[float], *, max_iter: int, tol: float
) -> torch.Tensor:
    """The weighted Karcher mean on the unit sphere, scaled by the weighted mean norm.

    Args:
        tensors: float32 tensors of one shape.
        alphas: one weight per tensor.
        max_iter: most iterations.
        tol: convergence, norm and angle tolerance.

    Returns:
        A new tensor of the inputs' shape.
    """
    if len(tensors) == 1:
        return tensors[0].clone()
    norms = [torch.linalg.vector_norm(tensor) for tensor in tensors]
    units = [
        torch.zeros_like(tensor) if float(norm) == 0.0 else tensor / norm
        for tensor, norm in zip(tensors, norms, strict=True)
    ]
    valid = [index for index, norm in enumerate(norms) if float(norm) > tol]
    if not valid:
        return torch.zeros_like(tensors[0])
    alpha_sum = sum(alphas[index] for index in valid)
    weights = [alphas[index] / alpha_sum for index in valid]
    directions = [units[index] for index in valid]

    mean = torch.zeros_like(directions[0])
    for weight, unit in zip(weights, directions, strict=True):
        mean += weight * unit
    mean_norm = torch.linalg.vector_norm(mean)
    mean = directions[0].clone() if float(mean_norm) < tol else mean / mean_norm

    smallest, stalled = float("inf"), 0
    for _ in range(max_iter):
        tangent = torch.zeros_like(mean)
        for weight, unit in zip(weights, directions, strict=True):
            dot = torch.clamp(torch.dot(mean.flatten(), unit.flatten()), -1.0, 1.0)
            theta = torch.arccos(dot)
            if float(theta) < tol:
                continue
            tangent += weight * (theta / torch.sin(theta)) * (unit - dot * mean)
        tangent_norm = torch.linalg.vector_norm(tangent)
        if float(tangent_norm) < tol:
            break
        # At the mean, what is left of the tangent is rounding error, which no step
        # reduces: once it has not shrunk for a few steps, more steps only wander.
        if float(tangent_norm) < smallest:
            smallest, stalled = float(tangent_norm), 0
        else:
            stalled += 1
            if stalled == _PATIENCE:
                break
        mean = torch.cos(tangent_norm) * mean + torch.sin(tangent_norm) * (tangent / tangent_norm)
        unit_norm = torch.linalg.vector_norm(mean)
        if float(unit_norm) > tol:
            mean = mean / unit_norm

    scale = sum(alpha * norm for alpha, norm in zip(alphas, norms, strict=True))
    result: torch.Tensor = scale * mean
    return result


def karcher(inputs: MergeInputs, params: KarcherParams, ctx: TensorContext) -> torch.Tensor:
    """The equally weighted Karcher mean of every input."""
    count = len(inputs.models)
    return karcher_mean(
        inputs.models, [1.0 / count] * count, max_iter=params.max_iter, tol=params.tol
    )


register(
    MethodSpec(
        name="karcher",
        title="Karcher mean",
        paper="Functionality-Oriented LLM Merging on the Fisher-Rao Manifold "
        "(arXiv 2603.04972), as in mergekit's merge_methods/karcher.py",
        params=KarcherParams,
        model_params=NoModelParams,
        kernel=karcher,
        needs_base=False,
        description="The Riemannian (Karcher) mean of the models' directions on the unit "
        "sphere, found by at most max_iter steps to tolerance tol, scaled by their average "
        "norm; every model counts equally and a base_model is one more input.",
        min_models=1,
    )
)
