"""The checksum of an output shard: CRC-32 of the file, gathered from its pieces in any order.

A shard is recorded with its checksum when it is finished, and a resumed merge keeps the
shard only if the file still has that checksum. What it must catch is accidental damage to
the merge's own staging files (a torn or truncated write, a file changed on disk), not an
adversary, so a CRC is enough; and it is cheap where a cryptographic hash is not: zlib's
CRC-32 runs at about 3.7 GB/s on one core here, SHA-256 at 1.4 GB/s, and on a small machine
the output's hash competed with the merge itself for the cores.

The CRC is zlib's, computed by the C extension (``merge_kernels._fused.crc32``: folded with
carry-less multiplies, about 6 GB/s) where it was built, else by :func:`zlib.crc32`: the
same function either way, so a shard checksummed by one verifies with the other.

Each piece's CRC is computed when the piece is written, while its bytes are still in the
CPU cache, and the pieces' CRCs are joined in file order at the end (``crc32_combine``, as
zlib's), so pieces may be written in any order and no bytes are held for hashing:

    checksum = "crc32:" + 8 hex digits of the CRC-32 of the whole file + ":" + its length

:func:`file_checksum` recomputes it from a file on disk, to verify shards kept for a resume.
"""

from __future__ import annotations

import importlib
import threading
import zlib
from collections.abc import Callable
from pathlib import Path


def _crc_function() -> Callable[..., int]:
    try:
        extension = importlib.import_module("merge_kernels._fused")
    except ImportError:
        return zlib.crc32
    crc: Callable[..., int] = extension.crc32
    return crc


crc32 = _crc_function()  # crc32(data, value=0), as zlib.crc32

PREFIX = "crc32:"
_READ_BYTES = 16 * 1024 * 1024

# CRC-32 (zlib's reflected polynomial) arithmetic modulo P, to join the CRCs of two pieces.
_POLY = 0xEDB88320


def _multmodp(a: int, b: int) -> int:
    """a·b modulo P, in zlib's reflected bit order."""
    m = 1 << 31
    p = 0
    while True:
        if a & m:
            p ^= b
            if a & (m - 1) == 0:
                return p
        m >>= 1
        b = (b >> 1) ^ _POLY if b & 1 else b >> 1


_X2N = [1 << 30]  # x^(2^n) modulo P, for n = 0..31
for _ in range(31):
    _X2N.append(_multmodp(_X2N[-1], _X2N[-1]))


def _x2nmodp(n: int, k: int) -> int:
    """x^(n·2^k) modulo P."""
    p = 1 << 31
    while n:
        if n & 1:
            p = _multmodp(_X2N[k & 31], p)
        n >>= 1
        k += 1
    return p


def crc32_combine(crc1: int, crc2: int, length2: int) -> int:
    """The CRC-32 of A + B, from CRC(A), CRC(B) and len(B) (zlib's ``crc32_combine``)."""
    return _multmodp(_x2nmodp(length2, 3), crc1) ^ crc2


def format_checksum(crc: int, length: int) -> str:
    """The checksum string of a file with CRC-32 ``crc`` and ``length`` bytes."""
    return f"{PREFIX}{crc:08x}:{length}"


class RangeChecksum:
    """The checksum of a file written in pieces, in any order, from any thread.

    Call :meth:`add` with each piece's offset and bytes (the CRC is computed right away and
    nothing is kept), then :meth:`hexdigest` with the file's length once every byte is in.
    """

    def __init__(self) -> None:
        self._pieces: list[tuple[int, int, int]] = []  # (offset, length, crc)
        self._lock = threading.Lock()

    def add(self, offset: int, data: memoryview | bytes) -> None:
        """Account for ``data`` written at ``offset``."""
        view = memoryview(data).cast("B")
        if not len(view):
            return
        crc = crc32(view)
        with self._lock:
            self._pieces.append((offset, len(view), crc))

    def hexdigest(self, length: int) -> str:
        """The checksum of the file, whose pieces must cover ``[0, length)`` exactly once.

        Raises:
            ValueError: the pieces overlap or leave a gap.
        """
        crc = 0
        position = 0
        with self._lock:
            pieces = sorted(self._pieces)
        for offset, size, piece_crc in pieces:
            if offset != position:
                raise ValueError(
                    f"checksum pieces do not tile the file: expected one at byte {position}, "
                    f"got one at byte {offset}"
                )
            crc = crc32_combine(crc, piece_crc, size)
            position += size
        if position != length:
            raise ValueError(f"checksum pieces cover {position} bytes of a {length}-byte file")
        return format_checksum(crc, length)


def file_checksum(path: Path) -> str:
    """The checksum of a file on disk, as :class:`RangeChecksum` computes it while writing."""
    crc = 0
    length = 0
    buffer = bytearray(_READ_BYTES)
    view = memoryview(buffer)
    with path.open("rb", buffering=0) as handle:
        while True:
            got = handle.readinto(buffer)
            if not got:
                break
            crc = crc32(view[:got], crc)
            length += got
    return format_checksum(crc, length)
