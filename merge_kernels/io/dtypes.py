"""The safetensors dtype codes tureen reads and writes, and their torch equivalents.

safetensors names element types with short codes ("F32", "BF16", ...) in its JSON header.
This module is the single mapping between those codes, torch dtypes and element sizes, so
that the header parser, the reader and the writer agree on every byte count.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType

import torch

from merge_kernels.errors import CheckpointFileError

_CODE_TO_TORCH: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}

#: safetensors dtype code -> torch dtype, for every code tureen supports.
CODE_TO_TORCH: Mapping[str, torch.dtype] = MappingProxyType(_CODE_TO_TORCH)

#: torch dtype -> safetensors dtype code (the inverse of ``CODE_TO_TORCH``).
TORCH_TO_CODE: Mapping[torch.dtype, str] = MappingProxyType(
    {dtype: code for code, dtype in _CODE_TO_TORCH.items()}
)

#: safetensors dtype code -> bytes per element.
ITEM_SIZES: Mapping[str, int] = MappingProxyType(
    {code: dtype.itemsize for code, dtype in _CODE_TO_TORCH.items()}
)

SUPPORTED_CODES: tuple[str, ...] = tuple(_CODE_TO_TORCH)


def is_supported(code: str) -> bool:
    """Return whether ``code`` is a safetensors dtype code tureen can read and write."""
    return code in _CODE_TO_TORCH


def _unknown_code(code: str) -> CheckpointFileError:
    return CheckpointFileError(
        f"unknown safetensors dtype {code!r}; tureen supports {', '.join(SUPPORTED_CODES)}. "
        "Convert the checkpoint to one of these dtypes and re-save it.",
        details={"dtype": code},
    )


def torch_dtype(code: str) -> torch.dtype:
    """Return the torch dtype for a safetensors dtype code.

    Args:
        code: a safetensors dtype code such as ``"BF16"``.

    Returns:
        The matching torch dtype.

    Raises:
        CheckpointFileError: ``code`` is not a supported safetensors dtype code.
    """
    try:
        return _CODE_TO_TORCH[code]
    except KeyError:
        raise _unknown_code(code) from None


def itemsize(code: str) -> int:
    """Return the size in bytes of one element of a safetensors dtype code.

    Raises:
        CheckpointFileError: ``code`` is not a supported safetensors dtype code.
    """
    return torch_dtype(code).itemsize


def dtype_code(dtype: torch.dtype) -> str:
    """Return the safetensors dtype code for a torch dtype.

    Args:
        dtype: a torch dtype.

    Returns:
        The safetensors code, e.g. ``"F16"`` for ``torch.float16``.

    Raises:
        CheckpointFileError: safetensors output of this dtype is not supported by tureen.
    """
    try:
        return TORCH_TO_CODE[dtype]
    except KeyError:
        raise CheckpointFileError(
            f"torch dtype {dtype} has no supported safetensors code; tureen supports "
            f"{', '.join(str(d) for d in _CODE_TO_TORCH.values())}. "
            "Cast the tensor to one of these dtypes.",
            details={"dtype": str(dtype)},
        ) from None
