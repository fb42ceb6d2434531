"""read_header parses real safetensors files and rejects every kind of malformed header."""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from merge_kernels.errors import CheckpointFileError, CheckpointNotFoundError
from merge_kernels.io.safetensors_header import (
    MAX_HEADER_BYTES,
    HeaderLimits,
    header_limits,
    read_header,
)


def _write_raw(path: Path, header: object, data_len: int, *, length: int | None = None) -> Path:
    """Write a file with the given header (dict/list or raw bytes) and zeroed data bytes."""
    body = header if isinstance(header, bytes) else json.dumps(header).encode()
    prefix = struct.pack("<Q", len(body) if length is None else length)
    path.write_bytes(prefix + body + bytes(data_len))
    return path


def _entry(dtype: str, shape: list[int], begin: int, end: int) -> dict[str, object]:
    return {"dtype": dtype, "shape": shape, "data_offsets": [begin, end]}


def _assert_names(exc: CheckpointFileError, path: Path, tensor: str | None) -> None:
    assert str(path) in exc.message
    assert exc.details["file"] == str(path)
    assert "re-download or re-save" in exc.message
    if tensor is not None:
        assert repr(tensor) in exc.message
        assert exc.details["tensor"] == tensor


def test_parses_file_written_by_safetensors(tmp_path: Path) -> None:
    tensors = {
        "w": torch.arange(12, dtype=torch.float32).reshape(3, 4),
        "b": torch.ones(5, dtype=torch.bfloat16),
        "scalar": torch.tensor(7, dtype=torch.int64),
        "empty": torch.zeros(0, 3, dtype=torch.float16),
        "mask": torch.tensor([True, False]),
    }
    path = tmp_path / "m.safetensors"
    save_file(tensors, path, metadata={"format": "pt", "note": "ü"})
    header = read_header(path)

    assert header.path == path
    assert header.metadata == {"format": "pt", "note": "ü"}
    assert header.file_size == path.stat().st_size
    (n,) = struct.unpack("<Q", path.read_bytes()[:8])
    assert header.data_start == 8 + n
    assert set(header.tensors) == set(tensors)
    begins = [e.begin for e in header.tensors.values()]
    assert begins == sorted(begins)
    raw = path.read_bytes()
    for name, tensor in tensors.items():
        entry = header.tensors[name]
        assert entry.shape == tuple(tensor.shape)
        assert entry.torch_dtype == tensor.dtype
        assert entry.numel == tensor.numel()
        assert entry.nbytes == tensor.numel() * tensor.element_size()
        expected = tensor.reshape(-1).view(torch.uint8).numpy().tobytes()
        assert raw[entry.begin : entry.end] == expected
    assert header.tensors["w"].row_bytes == 16
    assert header.tensors["scalar"].row_bytes == 8
    assert header.tensors["empty"].row_bytes == 6


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.safetensors"
    with pytest.raises(CheckpointNotFoundError) as info:
        read_header(path)
    assert str(path) in info.value.message


def test_directory_instead_of_file(tmp_path: Path) -> None:
    with pytest.raises(CheckpointFileError) as info:
        read_header(tmp_path)
    _assert_names(info.value, tmp_path, None)


def test_file_shorter_than_length_prefix(tmp_path: Path) -> None:
    path = tmp_path / "short.safetensors"
    path.write_bytes(b"\x10\x00\x00")
    with pytest.raises(CheckpointFileError, match="3 bytes, too short") as info:
        read_header(path)
    _assert_names(info.value, path, None)


def test_header_length_beyond_file(tmp_path: Path) -> None:
    path = _write_raw(tmp_path / "x.safetensors", {}, 0, length=10_000)
    with pytest.raises(CheckpointFileError, match="header length field says 10000 bytes") as info:
        read_header(path)
    _assert_names(info.value, path, None)


def test_header_length_over_limit_even_if_file_is_big(tmp_path: Path) -> None:
    path = _write_raw(tmp_path / "x.safetensors", {}, 0, length=MAX_HEADER_BYTES + 1)
    # A sparse file: big enough to hold the claimed header without using disk.
    os.truncate(path, MAX_HEADER_BYTES + 100)
    with pytest.raises(CheckpointFileError, match="limited to 100000000 bytes") as info:
        read_header(path)
    _assert_names(info.value, path, None)


def test_header_not_json(tmp_path: Path) -> None:
    path = _write_raw(tmp_path / "x.safetensors", b'{"a": {"dtype": ', 0)
    with pytest.raises(CheckpointFileError, match="not valid JSON") as info:
        read_header(path)
    _assert_names(info.value, path, None)


