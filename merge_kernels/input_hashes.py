"""The sha256 of every input weight file, hashed beside the merge rather than after it.

The model card identifies each input by its weight files' sha256, so that two fine-tunes
of one base (same names, shapes and offsets) are told apart. Hashing reads every input once
more, so it starts when the merge starts, on threads of its own (a file per core at a time)
at the lowest scheduling priority: it takes cores the merge leaves idle (waiting on reads,
or on a machine with more cores than the kernels use) and finishes after it only on a
machine the merge keeps busy.
A digest is remembered, keyed by the file's device, inode, size and modification time, in
the process and in a small SQLite cache (``$XDG_CACHE_HOME/tureen``, else
``~/.cache/tureen``; without a writable one, in the process only), so an input is hashed
once however often it is merged: by warm workers, greedy soups and later runs alike. Files
in the Hugging Face cache are links to blobs named by this very hash (the Hub's LFS object
id, checked at download), so they are not read at all.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import sqlite3
import threading
from collections.abc import Sequence
from concurrent.futures import Future
from pathlib import Path

from merge_kernels.checkpoints import Checkpoint
from merge_kernels.io.safetensors_header import FileOpener
from merge_kernels.thread_pools import shared_pool

_SHA256_HEX = re.compile(r"[0-9a-f]{64}")
_DIGESTS: dict[str, str] = {}
_LOCK = threading.Lock()
CACHE_FILE = "file-sha256.sqlite3"


def cache_folder() -> Path:
    """Where digests are remembered between processes."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "tureen"


def _remembered(key: str) -> str | None:
    with _LOCK:
        known = _DIGESTS.get(key)
    if known is not None:
        return known
    try:
        with contextlib.closing(sqlite3.connect(cache_folder() / CACHE_FILE, timeout=5)) as db:
            row = db.execute("SELECT sha256 FROM digests WHERE file = ?", (key,)).fetchone()
    except sqlite3.Error:
        return None
    return str(row[0]) if row is not None else None


def _remember(key: str, digest: str) -> None:
    with _LOCK:
        _DIGESTS[key] = digest
    try:
        folder = cache_folder()
        folder.mkdir(parents=True, exist_ok=True)
        with contextlib.closing(sqlite3.connect(folder / CACHE_FILE, timeout=5)) as db, db:
            db.execute("CREATE TABLE IF NOT EXISTS digests (file TEXT PRIMARY KEY, sha256 TEXT)")
            db.execute("INSERT OR REPLACE INTO digests VALUES (?, ?)", (key, digest))
    except (OSError, sqlite3.Error):
        pass  # remembered in this process only


def _lower_this_threads_priority() -> None:
    with contextlib.suppress(AttributeError, OSError):  # Linux: a thread id names one thread
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)


def file_sha256(path: Path, open_file: FileOpener) -> str:
    """The sha256 of a weight file, as ``sha256sum`` prints it.

    Args:
        path: the file.
        open_file: how it is opened (a checkpoint's ``open_file``, confined to its roots).
    """
    target = Path(os.path.realpath(path))
    if target.parent.name == "blobs" and _SHA256_HEX.fullmatch(target.name):
        return target.name
    with os.fdopen(open_file(path), "rb") as handle:
        status = os.fstat(handle.fileno())
        # A file rewritten in place changes its size or modification time, and so its key.
        key = f"{status.st_dev}:{status.st_ino}:{status.st_size}:{status.st_mtime_ns}"
        known = _remembered(key)
        if known is not None:
            return known
        digest = hashlib.file_digest(handle, "sha256").hexdigest()
    _remember(key, digest)
    return digest


class InputHashes:
    """The weight files' sha256 of some checkpoints, being computed in the background."""

    def __init__(self, checkpoints: Sequence[Checkpoint]) -> None:
        """Start hashing every weight file of ``checkpoints``, a file per core at a time."""
        pool = shared_pool("hash-inputs", min(8, os.cpu_count() or 1))
        self._futures: dict[Path, Future[str]] = {}
        for checkpoint in checkpoints:
            for path in checkpoint.files():
                if path not in self._futures:
                    self._futures[path] = pool.submit(self._hash, checkpoint, path)

    @staticmethod
    def _hash(checkpoint: Checkpoint, path: Path) -> str:
        _lower_this_threads_priority()
        return file_sha256(path, checkpoint.open_file)

    def sha256(self, path: Path) -> str:
        """The digest of ``path`` (one of the checkpoints' files), waiting for it if need be.

        Raises:
            OSError, PathOutsideRootsError: the file could not be read.
        """
        return self._futures[path].result()

    def __enter__(self) -> InputHashes:
        return self

    def __exit__(self, *exc_info: object) -> None:
        # Files not started yet are dropped (the merge failed or was cancelled).
        for future in self._futures.values():
            future.cancel()
