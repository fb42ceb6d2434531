"""mergekit 0.1.5's arithmetic in the recipe's dtype for the geometric and selection methods.

The counterpart of :mod:`merge_kernels.methods.compute_dtype` for Model Stock, RAM, RAM+,
NuSLERP, the Karcher mean, Multi-SLERP, NearSwap and Arcee Fusion
(``mergekit/merge_methods/{model_stock,ram,nuslerp,karcher,multislerp,nearswap,
arcee_fusion}.py``). mergekit hands each of them the inputs in the config's dtype and they
compute in it, with torch's type promotion deciding the rest:

- Model Stock, RAM, NuSLERP, Multi-SLERP and NearSwap stay in the dtype throughout (norms,
  dot products, cosines, interpolation factors and sums are rounded at each step);
- RAM+ counts in integers and computes its reinforcement λᵢ in float32, so its unique
  entries are scaled in float32 and the sum is float32, rounded once at the end;
- the Karcher mean takes the norms in float32 and everything else in the dtype (the unit
  vectors, each tangent step, each renormalized iterate); in bfloat16 its angles round to 0
  within a step or two, so its loop stops early where float32 runs on;
- Arcee Fusion scores and thresholds in the dtype; its 0/1 mask is float32, so the masked
  sum is float32, rounded once at the end.

The functions below repeat mergekit's operations in its order on tensors of the dtype (the
same reductions over the same shapes, the same scalars as Python floats or 0-d tensors),
so their results are mergekit's bit for bit on the same device. NuSLERP, Multi-SLERP,
NearSwap and Arcee Fusion need nothing of their own: tureen's kernels already take
mergekit's steps in the inputs' dtype. A result may come back in float32 (RAM+, Arcee
Fusion), as mergekit's does, and is rounded once to the output dtype by the caller.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from merge_kernels.methods.arcee_fusion import arcee_fusion
from merge_kernels.methods.karcher import KarcherParams
from merge_kernels.methods.kernel import MergeInputs, TensorContext
from merge_kernels.methods.model_stock import ModelStockParams, interpolation_ratio
from merge_kernels.methods.multislerp import multislerp
from merge_kernels.methods.nearswap import nearswap
from merge_kernels.methods.nuslerp import nuslerp
from merge_kernels.methods.ram import RamParams, RamPlusParams

_NORM_FLOOR = 1e-6  # Model Stock's floor on a cosine's norm product (mergekit)
_CYCLE_MEMORY = 4  # earlier Karcher iterates compared with each new one


def _base(inputs: MergeInputs, method: str) -> torch.Tensor:
    if inputs.base is None:
        raise ValueError(f"{method} needs the base model's tensor")
    return inputs.base


def _sum(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """Python's ``sum`` of tensors, as mergekit writes it: 0 + x₁ + x₂ + … in turn."""
    total: torch.Tensor | int = 0
    for tensor in tensors:
        total = total + tensor
    assert isinstance(total, torch.Tensor)
    return total


def model_stock_in_dtype(
    inputs: MergeInputs, params: ModelStockParams, ctx: TensorContext
) -> torch.Tensor:
    """Model Stock as mergekit computes it: every step in the dtype.

    The cosines' norms and dot products, their mean, the ratio t, the average Σθᵢ/k (summed
    model by model) and t·θ̄ + (1 − t)·θ₀ are each rounded to the dtype.
    """
    w_0 = _base(inputs, "model_stock")
    shape = w_0.shape
    ws = list(inputs.models)
    if params.filter_wise:
        if w_0.dim() == 1:
            w_0 = w_0.unsqueeze(0)
            ws = [weight.unsqueeze(0) for weight in ws]
    else:
        w_0 = w_0.reshape(-1)
        ws = [weight.reshape(-1) for weight in ws]
    offsets = [weight - w_0 for weight in ws]
    cosines = []
    for index, first in enumerate(offsets):
        for second in offsets[index + 1 :]:
            norm_product = torch.norm(first, dim=-1) * torch.norm(second, dim=-1)
            dot = (first * second).sum(dim=-1)
            cosines.append((dot / norm_product.clamp(min=_NORM_FLOOR)).clamp(-1, 1))
    cos_theta = torch.stack(cosines).mean(dim=0).unsqueeze(-1)
    count = len(ws)
    t = interpolation_ratio(cos_theta, count)
    average = _sum(ws) / count
    return (t * average + (1 - t) * w_0).reshape(shape)


