"""RAM and RAM+ (tensor-local): task vectors merged by how many models touch each entry.

Reinforced Agent Merging (arXiv 2601.13572), as implemented by mergekit's ``ram.py``, which
this module reproduces. With task vectors τᵢ = θᵢ − θ₀, an entry counts as changed by model
i when |τᵢ| > ``epsilon``. Per entry, with c the number of models that changed it:

- ``ram``: an entry changed by one model takes that model's change; one changed by several
  takes their mean; θ = θ₀ + Σᵢ [changed] τᵢ / max(c, 1).
- ``ramplus_tl``: as RAM, but model i's unique entries (c = 1) are scaled up by
  λᵢ = 1 + r·clip(ρᵢ, 0, alpha), where ρᵢ is, over the whole tensor, the number of entries
  model i shares with others divided by the number it alone changes (at least ``epsilon``).
  Models that overlap much with others have their own changes reinforced.

RAM is elementwise (merged in chunks if large); RAM+'s ρᵢ counts over the whole tensor.
"""

from __future__ import annotations

import torch
from pydantic import Field

from merge_kernels.methods.kernel import MergeInputs, MethodParams, NoModelParams, TensorContext
from merge_kernels.methods.steps import disjoint_mean, task_vector
from merge_kernels.registry import MethodSpec, register

_PAPER = "Reinforced Agent Merging (arXiv 2601.13572), as implemented by mergekit"


class RamParams(MethodParams):
    """Parameters of RAM."""

    epsilon: float = Field(
        1e-5,
        ge=0.0,
        description="A task-vector entry counts as changed when its magnitude exceeds this.",
    )


class RamPlusParams(RamParams):
    """Parameters of RAM+ (tensor-local)."""

    r: float = Field(0.1, description="Strength of the reinforcement of a model's unique entries.")
    alpha: float = Field(
        0.2, ge=0.0, description="Cap on the overlap ratio ρ before it is scaled by r."
    )


def _changes(
    inputs: MergeInputs, epsilon: float
) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor], torch.Tensor]:
    """The base, the task vectors, where each one counts as changed, and the count per entry."""
    if inputs.base is None:
        raise ValueError("RAM needs the base model's tensor")
    taus = [task_vector(model, inputs.base) for model in inputs.models]
    changed = [tau.abs() > epsilon for tau in taus]
    counts = torch.zeros_like(inputs.base)
    for mask in changed:
        counts.add_(mask)
    return inputs.base, taus, changed, counts


def ram(inputs: MergeInputs, params: RamParams, ctx: TensorContext) -> torch.Tensor:
    """θ₀ + per entry the mean of the changes of the models that changed it."""
    base, taus, changed, _ = _changes(inputs, params.epsilon)
    merged = disjoint_mean(taus, [1.0] * len(taus), changed, divisor="count")
    return torch.add(base, merged)


def ramplus_tl(inputs: MergeInputs, params: RamPlusParams, ctx: TensorContext) -> torch.Tensor:
    """RAM with each model's unique changes scaled by λᵢ = 1 + r·clip(ρᵢ, 0, alpha)."""
    base, taus, changed, counts = _changes(inputs, params.epsilon)
    unique = counts == 1
    shared = counts > 1
    merged = torch.zeros_like(base)
    divisor = counts.clamp(min=1.0)
    for tau, mask in zip(taus, changed, strict=True):
        own = mask & unique
        unique_count = int(own.sum())
        shared_count = int((mask & shared).sum())
        # A model with no unique entries has no use for λ (and ρ may be 0/0 at epsilon 0).
        scale = 1.0
        if unique_count:
            rho = shared_count / max(float(unique_count), params.epsilon)
            scale = 1.0 + params.r * min(max(rho, 0.0), params.alpha)
        merged.add_(torch.where(own, tau * scale, tau * (mask & shared) / divisor))
    return torch.add(base, merged)


register(
    MethodSpec(
        name="ram",
        cache_blocking=True,
        title="Reinforced Agent Merging (RAM)",
        paper=_PAPER,
        params=RamParams,
        model_params=NoModelParams,
        kernel=ram,
        needs_base=True,
        description="Per entry, keeps the change of the one model that changed it, or the "
        "mean of the changes of the several that did.",
        chunkable=lambda params: True,
    )
)

register(
    MethodSpec(
        name="ramplus_tl",
        title="RAM+ (tensor-local)",
        paper=_PAPER,
        params=RamPlusParams,
        model_params=NoModelParams,
        kernel=ramplus_tl,
        needs_base=True,
        description="RAM, with each model's unique changes scaled up by how much of its "
        "change it shares with the other models, counted over the tensor.",
    )
)
