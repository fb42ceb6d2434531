"""TSV-M: Task Singular Vectors merging, as FusionBench's ``TaskSingularVectorMerging``.

Gargiulo et al., "Task Singular Vectors: Reducing Task Interference in Model Merging",
CVPR 2025 (arXiv 2412.00081); reference code ``tanganke/fusion_bench``,
``fusion_bench/method/task_singular_vector/TSVM.py`` and
``utils/TSVM_utils.py::compute_and_sum_svd_mem_reduction``, whose steps this follows op for
op. With T task vectors τᵢ = wᵢ·(θᵢ − θ₀), per tensor:

1. A 2-D tensor: each τᵢ = Uᵢ Sᵢ Vᵢᵀ (thin SVD, r = min(m, n) singular values). Keep its
   top d = int(r · (1/T)) components (the reference's float product, so 49 · (1/49) gives
   d = 0) and place them side by side: U = [U₁[:, :d] … U_T[:, :d] 0], S likewise, Vᵀ
   stacked by rows; the r − T·d trailing slots stay zero.
2. Decorrelate the stacked singular vectors: replace U and Vᵀ by their nearest matrices
   with orthonormal columns/rows (orthogonal Procrustes, the polar factor P Qᵀ of each
   one's SVD P Σ Qᵀ), so the tasks' directions no longer interfere.
3. The merged task vector is polar(U) · diag(S) · polar(Vᵀ) (one ``multi_dot``, as the
   reference).
4. Any other tensor (1-D, 3-D+, or a 2-D one with ``exclude_from_svd``): the mean of the
   τᵢ, accumulated as the reference's running mean.

The result is θ₀ + α · merged. The reference's ``alpha`` is a float (scale after the merge,
kept here as ``alpha``) or a list (one scale per task vector before its SVD, here each
model's ``weight``); both may be given here. Its ``exclude_keys`` list is ``exclude_from_svd``
set per tensor with a filtered list (``[{filter: lm_head, value: true}, {value: false}]``).
Its ``return_single_task_models`` (one output per task) has no counterpart: a recipe writes
one model.

Where the stacked singular vectors are linearly dependent (identical or rank-deficient task
vectors), their polar factor is not unique and, as in the reference, the result depends on
the singular vectors the SVD backend picks for the null space; for task vectors in general
position it is a function of the inputs alone, equal across devices up to rounding.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from pydantic import Field

from merge_kernels.methods.kernel import MergeInputs, MethodParams, ModelParams, TensorContext
from merge_kernels.methods.single_thread_linalg import one_cpu_thread
from merge_kernels.methods.spectral_memory import tsv_working_bytes
from merge_kernels.methods.steps import task_vector
from merge_kernels.methods.truncated_svd import SvdMethod, top_singular_triplets
from merge_kernels.registry import MethodSpec, register


class TsvParams(MethodParams):
    """Whole-merge parameters of TSV-M (the reference config's names and defaults)."""

    alpha: float = Field(
        1.0, description="Scale of the merged task vector before it is added to the base."
    )
    exclude_from_svd: bool = Field(
        False,
        description="Average this 2-D tensor's task vectors instead of merging their "
        "singular vectors (the reference's exclude_keys; set per tensor with a filtered "
        "list). Tensors that are not 2-D are always averaged.",
    )
    svd: SvdMethod = Field(
        "exact",
        description="How each task's top 1/T singular directions are found: a full thin "
        "SVD (`exact`, the reference) or a randomized SVD (`randomized`: faster on large "
        "matrices, approximate where the spectrum decays slowly).",
    )


class TsvModelParams(ModelParams):
    """Per-model parameters of TSV-M."""

    weight: float = Field(
        1.0,
        description="Scale of this model's task vector before its SVD (the reference's "
        "list-valued alpha).",
    )


def components_per_task(rank: int, count: int) -> int:
    """d = int(r · (1/T)), computed as the reference does (a float product, truncated)."""
    return int(rank * (1 / count))


def task_singular_vectors(taus: Sequence[torch.Tensor], svd: SvdMethod = "exact") -> torch.Tensor:
    """The TSV-M merge of 2-D task vectors: polar(U) · diag(S) · polar(Vᵀ) (steps 1–3).

    Follows ``compute_and_sum_svd_mem_reduction`` operation for operation, so on the same
    device and dtype it gives the reference's numbers. On the CPU it runs on one thread,
    so its bits do not depend on the machine's thread count. ``svd: randomized`` finds
    each task's top 1/T directions by a randomized SVD (an approximation, see
    :mod:`merge_kernels.methods.truncated_svd`); the polar factors stay exact.
    """
    with one_cpu_thread(taus[0].device):
        return _task_singular_vectors(taus, svd)


def _task_singular_vectors(taus: Sequence[torch.Tensor], svd: SvdMethod) -> torch.Tensor:
    count = len(taus)
    rows, cols = taus[0].shape
    rank = min(rows, cols)
    sum_u = taus[0].new_zeros(rows, rank)
    sum_s = taus[0].new_zeros(rank)
    sum_vh = taus[0].new_zeros(rank, cols)
    d = components_per_task(rank, count)
    for index, tau in enumerate(taus):
        u, s, vh = top_singular_triplets(tau, d, svd)
        block = slice(index * d, (index + 1) * d)
        sum_u[:, block] = u
        sum_s[block] = s
        sum_vh[block, :] = vh
    u_u, _, vh_u = torch.linalg.svd(sum_u, full_matrices=False)
    u_vh, _, vh_vh = torch.linalg.svd(sum_vh, full_matrices=False)
    merged: torch.Tensor = torch.linalg.multi_dot((u_u, vh_u, torch.diag(sum_s), u_vh, vh_vh))
    return merged


def running_mean(taus: Sequence[torch.Tensor]) -> torch.Tensor:
    """The mean of ``taus`` as the reference accumulates it: m += (τᵢ − m) / (i + 1)."""
    mean = taus[0].clone()
    for index, tau in enumerate(taus[1:], start=1):
        mean += (tau - mean) / (index + 1)
    return mean


def tsv_merge(inputs: MergeInputs, params: TsvParams, ctx: TensorContext) -> torch.Tensor:
    """θ₀ + α · TSV-M(w₁τ₁, …, w_Tτ_T) for a 2-D tensor, θ₀ + α · mean(wᵢτᵢ) otherwise."""
    base = inputs.base
    if base is None:
        raise ValueError("tsv_merge needs the base model's tensor")
    taus = []
    for model, model_params in zip(inputs.models, inputs.model_params, strict=True):
        tau = task_vector(model, base)
        weight = float(getattr(model_params, "weight", 1.0))
        # The reference scales only when given a list of alphas; ×1 changes no bit anyway.
        taus.append(tau * weight if weight != 1.0 else tau)
    if base.dim() == 2 and not params.exclude_from_svd:
        merged = task_singular_vectors(taus, params.svd)
    else:
        merged = running_mean(taus)
    return merged * params.alpha + base


register(
    MethodSpec(
        name="tsv_merge",
        title="TSV-M (Task Singular Vectors merging)",
        paper="Gargiulo et al., Task Singular Vectors: Reducing Task Interference in Model "
        "Merging, CVPR 2025 (arXiv 2412.00081); FusionBench's TaskSingularVectorMerging",
        params=TsvParams,
        model_params=TsvModelParams,
        kernel=tsv_merge,
        needs_base=True,
        description="Per weight matrix, keeps each task vector's top 1/T singular "
        "components, decorrelates the stacked singular vectors (orthogonal Procrustes) and "
        "sums them; other tensors average the task vectors. The result, scaled by alpha, "
        "is added to the base.",
        min_models=1,
        working_memory=tsv_working_bytes,
    )
)
