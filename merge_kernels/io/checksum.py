"""The checksum of an output shard: SHA-256 over fixed-size blocks, hashed in parallel.

One SHA-256 over a whole file runs on one core at about 1–2 GB/s, which bounds how fast a
merge can finish a shard on a machine whose other stages are fast. This checksum hashes each
16 MiB block of the file separately (blocks in parallel threads; hashlib releases the GIL)
and then hashes the blocks' digests in order, with the file's length:

    checksum = "sha256-blocks:" + sha256(len(file) as 8 bytes || sha256(block_0) || ...)

It detects the same changes a whole-file SHA-256 does (it is a Merkle tree of SHA-256), and
:func:`file_checksum` recomputes it from a file on disk, to verify shards kept for a resume.
"""

from __future__ import annotations

import hashlib
import os
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

BLOCK_BYTES = 16 * 1024 * 1024
PREFIX = "sha256-blocks:"
_POOL: ThreadPoolExecutor | None = None
_POOL_LOCK = threading.Lock()


def _pool() -> ThreadPoolExecutor:
    global _POOL
    with _POOL_LOCK:
        if _POOL is None:
            _POOL = ThreadPoolExecutor(
                max_workers=max(1, min(8, os.cpu_count() or 1)), thread_name_prefix="tureen-sha"
            )
        return _POOL


def _hash_parts(parts: list[memoryview]) -> bytes:
    sha = hashlib.sha256()
    for part in parts:
        sha.update(part)
    return sha.digest()


class BlockHasher:
    """Feed a file's bytes in order; get :data:`PREFIX` + the hex checksum.

    Full blocks are hashed on a shared thread pool while more bytes arrive. At most
    ``2 × threads`` blocks wait or run at a time (:meth:`update` blocks beyond that), so the
    bytes held for hashing stay bounded. Callers must not modify the bytes they pass in
    until :meth:`hexdigest` returns.
    """

    def __init__(self) -> None:
        pool = _pool()
        self._slots = threading.BoundedSemaphore(2 * pool._max_workers)
        self._blocks: list[Future[bytes]] = []
        self._parts: list[memoryview] = []
        self._filled = 0
        self._length = 0

    def update(self, data: memoryview | bytes) -> None:
        """Hash ``data`` next."""
        view = memoryview(data).cast("B")
        self._length += len(view)
        while len(view):
            take = min(len(view), BLOCK_BYTES - self._filled)
            self._parts.append(view[:take])
            self._filled += take
            view = view[take:]
            if self._filled == BLOCK_BYTES:
                self._submit()

    def _submit(self) -> None:
        parts, self._parts, self._filled = self._parts, [], 0
        self._slots.acquire()
        release: Callable[[Future[bytes]], None] = lambda _: self._slots.release()  # noqa: E731
        future = _pool().submit(_hash_parts, parts)
        future.add_done_callback(release)
        self._blocks.append(future)

    def hexdigest(self) -> str:
        """Wait for every block; the checksum."""
        if self._parts or not self._blocks:
            self._submit()
        top = hashlib.sha256(self._length.to_bytes(8, "little"))
        for block in self._blocks:
            top.update(block.result())
        return PREFIX + top.hexdigest()

    def cancel(self) -> None:
        """Drop what is queued (the running blocks end on their own)."""
        for block in self._blocks:
            block.cancel()
        self._parts = []


def file_checksum(path: Path) -> str:
    """The checksum of a file on disk, as :class:`BlockHasher` computes it while writing."""
    hasher = BlockHasher()
    with path.open("rb", buffering=0) as handle:
        while True:
            block = bytearray(BLOCK_BYTES)
            got = handle.readinto(block)
            if not got:
                break
            hasher.update(memoryview(block)[:got])
    return hasher.hexdigest()
