"""The dtype table agrees with safetensors' own codes and rejects unknown codes clearly."""

from __future__ import annotations

import json
import struct

import pytest
import torch
from safetensors.torch import save

from merge_kernels.errors import CheckpointFileError
from merge_kernels.io.dtypes import (
    CODE_TO_TORCH,
    ITEM_SIZES,
    SUPPORTED_CODES,
    dtype_code,
    is_supported,
    itemsize,
    torch_dtype,
)

EXPECTED_CODES = {
    "F32",
    "F16",
    "BF16",
    "F64",
    "I64",
    "I32",
    "I16",
    "I8",
    "U8",
    "BOOL",
    "F8_E4M3",
    "F8_E5M2",
}


def test_supports_exactly_the_documented_codes() -> None:
    assert set(SUPPORTED_CODES) == EXPECTED_CODES
    assert set(CODE_TO_TORCH) == EXPECTED_CODES


@pytest.mark.parametrize("code", sorted(EXPECTED_CODES))
def test_codes_match_what_safetensors_writes(code: str) -> None:
    dtype = torch_dtype(code)
    blob = save({"t": torch.zeros(3, dtype=dtype)})
    (n,) = struct.unpack("<Q", blob[:8])
    entry = json.loads(blob[8 : 8 + n])["t"]
    assert entry["dtype"] == code
    begin, end = entry["data_offsets"]
    assert end - begin == 3 * itemsize(code) == 3 * ITEM_SIZES[code]
    assert dtype_code(dtype) == code
    assert is_supported(code)


def test_unknown_code_is_a_clear_error() -> None:
    assert not is_supported("F128")
    with pytest.raises(CheckpointFileError, match=r"unknown safetensors dtype 'F128'.*BF16"):
        torch_dtype("F128")
    with pytest.raises(CheckpointFileError, match="F128"):
        itemsize("F128")


def test_unsupported_torch_dtype_is_a_clear_error() -> None:
    with pytest.raises(CheckpointFileError, match=r"complex64.*Cast the tensor"):
        dtype_code(torch.complex64)