def test_header_not_utf8(tmp_path: Path) -> None:
    path = _write_raw(tmp_path / "x.safetensors", b'{"\xff": 1}', 0)
    with pytest.raises(CheckpointFileError, match="not valid JSON"):
        read_header(path)


def test_header_not_an_object(tmp_path: Path) -> None:
    path = _write_raw(tmp_path / "x.safetensors", [1, 2], 0)
    with pytest.raises(CheckpointFileError, match="JSON list, not a JSON object") as info:
        read_header(path)
    _assert_names(info.value, path, None)


def test_unknown_dtype(tmp_path: Path) -> None:
    path = _write_raw(tmp_path / "x.safetensors", {"w": _entry("F128", [1], 0, 16)}, 16)
    with pytest.raises(CheckpointFileError, match="unknown dtype 'F128'") as info:
        read_header(path)
    _assert_names(info.value, path, "w")


@pytest.mark.parametrize("shape", [[-1], [2, "3"], [1.5], [True], "4", None])
def test_bad_shape(tmp_path: Path, shape: object) -> None:
    header = {"w": {"dtype": "U8", "shape": shape, "data_offsets": [0, 1]}}
    path = _write_raw(tmp_path / "x.safetensors", header, 1)
    with pytest.raises(CheckpointFileError, match="list of non-negative integers") as info:
        read_header(path)
    _assert_names(info.value, path, "w")


@pytest.mark.parametrize("offsets", [[0], [0, 1, 2], [0, "4"], [-4, 0], "0,4", [0.0, 4.0]])
def test_bad_data_offsets(tmp_path: Path, offsets: object) -> None:
    header = {"w": {"dtype": "F32", "shape": [1], "data_offsets": offsets}}
    path = _write_raw(tmp_path / "x.safetensors", header, 4)
    with pytest.raises(CheckpointFileError, match="two non-negative integers") as info:
        read_header(path)
    _assert_names(info.value, path, "w")


@pytest.mark.parametrize("missing", ["dtype", "shape", "data_offsets"])
def test_missing_entry_field(tmp_path: Path, missing: str) -> None:
    entry = _entry("F32", [1], 0, 4)
    del entry[missing]
    path = _write_raw(tmp_path / "x.safetensors", {"w": entry}, 4)
    with pytest.raises(CheckpointFileError, match=f"lacks {missing}") as info:
        read_header(path)
    _assert_names(info.value, path, "w")


def test_entry_not_an_object(tmp_path: Path) -> None:
    path = _write_raw(tmp_path / "x.safetensors", {"w": [1, 2]}, 4)
    with pytest.raises(CheckpointFileError, match="not a JSON object") as info:
        read_header(path)
    _assert_names(info.value, path, "w")


def test_offsets_end_before_begin(tmp_path: Path) -> None:
    path = _write_raw(tmp_path / "x.safetensors", {"w": _entry("U8", [0], 8, 4)}, 8)
    with pytest.raises(CheckpointFileError, match="end before they begin") as info:
        read_header(path)
    _assert_names(info.value, path, "w")


def test_header_lies_about_offsets(tmp_path: Path) -> None:
    # F32[4] is 16 bytes, the offsets claim 12.
    path = _write_raw(tmp_path / "x.safetensors", {"w": _entry("F32", [4], 0, 12)}, 16)
    with pytest.raises(CheckpointFileError, match="span 12 bytes") as info:
        read_header(path)
    _assert_names(info.value, path, "w")


def test_header_lies_about_dtype(tmp_path: Path) -> None:
    # 16 bytes of data for 4 elements are F32, not the F16 the header claims.
    path = _write_raw(tmp_path / "x.safetensors", {"w": _entry("F16", [4], 0, 16)}, 16)
    with pytest.raises(CheckpointFileError, match=r"declared F16 .* 8 bytes") as info:
        read_header(path)
    _assert_names(info.value, path, "w")


def test_header_lies_about_shape(tmp_path: Path) -> None:
    path = _write_raw(tmp_path / "x.safetensors", {"w": _entry("F32", [2, 3], 0, 16)}, 16)
    with pytest.raises(CheckpointFileError, match=r"shape \[2, 3\], which is 24 bytes") as info:
        read_header(path)
    _assert_names(info.value, path, "w")


def test_offsets_beyond_file(tmp_path: Path) -> None:
    header = {"a": _entry("F32", [2], 0, 8), "w": _entry("F32", [4], 8, 24)}
    path = _write_raw(tmp_path / "x.safetensors", header, 20)
    size = path.stat().st_size
    with pytest.raises(CheckpointFileError) as info:
        read_header(path)
    needed = size - 20 + 24
    assert f"file is {size} bytes but tensor 'w' needs bytes up to {needed}" in info.value.message
    assert "the file is truncated" in info.value.message
    _assert_names(info.value, path, "w")


