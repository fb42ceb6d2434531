"""Free space: checked before a merge writes, and recognised when a disk fills anyway.

A merge knows its output's size from the plan before it writes a byte, so it refuses at once
when the output's filesystem cannot hold it (plus a reserve, so that the system and the job
database keep room to work), rather than failing hours later. A disk can still fill during
the merge (another writer, a quota, a file-size limit): those write errors become the same
:class:`~merge_kernels.errors.InsufficientSpaceError`.
"""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path

from merge_kernels.errors import InsufficientSpaceError

DEFAULT_RESERVE_BYTES = 64 << 20  # left free beyond the output: logs, the job database
_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})


def _existing(folder: Path) -> Path:
    """``folder``, or its nearest ancestor that exists (what a new folder would live on)."""
    folder = Path(folder).absolute()
    while not folder.exists() and folder.parent != folder:
        folder = folder.parent
    return folder


def free_bytes(folder: Path) -> int:
    """Bytes an unprivileged writer may still use on the filesystem of ``folder``."""
    return shutil.disk_usage(_existing(folder)).free


def _gib(size: int) -> str:
    return f"{size / 1024**3:.2f} GiB ({size} bytes)"


def require_space(folder: Path, needed: int, reserve: int = DEFAULT_RESERVE_BYTES) -> None:
    """Check that ``folder``'s filesystem holds ``needed`` more bytes and keeps ``reserve``.

    Raises:
        InsufficientSpaceError: it does not; ``details`` has ``needed_bytes``,
            ``free_bytes``, ``reserve_bytes`` and ``folder``.
    """
    free = free_bytes(folder)
    if needed + reserve <= free:
        return
    raise InsufficientSpaceError(
        f"{folder} has {_gib(free)} free, but this merge writes {_gib(needed)} there and "
        f"{_gib(reserve)} must stay free; free some space or write the output elsewhere",
        details={
            "folder": str(folder),
            "needed_bytes": needed,
            "free_bytes": free,
            "reserve_bytes": reserve,
        },
    )


def is_disk_full(error: BaseException) -> bool:
    """True for a write error that means no more room: full disk, quota or file-size limit."""
    return isinstance(error, OSError) and error.errno in _FULL_ERRNOS


def disk_full_error(error: OSError, folder: Path) -> InsufficientSpaceError:
    """The :class:`InsufficientSpaceError` for a write to ``folder`` that ran out of room."""
    try:
        free: int | None = free_bytes(folder)
    except OSError:
        free = None
    reason = os.strerror(error.errno) if error.errno is not None else str(error)
    return InsufficientSpaceError(
        f"writing to {folder} failed: {reason}; free some space (or raise the quota or file "
        "size limit) and run the merge again",
        details={"folder": str(folder), "free_bytes": free, "errno": error.errno},
    )
