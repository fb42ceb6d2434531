"""The block checksum: equal to its definition, independent of how bytes arrive, sensitive."""

from __future__ import annotations

import hashlib
import itertools
import os
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import merge_kernels.io.checksum as checksum
from merge_kernels.io.checksum import BlockHasher, file_checksum


def definition(data: bytes, block: int) -> str:
    top = hashlib.sha256(len(data).to_bytes(8, "little"))
    for start in range(0, max(1, len(data)), block):
        top.update(hashlib.sha256(data[start : start + block]).digest())
    return checksum.PREFIX + top.hexdigest()


@pytest.fixture
def small_blocks(monkeypatch: pytest.MonkeyPatch) -> int:
    monkeypatch.setattr(checksum, "BLOCK_BYTES", 64)
    return 64


@settings(max_examples=60, deadline=None)
@given(data=st.binary(max_size=600), cuts=st.lists(st.integers(0, 600), max_size=8))
def test_any_split_of_the_bytes_gives_the_definition(data: bytes, cuts: list[int]) -> None:
    checksum.BLOCK_BYTES, saved = 64, checksum.BLOCK_BYTES
    try:
        hasher = BlockHasher()
        points = sorted({0, len(data), *(c for c in cuts if c <= len(data))})
        for start, stop in itertools.pairwise(points):
            hasher.update(memoryview(data)[start:stop])
        assert hasher.hexdigest() == definition(data, 64)
    finally:
        checksum.BLOCK_BYTES = saved


@pytest.mark.usefixtures("small_blocks")
@pytest.mark.parametrize("size", [0, 1, 63, 64, 65, 64 * 5, 64 * 5 + 7])
def test_file_checksum_matches_the_streamed_one(tmp_path: Path, size: int) -> None:
    data = os.urandom(size)
    path = tmp_path / "f"
    path.write_bytes(data)
    streamed = BlockHasher()
    streamed.update(data)
    assert file_checksum(path) == streamed.hexdigest() == definition(data, 64)


@pytest.mark.usefixtures("small_blocks")
def test_every_byte_and_the_length_count(tmp_path: Path) -> None:
    data = bytearray(os.urandom(64 * 3 + 10))
    path = tmp_path / "f"
    path.write_bytes(data)
    original = file_checksum(path)
    for position in (0, 63, 64, 100, len(data) - 1):
        changed = bytearray(data)
        changed[position] ^= 1
        path.write_bytes(changed)
        assert file_checksum(path) != original
    path.write_bytes(data + b"\0")  # appended zeros change it too
    assert file_checksum(path) != original
