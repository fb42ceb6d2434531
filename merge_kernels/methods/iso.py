"""Isotropic merging: ISO-C and ISO-CTS, which flatten the spectrum of the merged task matrix.

Marczak et al., "No Task Left Behind: Isotropic Model Merging with Common and Task-Specific
Subspaces", ICML 2025 (arXiv 2502.04959); reference code FusionBench
(``tanganke/fusion_bench``, ``fusion_bench/method/isotropic_merging/iso_utils.py``), whose
numbers these kernels reproduce on float32 tensors. With task vectors τᵢ = θᵢ − θ₀ of n
fine-tunes, per 2-D tensor:

- ISO-C: Σ τᵢ = U S Vᵀ (thin SVD); the merged task matrix is U (s̄ I) Vᵀ, every singular
  value replaced by their mean s̄ (an isotropic spectrum on the common subspace).
- ISO-CTS: the top ``common_space_fraction`` of the directions of Σ τᵢ form the common
  subspace (its size rounded so that what is left divides evenly by n); each task adds the
  top directions of its τᵢ projected off the common left subspace. The stacked left and
  right bases are orthogonalized (their polar factors, U' = P Qᵀ of their SVDs) and the
  merged matrix is U' (s̄ I) V'ᵀ, s̄ the mean of the kept singular values.

Every other tensor (biases, norms; and a 2-D tensor with ``spectral: false``, the
reference's ``exclude_keys``) takes the task vectors' mean. The merge is
θ₀ + ``scaling_factor`` · merged task vector, as in the reference.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from pydantic import Field

from merge_kernels.methods.kernel import MergeInputs, MethodParams, NoModelParams, TensorContext
from merge_kernels.methods.single_thread_linalg import one_cpu_thread
from merge_kernels.methods.spectral_memory import iso_c_working_bytes, iso_cts_working_bytes
from merge_kernels.methods.steps import task_vector
from merge_kernels.methods.truncated_svd import SvdMethod, top_singular_triplets
from merge_kernels.registry import MethodSpec, register


class IsoCParams(MethodParams):
    """Parameters of ISO-C (FusionBench's ``iso_c.yaml``)."""

    scaling_factor: float = Field(
        1.0, description="Scale of the merged task vector before it is added to the base."
    )
    spectral: bool = Field(
        True,
        description="Merge a 2-D tensor in its flattened spectrum; false takes the task "
        "vectors' mean instead (the reference's exclude_keys: set it per tensor with a "
        "filtered list).",
    )


class IsoCtsParams(IsoCParams):
    """Parameters of ISO-CTS (FusionBench's ``iso_cts.yaml``)."""

    common_space_fraction: float = Field(
        0.8,
        ge=0.0,
        le=1.0,
        description="Fraction of each matrix's rank kept for the common subspace; the rest "
        "is shared equally among the tasks' own subspaces.",
    )
    svd: SvdMethod = Field(
        "exact",
        description="How each task's top directions outside the common subspace are found: "
        "a full thin SVD (`exact`, the reference) or a randomized SVD (`randomized`: "
        "faster on large matrices, approximate where the spectrum decays slowly).",
    )


def _sum(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """Σ tensors, added left to right (as Python's ``sum`` in the reference)."""
    total = tensors[0].clone()
    for tensor in tensors[1:]:
        total += tensor
    return total


def iso_c_matrix(taus: Sequence[torch.Tensor]) -> torch.Tensor:
    """ISO-C's merged task matrix: Σ τᵢ with every singular value set to their mean."""
    count = len(taus)
    # The reference averages, then multiplies back: kept for its rounding.
    combined = _sum(taus) / count * count
    u, s, vh = torch.linalg.svd(combined, full_matrices=False)
    flat = torch.ones_like(s) * s.mean()
    merged: torch.Tensor = torch.linalg.multi_dot((u, torch.diag(flat), vh))
    return merged


def common_space_size(rank: int, count: int, fraction: float) -> int:
    """How many of ``rank`` directions the common subspace keeps, as the reference rounds it.

    The task-specific remainder is rounded (half to even, Python's ``round``) to a multiple
    of ``count``. Where that multiple would exceed ``rank`` (only for fractions near 0,
    where the reference fails) it is taken one multiple lower.
    """
    common = int(rank * fraction)
    specific = round((rank - common) / count) * count
    if specific > rank:
        specific -= count
    return rank - specific


def _polar(matrix: torch.Tensor) -> torch.Tensor:
    """The nearest matrix with orthonormal columns (or rows): P Qᵀ of P S Qᵀ = ``matrix``."""
    p, _, qh = torch.linalg.svd(matrix, full_matrices=False)
    polar: torch.Tensor = p @ qh
    return polar


def iso_cts_matrix(
    taus: Sequence[torch.Tensor], common_space_fraction: float, svd: SvdMethod = "exact"
) -> torch.Tensor:
    """ISO-CTS's merged task matrix from the common and the task-specific subspaces.

    ``svd: randomized`` finds each task's few top directions outside the common subspace
    by a randomized SVD (see :mod:`merge_kernels.methods.truncated_svd`); the summed
    matrix's SVD and the polar factors stay exact.
    """
    count = len(taus)
    rank = min(taus[0].shape)
    common = common_space_size(rank, count, common_space_fraction)
    u, s, vh = torch.linalg.svd(_sum(taus), full_matrices=False)
    common_u, common_s, common_vh = u[:, :common], s[:common], vh[:common, :]

    per_task = (rank - common) // count
    basis_u = torch.zeros_like(u)
    values = torch.zeros_like(s)
    basis_vh = torch.zeros_like(vh)
    for index, tau in enumerate(taus):
        # What of this task lies outside the common left subspace.
        specific = tau - common_u @ common_u.T @ tau
        task_u, task_s, task_vh = top_singular_triplets(specific, per_task, svd)
        block = slice(index * per_task, (index + 1) * per_task)
        basis_u[:, block] = task_u
        values[block] = task_s
        basis_vh[block, :] = task_vh
    tail = slice(count * per_task, count * per_task + common)
    basis_u[:, tail] = common_u
    values[tail] = common_s
    basis_vh[tail, :] = common_vh

    flat = torch.ones_like(values) * values.mean()
    merged: torch.Tensor = torch.linalg.multi_dot(
        (_polar(basis_u), torch.diag(flat), _polar(basis_vh))
    )
    return merged


def _mean(taus: Sequence[torch.Tensor]) -> torch.Tensor:
    """Σ τᵢ / n, as ISO-C's reference averages tensors it does not merge spectrally."""
    return _sum(taus) / len(taus)


def _running_mean(taus: Sequence[torch.Tensor]) -> torch.Tensor:
    """The mean as ISO-CTS's reference updates it, one task at a time."""
    mean = taus[0].clone()
    for index, tau in enumerate(taus[1:], start=2):
        mean += (tau - mean) / index
    return mean


def _task_vectors(inputs: MergeInputs, method: str) -> tuple[torch.Tensor, list[torch.Tensor]]:
    if inputs.base is None:
        raise ValueError(f"{method} needs the base model's tensor")
    return inputs.base, [task_vector(model, inputs.base) for model in inputs.models]


def iso_c(inputs: MergeInputs, params: IsoCParams, ctx: TensorContext) -> torch.Tensor:
    """θ₀ + scaling_factor · (ISO-C matrix for a 2-D tensor, else the task vectors' mean)."""
    base, taus = _task_vectors(inputs, "iso_c")
    if base.dim() == 2 and params.spectral:
        with one_cpu_thread(base.device):
            merged = iso_c_matrix(taus)
    else:
        merged = _mean(taus)
    return base + merged * params.scaling_factor


def iso_cts(inputs: MergeInputs, params: IsoCtsParams, ctx: TensorContext) -> torch.Tensor:
    """θ₀ + scaling_factor · (ISO-CTS matrix for a 2-D tensor, else the task vectors' mean)."""
    base, taus = _task_vectors(inputs, "iso_cts")
    if base.dim() == 2 and params.spectral:
        with one_cpu_thread(base.device):
            merged = iso_cts_matrix(taus, params.common_space_fraction, params.svd)
    else:
        merged = _running_mean(taus)
    return base + merged * params.scaling_factor


_PAPER = (
    "Marczak et al., No Task Left Behind: Isotropic Model Merging with Common and "
    "Task-Specific Subspaces, ICML 2025 (arXiv 2502.04959); FusionBench's isotropic_merging"
)

register(
    MethodSpec(
        name="iso_c",
        title="ISO-C (isotropic merging in the common subspace)",
        paper=_PAPER,
        params=IsoCParams,
        model_params=NoModelParams,
        kernel=iso_c,
        needs_base=True,
        description="Sums the task vectors of each 2-D tensor and replaces its singular "
        "values by their mean (a flat spectrum); other tensors take the task vectors' mean. "
        "The result, times scaling_factor, is added to the base.",
        working_memory=iso_c_working_bytes,
    )
)

register(
    MethodSpec(
        name="iso_cts",
        title="ISO-CTS (isotropic merging in common and task-specific subspaces)",
        paper=_PAPER,
        params=IsoCtsParams,
        model_params=NoModelParams,
        kernel=iso_cts,
        needs_base=True,
        description="Like iso_c, but keeps only the top common_space_fraction of the summed "
        "task matrix's directions and gives the rest of the rank to each task's own top "
        "directions outside them, orthogonalized, with a flat spectrum; other tensors take "
        "the task vectors' mean. The result, times scaling_factor, is added to the base.",
        working_memory=iso_cts_working_bytes,
    )
)
