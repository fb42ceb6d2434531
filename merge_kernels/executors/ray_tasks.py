"""What runs on a Ray cluster's nodes for :mod:`merge_kernels.executors.ray_cluster`.

A task gets the job (the recipe, the engine options, the plan's fingerprint and the staging
folder, all small) and the names of its shards. It plans the merge again on its node, from
the same headers, and checks that the fingerprint matches the driver's (the nodes must see
local inputs and the output folder at the same paths: a shared filesystem; Hub inputs are
fetched on each node, only the files its tasks read: see
:mod:`merge_kernels.executors.hub_inputs`). The plan is kept for the worker process's next
task of the same run, so a run plans once per worker, not once per task. A merge task writes
each shard under a temporary name and renames it into place once complete: a task lost with
its node, or retried, never leaves a partial file under a shard's name. It returns checksums
and timings only; no tensor goes through the object store.
"""

from __future__ import annotations

import os
import secrets
import threading
import time
from collections.abc import Collection, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

from merge_kernels.errors import CheckpointFileError
from merge_kernels.executors.hub_inputs import (
    HubFiles,
    fetched_files,
    node_fingerprint,
    plan_with_hub_files,
)
from merge_kernels.executors.hub_upload import ShardUpload, UploadedFile, preupload_shard
from merge_kernels.executors.local import io_pools, write_shard
from merge_kernels.executors.trim_reduce import (
    MergeableSelect,
    TieCounts,
    TrimScope,
    histogram_part,
    model_trim_scope,
    tie_counts_part,
)
from merge_kernels.io.staging import fsync_dir
from merge_kernels.methods.kernel import TrimState
from merge_kernels.methods.magnitude_select import MagnitudeThreshold
from merge_kernels.piece_merger import PieceMerger
from merge_kernels.pieces import PieceKey
from merge_kernels.plan import MergePlan, PlannedInput
from merge_kernels.recipe import Recipe

if TYPE_CHECKING:
    from merge_kernels.runner import MergeOptions

PART_SUFFIX = ".tureen-part"


@dataclass(frozen=True)
class NodeJob:
    """One run of a merge, as its tasks need it.

    Attributes:
        run: identifies the run (a worker keeps one run's plan between tasks).
        recipe: the validated recipe.
        options: the engine options, with the local executor (a task merges in place).
        fingerprint: the driver's fingerprint of the plan.
        staging: the staging folder the shards go to.
        hub_inputs: the Hub inputs nodes fetch file by file, by position among the inputs.
        node_fingerprint: the driver's :func:`~merge_kernels.executors.hub_inputs.
            node_fingerprint` of the plan, which a node's plan must match.
        upload: where tasks pre-upload the shards they write, if anywhere.
    """

    run: str
    recipe: Recipe
    options: MergeOptions
    fingerprint: str
    staging: str
    hub_inputs: dict[int, HubFiles]
    node_fingerprint: str
    upload: ShardUpload | None = None


@dataclass(frozen=True)
class TaskReport:
    """What one merge task did: metadata only.

    Attributes:
        shards: ``(filename, checksum)`` of each shard it wrote, in order.
        node_id: the Ray node it ran on.
        pid: its worker process.
        started: wall-clock time it started (seconds since the epoch).
        planned: wall-clock time its plan was ready (the worker's first task of a run plans;
            later ones find the plan made).
        finished: wall-clock time it finished.
        fetched: ``(repository, file, bytes)`` of each Hub weight file it downloaded into
            its node's cache (files found there are not listed).
        uploads: the shards it pre-uploaded to the Hub (with ``NodeJob.upload``).
    """

    shards: tuple[tuple[str, str], ...]
    node_id: str
    pid: int
    started: float
    planned: float
    finished: float
    fetched: tuple[tuple[str, str, int], ...]
    uploads: tuple[UploadedFile, ...] = ()


_PLANNED: dict[str, tuple[MergePlan, list[PlannedInput]]] = {}
_PLANNED_LOCK = threading.Lock()


