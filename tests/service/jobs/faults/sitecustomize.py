"""Fault injection for crash tests: a process started with this folder first on PYTHONPATH
and ``MERGE_FAULT_KILL_AT`` set kills itself with SIGKILL at the named point of a merge.

Points: ``after_commit`` (the output folder renamed into place, nothing recorded yet),
``before_commit`` (every file written, nothing published), ``after_shard:N`` (the N-th shard
of this process recorded in the staging manifest). With ``MERGE_FAULT_KILL_PARENT=1`` the
process first kills its parent (the server of a worker) the same way: the whole machine stops
at that point, as in a power cut. ``MERGE_FAULT_DISK_FULL_AT=after_shard:N`` instead makes
the write after the N-th shard fail as on a full disk (ENOSPC). Without the variables nothing
changes.
"""

from __future__ import annotations

import errno
import os
import signal


def _die() -> None:
    if os.environ.get("MERGE_FAULT_KILL_PARENT") == "1":
        os.kill(os.getppid(), signal.SIGKILL)
    os.kill(os.getpid(), signal.SIGKILL)


def _install(point: str, *, disk_full: bool = False) -> None:
    from merge_kernels.io.staging import StagingDir

    commit = StagingDir.commit
    mark = StagingDir.mark_shard_done
    name, _, count = point.partition(":")
    shards = {"done": 0}

    def commit_then_die(
        self: StagingDir, *, overwrite: bool = False, keep_record: bool = False
    ) -> object:
        if name == "before_commit":
            _die()
        result = commit(self, overwrite=overwrite, keep_record=keep_record)
        if name == "after_commit":
            _die()
        return result

    def mark_then_die(self: StagingDir, filename: str, checksum: str) -> None:
        mark(self, filename, checksum)
        shards["done"] += 1
        if name == "after_shard" and shards["done"] >= int(count or 1):
            if disk_full:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), filename)
            _die()

    StagingDir.commit = commit_then_die  # type: ignore[method-assign,assignment]
    StagingDir.mark_shard_done = mark_then_die  # type: ignore[method-assign]


_point = os.environ.get("MERGE_FAULT_KILL_AT")
if _point:
    _install(_point)
_full = os.environ.get("MERGE_FAULT_DISK_FULL_AT")
if _full:
    _install(_full, disk_full=True)
