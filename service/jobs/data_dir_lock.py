"""One server per data dir: an exclusive lock on ``data_dir/tureen.lock``.

Two servers on one data dir would each re-queue the other's running jobs at start and run
them twice, racing on the same output folders. So a server takes an exclusive ``flock`` on a
lock file in the data dir before it opens the job stores, and keeps it until it stops; a
second server finds it held and refuses to start. The operating system drops the lock when
the process ends, however it ends, so a crashed server never leaves a stale lock behind.

Within one process the lock is counted: ``tureen serve`` takes it before the HTTP server
starts (to refuse with a clear message and a non-zero exit), and the app takes it again at
start-up (so that every way of running the app is covered).
"""

from __future__ import annotations

import fcntl
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from merge_kernels.errors import TureenError

LOCK_NAME = "tureen.lock"

_held: dict[Path, tuple[int, int]] = {}  # lock file -> (descriptor, holders in this process)
_held_lock = threading.Lock()


class DataDirLockedError(TureenError):
    """Another process (another tureen server) holds the data dir's lock."""

    code = "data_dir_locked"

    def __init__(self, data_dir: Path, holder: str) -> None:
        who = f"process {holder}" if holder else "another process"
        super().__init__(
            f"the data dir {data_dir} is in use by another tureen server ({who} holds "
            f"{data_dir / LOCK_NAME}); stop that server or give this one another --data-dir",
            details={"data_dir": str(data_dir), "holder_pid": holder or None},
        )


def acquire(data_dir: Path) -> None:
    """Take the data dir's lock for this process (again, if it holds it already).

    Creates ``data_dir`` if needed. Every call must be matched by a :func:`release`.

    Raises:
        DataDirLockedError: another process holds the lock.
        OSError: the lock file cannot be created or opened.
    """
    data_dir = Path(data_dir).resolve()
    path = data_dir / LOCK_NAME
    with _held_lock:
        if path in _held:
            descriptor, count = _held[path]
            _held[path] = (descriptor, count + 1)
            return
        data_dir.mkdir(parents=True, exist_ok=True)
        descriptor = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(descriptor, 32, 0).decode("ascii", "replace").strip()
            os.close(descriptor)
            raise DataDirLockedError(data_dir, holder) from None
        except BaseException:
            os.close(descriptor)
            raise
        # Who holds it, for the message a second server prints; the lock is the flock alone.
        os.ftruncate(descriptor, 0)
        os.pwrite(descriptor, f"{os.getpid()}\n".encode(), 0)
        _held[path] = (descriptor, 1)


def release(data_dir: Path) -> None:
    """Give back one hold of the data dir's lock; the last one unlocks it."""
    path = Path(data_dir).resolve() / LOCK_NAME
    with _held_lock:
        if path not in _held:
            return
        descriptor, count = _held[path]
        if count > 1:
            _held[path] = (descriptor, count - 1)
            return
        del _held[path]
        os.ftruncate(descriptor, 0)
        os.close(descriptor)  # closing the last descriptor drops the flock


@contextmanager
def data_dir_locked(data_dir: Path) -> Iterator[None]:
    """Hold the data dir's lock for the ``with`` block (see :func:`acquire`)."""
    acquire(data_dir)
    try:
        yield
    finally:
        release(data_dir)