def planned(job: NodeJob) -> MergePlan:
    """The job's plan, made on this node (once per run per worker process).

    Raises:
        CheckpointFileError: the plan made here differs from the driver's.
    """
    return _planned(job)[0]


def _planned(job: NodeJob) -> tuple[MergePlan, list[PlannedInput]]:
    from merge_kernels.runner import close_inputs, plan_merge

    with _PLANNED_LOCK:
        cached = _PLANNED.get(job.run)
        if cached is not None:
            return cached
        for _, inputs in _PLANNED.values():
            close_inputs(inputs)  # another run's: its readers would only hold files open
        _PLANNED.clear()
        if job.hub_inputs:  # fetched here file by file, as tasks read them
            plan, inputs = plan_with_hub_files(job.recipe, job.options, job.hub_inputs)
        else:
            plan, inputs = plan_merge(job.recipe, job.options)
        if node_fingerprint(plan, job.hub_inputs) != job.node_fingerprint:
            close_inputs(inputs)
            raise CheckpointFileError(
                f"the inputs as node {_node_id()} sees them differ from the driver's (paths, "
                "sizes or modification times): every node must see the same input files at "
                "the same paths, on a shared filesystem",
                details={"file": None},
            )
        _PLANNED[job.run] = (plan, inputs)
        return plan, inputs


def _node_id() -> str:
    import ray

    return str(ray.get_runtime_context().get_node_id())


def _never_cancelled() -> None:
    """A task is stopped by Ray (``ray.cancel``), not by polling."""


def merge_shards_task(
    job: NodeJob,
    filenames: Sequence[str],
    trims: dict[PieceKey, tuple[TrimState, ...]],
) -> TaskReport:
    """Merge shards ``filenames`` into the staging folder; each appears only once complete.

    Args:
        job: the run.
        filenames: the shards to write, in the plan's order.
        trims: the model-wide trim states of these shards' pieces, from the driver's reduce.
    """
    started = time.time()
    plan, inputs = _planned(job)
    planned_at = time.time()
    fetched_before = set(fetched_files(inputs))
    merger = PieceMerger(plan, job.options.device, _never_cancelled)
    merger.trims.update(trims)
    folder = Path(job.staging)
    wanted = set(filenames)
    written: list[tuple[str, str]] = []
    uploads: list[UploadedFile] = []
    readers, writers = io_pools()
    with readers, writers:
        for shard in plan.shards:
            if shard.filename not in wanted:
                continue
            part = replace(shard, filename=f".{shard.filename}.{secrets.token_hex(4)}{PART_SUFFIX}")
            digest = write_shard(plan, part, folder, merger, (readers, writers), _never_cancelled)
            os.replace(folder / part.filename, folder / shard.filename)
            written.append((shard.filename, digest))
            if job.upload is not None:
                uploaded = preupload_shard(folder / shard.filename, job.upload)
                if uploaded is not None:
                    uploads.append(uploaded)
    if written:
        fsync_dir(folder)
    fetched = tuple(f for f in fetched_files(inputs) if f not in fetched_before)
    return TaskReport(
        tuple(written),
        _node_id(),
        os.getpid(),
        started,
        planned_at,
        time.time(),
        fetched,
        tuple(uploads),
    )


def _scope(plan: MergePlan) -> TrimScope:
    scope = model_trim_scope(plan)
    assert scope is not None, "the driver asks for trim statistics only when the plan trims"
    return scope


def histogram_task(
    job: NodeJob, filenames: Collection[str], selectors: list[MergeableSelect]
) -> list[MergeableSelect]:
    """The map of one model-wide trim pass over shards ``filenames`` (see trim_reduce)."""
    plan = planned(job)
    return histogram_part(plan, _scope(plan), filenames, selectors)


def tie_counts_task(
    job: NodeJob, filenames: Collection[str], thresholds: list[MagnitudeThreshold]
) -> TieCounts:
    """The map of the model-wide trim's tie count over shards ``filenames``."""
    plan = planned(job)
    return tie_counts_part(plan, _scope(plan), filenames, thresholds)