def test_truncated_real_file(tmp_path: Path) -> None:
    path = tmp_path / "m.safetensors"
    save_file({"a": torch.ones(4), "z": torch.ones(10)}, path)
    os.truncate(path, path.stat().st_size - 1)
    with pytest.raises(CheckpointFileError, match="the file is truncated") as info:
        read_header(path)
    _assert_names(info.value, path, "z")


def test_overlapping_tensors(tmp_path: Path) -> None:
    header = {"a": _entry("F32", [4], 0, 16), "b": _entry("F32", [2], 8, 16)}
    path = _write_raw(tmp_path / "x.safetensors", header, 16)
    with pytest.raises(CheckpointFileError, match="'a' and 'b' overlap") as info:
        read_header(path)
    _assert_names(info.value, path, "b")


def test_empty_tensors_do_not_overlap(tmp_path: Path) -> None:
    header = {
        "a": _entry("F32", [2], 0, 8),
        "e": _entry("F32", [0, 5], 4, 4),
        "b": _entry("U8", [], 8, 9),
    }
    path = _write_raw(tmp_path / "x.safetensors", header, 9)
    parsed = read_header(path)
    assert list(parsed.tensors) == ["a", "e", "b"]
    assert parsed.tensors["b"].shape == ()
    assert parsed.tensors["e"].nbytes == 0


def test_duplicate_tensor_name(tmp_path: Path) -> None:
    raw = b'{"w": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]}, '
    raw += b'"w": {"dtype": "U8", "shape": [1], "data_offsets": [1, 2]}}'
    path = _write_raw(tmp_path / "x.safetensors", raw, 2)
    with pytest.raises(CheckpointFileError, match="'w' more than once") as info:
        read_header(path)
    _assert_names(info.value, path, "w")


@pytest.mark.parametrize("metadata", [{"format": 1}, ["pt"], "pt", {"a": None}])
def test_metadata_must_map_strings_to_strings(tmp_path: Path, metadata: object) -> None:
    path = _write_raw(tmp_path / "x.safetensors", {"__metadata__": metadata}, 0)
    with pytest.raises(CheckpointFileError, match="__metadata__ must map strings") as info:
        read_header(path)
    _assert_names(info.value, path, None)


def test_never_reads_tensor_data(tmp_path: Path) -> None:
    # A 2 GB sparse data section: parsing must take no time and no memory.
    numel = 2**29
    header = {"big": _entry("F32", [numel], 0, 4 * numel)}
    path = _write_raw(tmp_path / "x.safetensors", header, 0)
    os.truncate(path, path.stat().st_size + 4 * numel)
    parsed = read_header(path)
    assert parsed.tensors["big"].nbytes == 4 * numel


def test_deeply_nested_header(tmp_path: Path) -> None:
    # Nested far past Python's recursion limit: a file error, not a RecursionError.
    path = _write_raw(tmp_path / "deep.safetensors", b"[" * 100_000 + b"]" * 100_000, 0)
    with pytest.raises(CheckpointFileError, match="too deeply") as info:
        read_header(path)
    _assert_names(info.value, path, None)


def _many_tensors(path: Path, count: int) -> Path:
    header = {f"t{i}": _entry("F32", [1], 4 * i, 4 * i + 4) for i in range(count)}
    return _write_raw(path, header | {"__metadata__": {"format": "pt"}}, 4 * count)


def test_headers_over_the_limits_are_refused_naming_the_setting(tmp_path: Path) -> None:
    path = _many_tensors(tmp_path / "many.safetensors", 100)
    size = struct.unpack("<Q", path.read_bytes()[:8])[0]
    assert len(read_header(path).tensors) == 100  # no limits by default
    exact = HeaderLimits(max_bytes=size, max_tensors=100)
    with header_limits(exact):
        assert len(read_header(path).tensors) == 100
    few = HeaderLimits(max_tensors=99, tensors_setting="the max_tensors setting")
    with header_limits(few), pytest.raises(CheckpointFileError) as info:
        read_header(path)
    assert "lists 100 tensors, over the limit of 99" in info.value.message
    assert "raise the max_tensors setting" in info.value.message
    assert info.value.details["file"] == str(path)
    small = HeaderLimits(max_bytes=size - 1, bytes_setting="the max_bytes setting")
    with header_limits(small), pytest.raises(CheckpointFileError) as info:
        read_header(path)
    assert f"is {size} bytes long, over the limit of {size - 1}" in info.value.message
    assert "raise the max_bytes setting" in info.value.message
    assert len(read_header(path).tensors) == 100  # the limits ended with their context
