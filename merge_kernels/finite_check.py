"""The check that every merged piece is finite, run as each piece is produced.

A weight of 1e300, a λ of 1e308, a DARE density of 1e-300 (rescaled by its inverse) or an
output dtype too narrow for the merged values gives infinities or NaN that would otherwise
be written and reported as a success; so would an input that already holds NaN. The check
costs one min/max pass over the piece (NaN propagates through both), about a quarter of a
copy; only a piece that fails is looked at further, to say where the values went bad.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from merge_kernels.errors import NonFiniteOutputError

_DTYPE_NAMES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "F64": "float64"}


def is_finite(piece: torch.Tensor) -> bool:
    """Whether every value of ``piece`` is finite (integer and boolean pieces always are)."""
    if not piece.is_floating_point() or piece.numel() == 0:
        return True
    low, high = torch.aminmax(piece)
    return math.isfinite(float(low)) and math.isfinite(float(high))


def non_finite_output_error(
    tensor_name: str,
    output_dtype: str,
    merged: torch.Tensor,
    inputs: Sequence[tuple[str, torch.Tensor]],
    rows: tuple[int, int] | None = None,
) -> NonFiniteOutputError:
    """The error for a merged piece that holds NaN or infinities.

    Args:
        tensor_name: the output tensor's name.
        output_dtype: its safetensors dtype code.
        merged: the merged piece.
        inputs: (input checkpoint's name, its piece) for every input read for this piece.
        rows: the piece's rows of the tensor, when it is a row chunk.
    """
    bad = int((~torch.isfinite(merged)).sum())
    dtype = _DTYPE_NAMES.get(output_dtype, output_dtype)
    where = f" (rows {rows[0]}..{rows[1]})" if rows is not None else ""
    tainted = [name for name, piece in inputs if not is_finite(piece)]
    if tainted:
        cause = (
            f"the input {', '.join(tainted)} already holds NaN or infinite values in this "
            "tensor, and the merge carried them through"
        )
    else:
        cause = (
            "no input holds NaN or infinities here, so the parameters overflow: lower the "
            "weights or lambda, raise a tiny density (DARE rescales by 1/density), or merge "
            f"into a wider out_dtype than {dtype}"
        )
    return NonFiniteOutputError(
        f"tensor {tensor_name!r}{where} of the merge holds {bad} NaN or infinite values of "
        f"{merged.numel()}: {cause}; set allow_non_finite: true in the recipe to write such "
        "a merge anyway",
        details={
            "tensor": tensor_name,
            "non_finite_values": bad,
            "inputs_with_non_finite": tainted,
        },
    )


def non_finite_input_error(
    tensor_name: str,
    inputs: Sequence[tuple[str, torch.Tensor]],
    rows: tuple[int, int] | None = None,
) -> NonFiniteOutputError:
    """The error for inputs holding NaN where the method ranks magnitudes (TIES, DARE-TIES'
    trim), which NaN makes impossible whether or not non-finite output is allowed."""
    where = f" (rows {rows[0]}..{rows[1]})" if rows is not None else ""
    tainted = [name for name, piece in inputs if not is_finite(piece)]
    return NonFiniteOutputError(
        f"tensor {tensor_name!r}{where} cannot be merged: the input "
        f"{', '.join(tainted) or '(one of them)'} already holds NaN there, and a magnitude "
        "trim cannot rank NaN; fix or replace that checkpoint",
        details={"tensor": tensor_name, "inputs_with_non_finite": tainted},
    )