def _ram_vectors(
    inputs: MergeInputs, epsilon: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """mergekit's ``_prepare_ram_vectors``: the task vectors (one row per model) in the
    dtype, where each is changed, the integer count per entry, and where it is shared or
    unique."""
    base = _base(inputs, "RAM")
    task_vectors = torch.stack([model - base for model in inputs.models], dim=0)
    flat = task_vectors.view(len(inputs.models), -1)
    changed = flat.abs() > epsilon
    counts = changed.sum(dim=0, keepdim=True)
    return flat, changed, counts, counts > 1, counts == 1


def ram_in_dtype(inputs: MergeInputs, params: RamParams, ctx: TensorContext) -> torch.Tensor:
    """RAM as mergekit computes it: masks, the division by the count and the sum over the
    models in the dtype, then θ₀ + the result."""
    base = _base(inputs, "ram")
    flat, changed, counts, shared, unique = _ram_vectors(inputs, params.epsilon)
    kept = flat * changed
    merged = ((kept * unique) + (kept * shared / counts.clamp(min=1))).sum(dim=0, keepdim=True)
    return base + merged.reshape_as(base)


def ramplus_tl_in_dtype(
    inputs: MergeInputs, params: RamPlusParams, ctx: TensorContext
) -> torch.Tensor:
    """RAM+ as mergekit computes it: the ratios ρᵢ and the scales λᵢ in float32, so the
    unique entries (scaled by λᵢ), the sum over the models and θ₀ + the sum are float32."""
    base = _base(inputs, "ramplus_tl")
    flat, changed, counts, shared, unique = _ram_vectors(inputs, params.epsilon)
    shared_counts = (changed & shared).sum(dim=1)
    unique_counts = (changed & unique).sum(dim=1)
    rho = shared_counts / unique_counts.clamp(min=params.epsilon)
    scale = 1 + params.r * rho.clamp(min=0, max=params.alpha)
    kept = flat * changed
    reinforced = kept * unique * scale.unsqueeze(-1)
    averaged = kept * shared / counts.clamp(min=1)
    merged = (reinforced + averaged).sum(dim=0, keepdim=True)
    return base + merged.reshape_as(base)


def karcher_in_dtype(
    inputs: MergeInputs, params: KarcherParams, ctx: TensorContext
) -> torch.Tensor:
    """The Karcher mean as mergekit computes it: norms in float32, the rest in the dtype.

    mergekit's loop, step for step, with one shortcut that changes nothing: the iterate is
    the loop's only state, so once it equals one of the last few iterates exactly (float32
    often settles into such a cycle), the iterations left would repeat that cycle, and the
    iterate they would end on is taken from it directly.
    """
    tensors = list(inputs.models)
    if len(tensors) == 1:
        return tensors[0]
    alphas = [1.0 / len(tensors)] * len(tensors)
    work = torch.float64 if tensors[0].dtype == torch.float64 else torch.float32
    tol = params.tol
    norms = [torch.linalg.vector_norm(tensor.to(work)) for tensor in tensors]
    units = [
        torch.zeros_like(tensor) if norm.item() == 0.0 else (tensor / norm).to(tensor.dtype)
        for tensor, norm in zip(tensors, norms, strict=True)
    ]
    valid = [index for index, norm in enumerate(norms) if norm.item() > tol]
    if not valid:
        return _sum([tensor * 0 for tensor in tensors])
    valid_alphas = [alphas[index] for index in valid]
    alpha_sum = sum(valid_alphas)
    weights = [alpha / alpha_sum for alpha in valid_alphas]
    directions = [units[index] for index in valid]

    mean = torch.zeros_like(directions[0])
    for weight, unit in zip(weights, directions, strict=True):
        mean += weight * unit
    mean_norm = torch.linalg.vector_norm(mean.to(work))
    mean = directions[0].clone() if mean_norm.item() < tol else (mean / mean_norm).to(mean.dtype)

    recent: list[torch.Tensor] = []  # the last iterates, oldest first
    for step in range(params.max_iter):
        tangent = torch.zeros_like(mean)
        for weight, unit in zip(weights, directions, strict=True):
            dot = torch.clamp(torch.dot(mean.flatten(), unit.flatten()), -1.0, 1.0)
            theta = torch.arccos(dot)
            if theta.item() < tol:
                continue
            tangent += weight * (theta / torch.sin(theta)) * (unit - dot * mean)
        tangent_norm = torch.linalg.vector_norm(tangent.to(work))
        if tangent_norm.item() < tol:
            break
        mean = (
            torch.cos(tangent_norm) * mean + torch.sin(tangent_norm) * (tangent / tangent_norm)
        ).to(mean.dtype)
        unit_norm = torch.linalg.vector_norm(mean.to(work))
        if unit_norm.item() > tol:
            mean = (mean / unit_norm).to(mean.dtype)
        cycle = _cycle(mean, recent)
        if cycle:
            # every iterate of the cycle was stepped from, so the loop would not break
            # early: its last iteration ends (iterations left) mod (period) into the cycle
            mean = cycle[(params.max_iter - step - 1) % len(cycle)]
            break
        recent.append(mean)  # each step makes a new tensor: no copy needed
        del recent[:-_CYCLE_MEMORY]

    scale = _sum([alpha * norm for alpha, norm in zip(alphas, norms, strict=True)])
    return scale * mean


def _cycle(mean: torch.Tensor, recent: list[torch.Tensor]) -> list[torch.Tensor]:
    """The iterates from the latest one of ``recent`` equal to ``mean`` on (the cycle the
    iteration has entered: the next iterates repeat it), or none."""
    for back in range(1, len(recent) + 1):
        if torch.equal(recent[-back], mean):
            return recent[-back:]
    return []


ARITHMETIC: dict[str, Callable[[MergeInputs, Any, TensorContext], torch.Tensor]] = {
    "model_stock": model_stock_in_dtype,
    "ram": ram_in_dtype,
    "ramplus_tl": ramplus_tl_in_dtype,
    "karcher": karcher_in_dtype,
    # tureen's kernels take mergekit's steps in the inputs' dtype as they are
    "nuslerp": nuslerp,
    "multislerp": multislerp,
    "nearswap": nearswap,
    "arcee_fusion": arcee_fusion,
}
