"""Peak working memory of the spectral merges (TSV-M, ISO-C, ISO-CTS), counted from shapes.

A plan bounds a merge's resident memory before it reads any tensor (see
``MergePlan.peak_memory_estimate``). For an elementwise method a few float32 tensors of the
input's size cover it; a spectral merge of an m × n matrix holds the T task vectors, thin
SVD factors (U: m × r, S: r, Vᵀ: r × n with r = min(m, n)) and LAPACK's copy of the input
and workspace (``gesdd``: about 4r² + 7r + max(m, n) floats beyond the factors). The
counts below follow the kernels in :mod:`merge_kernels.methods.tsv` and
:mod:`merge_kernels.methods.iso` step by step, in float32 (4 bytes), rounded up.
"""

from __future__ import annotations

import math
from typing import Any

_FLOAT32 = 4


def svd_bytes(rows: int, cols: int) -> int:
    """Bytes one thin SVD of a float32 rows × cols matrix holds: factors, input copy, workspace."""
    rank = min(rows, cols)
    factors = rows * rank + rank + rank * cols
    workspace = rows * cols + 4 * rank * rank + 7 * rank + max(rows, cols)
    return _FLOAT32 * (factors + workspace)


def _elementwise(shape: tuple[int, ...], count: int) -> int:
    # The task vectors, their sum or running mean and the scaled result.
    return _FLOAT32 * math.prod(shape) * (count + 2)


def _tasks(inputs: int) -> int:
    return max(1, inputs - 1)  # every input read but the base


def tsv_working_bytes(params: Any, shape: tuple[int, ...], inputs: int) -> int:
    """TSV-M: the task vectors, two tasks' SVDs alive at once (the loop rebinds them), the
    stacked U, S, Vᵀ, the SVD of the stacked U then of Vᵀ, and the product chain."""
    count = _tasks(inputs)
    if len(shape) != 2 or getattr(params, "exclude_from_svd", False):
        return _elementwise(shape, count)
    rows, cols = shape
    rank = min(rows, cols)
    elements = rows * cols
    stacked = _FLOAT32 * (rows * rank + rank + rank * cols)
    polar = max(svd_bytes(rows, rank), svd_bytes(rank, cols))
    products = _FLOAT32 * (2 * elements + rank * rank)
    return _FLOAT32 * count * elements + 2 * svd_bytes(rows, cols) + stacked + polar + products


def iso_c_working_bytes(params: Any, shape: tuple[int, ...], inputs: int) -> int:
    """ISO-C: the task vectors, their sum, one SVD, the flat diagonal and the product chain."""
    count = _tasks(inputs)
    if len(shape) != 2 or not getattr(params, "spectral", True):
        return _elementwise(shape, count)
    rows, cols = shape
    rank = min(rows, cols)
    elements = rows * cols
    return (
        _FLOAT32 * (count + 1) * elements
        + svd_bytes(rows, cols)
        + _FLOAT32 * (rank * rank + 2 * elements)
    )


def iso_cts_working_bytes(params: Any, shape: tuple[int, ...], inputs: int) -> int:
    """ISO-CTS: the task vectors, their sum and its SVD, the m × m projector Uc Ucᵀ, each
    task's projected residual and its SVD, the stacked bases and their polar SVDs."""
    count = _tasks(inputs)
    if len(shape) != 2 or not getattr(params, "spectral", True):
        return _elementwise(shape, count)
    rows, cols = shape
    rank = min(rows, cols)
    elements = rows * cols
    common = _FLOAT32 * (rows * rank + rank + rank * cols)  # the sum's factors, kept
    projector = _FLOAT32 * (rows * rows + 2 * elements)
    stacked = _FLOAT32 * (rows * rank + rank + rank * cols)
    polar = max(svd_bytes(rows, rank), svd_bytes(rank, cols))
    return (
        _FLOAT32 * (count + 1) * elements
        + common
        + projector
        + svd_bytes(rows, cols)
        + stacked
        + polar
        + _FLOAT32 * (rank * rank + 2 * elements)
    )
