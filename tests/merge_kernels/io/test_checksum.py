"""The shard checksum: zlib's CRC-32 of the whole file, whatever order the pieces come in."""

from __future__ import annotations

import itertools
import os
import random
import zlib
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from merge_kernels.io.checksum import RangeChecksum, crc32_combine, file_checksum
from merge_kernels.io.checksum import crc32 as checksum_crc32


def definition(data: bytes) -> str:
    return f"crc32:{zlib.crc32(data):08x}:{len(data)}"


@settings(max_examples=200, deadline=None)
@given(first=st.binary(max_size=300), second=st.binary(max_size=300))
def test_combine_is_the_crc_of_the_concatenation(first: bytes, second: bytes) -> None:
    joined = crc32_combine(zlib.crc32(first), zlib.crc32(second), len(second))
    assert joined == zlib.crc32(first + second)


def test_combine_handles_long_pieces() -> None:
    first, second = os.urandom(1000), bytes(5_000_000)
    assert crc32_combine(zlib.crc32(first), zlib.crc32(second), len(second)) == zlib.crc32(
        first + second
    )


@settings(max_examples=60, deadline=None)
@given(
    data=st.binary(max_size=600),
    cuts=st.lists(st.integers(0, 600), max_size=8),
    seed=st.integers(0, 1000),
)
def test_any_split_in_any_order_gives_the_definition(
    data: bytes, cuts: list[int], seed: int
) -> None:
    points = sorted({0, len(data), *(c for c in cuts if c <= len(data))})
    pieces = list(itertools.pairwise(points))
    random.Random(seed).shuffle(pieces)
    checksum = RangeChecksum()
    for start, stop in pieces:
        checksum.add(start, memoryview(data)[start:stop])
    assert checksum.hexdigest(len(data)) == definition(data)


@pytest.mark.parametrize("size", [0, 1, 63, 64, 65, 1000, (16 << 20) + 7])
def test_file_checksum_matches_the_written_one(tmp_path: Path, size: int) -> None:
    data = os.urandom(size)
    path = tmp_path / "f"
    path.write_bytes(data)
    written = RangeChecksum()
    written.add(0, data)
    assert file_checksum(path) == written.hexdigest(size) == definition(data)


def test_gaps_and_overlaps_are_refused() -> None:
    data = os.urandom(100)
    gap = RangeChecksum()
    gap.add(0, data[:40])
    gap.add(50, data[50:])
    with pytest.raises(ValueError, match="expected one at byte 40"):
        gap.hexdigest(100)
    overlap = RangeChecksum()
    overlap.add(0, data[:60])
    overlap.add(50, data[50:])
    with pytest.raises(ValueError, match="do not tile"):
        overlap.hexdigest(100)
    short = RangeChecksum()
    short.add(0, data[:60])
    with pytest.raises(ValueError, match="cover 60 bytes of a 100-byte file"):
        short.hexdigest(100)


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


@settings(max_examples=200, deadline=None)
@given(data=st.binary(max_size=2000), value=st.integers(0, 2**32 - 1))
def test_the_checksums_crc_is_zlibs(data: bytes, value: int) -> None:
    """The extension's folded CRC (or zlib itself, without the extension) is zlib.crc32."""
    assert checksum_crc32(data, value) == zlib.crc32(data, value)


def test_the_checksums_crc_is_zlibs_on_long_unaligned_views() -> None:
    data = memoryview(os.urandom((1 << 20) + 333))
    for start in (0, 1, 7, 15, 16, 64):
        assert checksum_crc32(data[start:]) == zlib.crc32(data[start:])
