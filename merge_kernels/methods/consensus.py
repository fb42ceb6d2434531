"""Consensus merging: task arithmetic or TIES, keeping only weights that several tasks need.

Wang et al., "Localizing Task Information for Improved Model Merging and Compression",
ICML 2024 (arXiv 2405.07813); reference code ``nik-dim/tall_masks``
(``src/eval/aggregation.py::create_task_vector``, ``src/utils/tallmask_utils.py``,
``src/utils/ties_utils.py``, ``src/utils/utils.py::topk_values_mask``), also in FusionBench
(``fusion_bench/method/tall_mask``). With task vectors τₜ = θₜ − θ₀ of T fine-tunes, per
tensor:

1. Trim each τₜ to its largest magnitudes (the reference's ``k`` percent, here
   ``density``): the reference keeps every |τ| ≥ the (⌊d·density⌋ + 1)-th largest of d,
   one more than ⌊d·density⌋ when there are no ties, and trims nothing at density 1.
2. The multi-task vector τ_MTL: the sum of the trimmed τₜ (task arithmetic), or with
   ``use_ties`` TIES' sign election (sign of the sum, zeros resolved to the majority sign)
   and the *sum* of the agreeing entries (the reference's ``dis-sum``).
3. Each task's TALL mask: mₜ = |θ₀ − θₜ| > λ · |θ_MTL − θₜ| with θ_MTL = θ₀ + τ_MTL and
   λ = ``tall_mask_lambda``: the entries where the merged model moved task t's weight
   towards θₜ. The untrimmed fine-tune enters, as in the reference.
4. The consensus mask keeps the entries at least ``prun_thre_k`` tasks' masks mark
   (k = 2 drops catastrophic and selfish weights, k = 1 only catastrophic ones, k = 0
   nothing: plain task arithmetic or TIES).

The merge is θ₀ + ``lambda`` · (τ_MTL ⊙ consensus mask).

Where the reference differs: it trims and resolves zero signs over the whole flattened
model at once; here both are per tensor, so that a merge streams tensor by tensor (with
``density: 1``, the default without TIES, the trim is a no-op and nothing differs). It also
chooses each task's λ among 0.2…0.6, and the final scale, on validation data; here both are
parameters (``tall_mask_lambda`` defaults to FusionBench's 0.6, ``lambda`` to 1).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from pydantic import Field

from merge_kernels.methods.kernel import MergeInputs, MethodParams, NoModelParams, TensorContext
from merge_kernels.methods.magnitude_select import top_k_magnitude_mask
from merge_kernels.methods.steps import agreement_mask, elect_sign, task_vector
from merge_kernels.registry import MethodSpec, register

TIES_DENSITY = 0.2  # the reference's reset_thresh=20 when it builds the TIES vector


class ConsensusMergeParams(MethodParams):
    """Parameters of consensus merging (the reference's ``consensus.yaml`` names)."""

    lambda_: float = Field(
        1.0,
        alias="lambda",
        description="Scale of the masked multi-task vector before it is added to the base "
        "(the reference picks it on validation data).",
    )
    prun_thre_k: int = Field(
        2,
        ge=0,
        description="Keep an entry only where at least this many tasks' TALL masks mark it.",
    )
    tall_mask_lambda: float = Field(
        0.6,
        ge=0.0,
        description="λ of the TALL masks |θ₀ − θₜ| > λ·|θ_MTL − θₜ|: lower keeps more.",
    )
    use_ties: bool = Field(
        False,
        description="Build the multi-task vector with TIES (sign election, sum of the "
        "agreeing entries) instead of task arithmetic.",
    )
    density: float | None = Field(
        None,
        gt=0.0,
        le=1.0,
        description="Fraction of each task vector's largest magnitudes kept before merging "
        "(the reference's k / 100); unset: 1 for task arithmetic, 0.2 with use_ties.",
    )

    def effective_density(self) -> float:
        """``density``, or the reference's default for the chosen merge."""
        if self.density is not None:
            return self.density
        return TIES_DENSITY if self.use_ties else 1.0


def reference_trim(tau: torch.Tensor, density: float) -> torch.Tensor:
    """τ with every |τ| below the (⌊d·density⌋ + 1)-th largest zeroed (``topk_values_mask``)."""
    if density >= 1.0:
        return tau
    keep = min(tau.numel(), int(tau.numel() * density) + 1)
    return tau * top_k_magnitude_mask(tau, keep, ties="threshold")


def multi_task_vector(trimmed: torch.Tensor, use_ties: bool) -> torch.Tensor:
    """τ_MTL from the stacked trimmed task vectors (T, ...): their sum, or TIES' ``dis-sum``."""
    total = trimmed.sum(dim=0)
    if not use_ties:
        return total
    # One "candidate", the summed vote, so the sign is the reference's sign of the sum.
    gamma = elect_sign([total], method="total", zero_sign="majority")
    return (trimmed * agreement_mask(trimmed, gamma)).sum(dim=0)


def consensus_mask(
    base: torch.Tensor,
    models: list[torch.Tensor],
    merged: torch.Tensor,
    tall_mask_lambda: float,
    prun_thre_k: int,
) -> torch.Tensor:
    """Entries at least ``prun_thre_k`` of the tasks' TALL masks keep, as a bool tensor."""
    multi = base + merged
    count = torch.zeros_like(base)
    for model in models:
        tall = (base - model).abs() > (multi - model).abs() * tall_mask_lambda
        count = count + tall.float()
    return count >= prun_thre_k


def consensus_merge(
    inputs: MergeInputs, params: ConsensusMergeParams, ctx: TensorContext
) -> torch.Tensor:
    """θ₀ + λ · (τ_MTL ⊙ consensus mask)."""
    base = inputs.base
    if base is None:
        raise ValueError("consensus needs the base model's tensor")
    models = list(inputs.models)
    density = params.effective_density()
    trimmed = torch.stack([reference_trim(task_vector(m, base), density) for m in models])
    merged = multi_task_vector(trimmed, params.use_ties)
    del trimmed
    mask = consensus_mask(base, models, merged, params.tall_mask_lambda, params.prun_thre_k)
    return base + (merged * mask) * params.lambda_


def _elementwise(params: ConsensusMergeParams) -> bool:
    # Task arithmetic without a trim is elementwise; a trim or TIES' majority sign needs
    # the whole tensor.
    return not params.use_ties and params.effective_density() >= 1.0


def consensus_working_bytes(params: Any, shape: tuple[int, ...], inputs: int) -> int:
    """The task vectors and their stack, τ_MTL, θ_MTL, the mask count and two masks."""
    count = max(1, inputs - 1)
    return 4 * math.prod(shape) * (2 * count + 5)


register(
    MethodSpec(
        name="consensus",
        title="Consensus merging (TALL masks)",
        paper="Wang et al., Localizing Task Information for Improved Model Merging and "
        "Compression, ICML 2024 (arXiv 2405.07813); nik-dim/tall_masks",
        params=ConsensusMergeParams,
        model_params=NoModelParams,
        kernel=consensus_merge,
        needs_base=True,
        description="Merges the task vectors by task arithmetic (or TIES with use_ties), "
        "builds each task's TALL mask (where the merge moved the weight towards that "
        "task's fine-tune, up to tall_mask_lambda) and keeps only the entries at least "
        "prun_thre_k masks mark. The result, times lambda, is added to the base.",
        chunkable=_elementwise,
        working_memory=consensus_working_bytes,
    )
)
