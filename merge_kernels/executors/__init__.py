"""Where a merge's output shards are computed: in this process, or as tasks of a Ray cluster.

An output shard is the merge's unit of work: it is planned from headers alone, written in
place, checksummed and recorded in the resume manifest on its own (:mod:`merge_kernels.io`).
An executor takes the shards a run still needs and gets each one written and recorded; what
comes before (planning, staging, the disk-space check) and after (companion files, model
card, atomic publication) is the runner's, whatever the executor.

- ``local`` (:class:`~merge_kernels.executors.local.LocalExecutor`, the default): one shard
  after another in this process.
- ``ray`` (:class:`~merge_kernels.executors.ray_cluster.RayExecutor`): one Ray task per
  shard, or per group of small shards, on a cluster that shares the input and output
  filesystem (``pip install 'tureen[ray]'``).
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from merge_kernels.errors import RecipeError, TureenError
from merge_kernels.suggestions import did_you_mean

if TYPE_CHECKING:
    from merge_kernels.io.staging import StagingDir
    from merge_kernels.plan import MergePlan
    from merge_kernels.runner import MergeOptions

EXECUTOR_NAMES = ("local", "ray")


class ExecutorUnavailableError(TureenError):
    """The executor asked for cannot run here (its package is not installed, no cluster)."""

    code = "executor_unavailable"


class ShardTaskLostError(TureenError):
    """A shard's task was lost more often than it may be retried (nodes kept failing)."""

    code = "executor_failed"


@dataclass
class ShardWork:
    """The shards one run of a merge still has to write, and how to report on them.

    Attributes:
        plan: the merge plan (inputs opened).
        staging: the output's staging folder, prepared; finished shards are recorded in it.
        done: shards a previous run finished (verified), to be skipped.
        options: how the merge runs.
        check_cancel: raises MergeCancelledError (after discarding the staging folder) when
            the merge was cancelled; call it only where the staging folder may go.
        should_cancel: whether the merge was cancelled, without acting on it.
        counters: ``tensors`` and ``bytes`` done so far, updated as shards finish.
        report: reports progress (the counters) with the tensor in work, if any.
    """

    plan: MergePlan
    staging: StagingDir
    done: Collection[str]
    options: MergeOptions
    check_cancel: Callable[[], None]
    should_cancel: Callable[[], bool]
    counters: dict[str, int]
    report: Callable[[str | None], None]


class ShardExecutor(Protocol):
    """Writes and records every shard of a :class:`ShardWork` that is not done yet."""

    @property
    def name(self) -> str:
        """``local``, ``ray``...: what the executor is called in settings and messages."""

    def merge_shards(self, work: ShardWork) -> None:
        """Write each pending shard into ``work.staging`` and record it there.

        Raises:
            MergeCancelledError: the merge was cancelled.
            TureenError: a shard could not be merged (the shards recorded so far are kept).
        """


def executor_for(options: MergeOptions) -> ShardExecutor:
    """The executor ``options.executor`` names (or is).

    Raises:
        RecipeError: an unknown executor name (field ``executor``).
        ExecutorUnavailableError: ``ray`` without the ``ray`` package installed.
    """
    chosen = options.executor
    if not isinstance(chosen, str):
        return chosen
    if chosen == "local":
        from merge_kernels.executors.local import LocalExecutor

        return LocalExecutor()
    if chosen == "ray":
        from merge_kernels.executors.ray_cluster import RayExecutor

        return RayExecutor(address=options.ray_address)
    raise RecipeError(
        "executor",
        f"unknown executor {chosen!r}: {did_you_mean(chosen, EXECUTOR_NAMES)}"
        f"use one of {', '.join(EXECUTOR_NAMES)}",
    )
