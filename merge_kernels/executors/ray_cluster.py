"""The Ray executor: a merge's output shards computed as tasks of a Ray cluster.

Ray (https://docs.ray.io) schedules the tasks; tureen only cuts the work and records it:

- one task per output shard, or per group of consecutive small shards (``task_bytes`` of
  output at most, a larger shard alone);
- every task declares ``num_cpus`` and a ``memory`` resource, the plan's peak-memory
  estimate for its shards, so Ray never places more tasks on a node than the memory the
  node declares holds;
- a task lost with its node is run again elsewhere (``max_retries``: Ray retries system
  failures only; an error of the merge itself fails the merge at once);
- back-pressure: at most ``max_in_flight`` tasks are submitted at a time, more as
  ``ray.wait`` returns finished ones;
- tasks write the shards into the output's staging folder themselves and return checksums
  (:mod:`merge_kernels.executors.ray_tasks`); the driver records each shard in the resume
  manifest as its task returns, and the runner publishes the folder atomically once all are
  done: a re-run (after the driver was killed) redoes only the shards not recorded;
- statistics that span tensors (the TIES paper's model-wide trim) are a map-reduce over the
  same tasks before the merge (:mod:`merge_kernels.executors.trim_reduce`).

Every node needs tureen installed (the same version) and must see the inputs and the output
folder at the same paths as the driver (a shared filesystem).
"""

from __future__ import annotations

import logging
import secrets
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from merge_kernels.errors import MergeCancelledError
from merge_kernels.executors import ExecutorUnavailableError, ShardTaskLostError, ShardWork
from merge_kernels.executors.hub_inputs import hub_inputs, node_fingerprint
from merge_kernels.executors.hub_upload import ShardUpload, prepare_repository, record_uploads
from merge_kernels.executors.local import shard_tensors
from merge_kernels.executors.ray_tasks import (
    PART_SUFFIX,
    NodeJob,
    TaskReport,
    histogram_task,
    merge_shards_task,
    tie_counts_task,
)
from merge_kernels.executors.trim_reduce import (
    MergeableSelect,
    TieCounts,
    TrimScope,
    model_trim_scope,
    reduce_model_trims,
)
from merge_kernels.io.shard_plan import ShardSpec
from merge_kernels.methods.kernel import TrimState
from merge_kernels.methods.magnitude_select import MagnitudeThreshold
from merge_kernels.pieces import PieceKey
from merge_kernels.plan import MergePlan

log = logging.getLogger(__name__)

DEFAULT_TASK_BYTES = 1 << 30  # output bytes per task: shards this small are grouped
DEFAULT_MAX_RETRIES = 3
WAIT_SECONDS = 0.5  # how often the driver looks for cancellation while tasks run
STOP_SECONDS = 10.0  # how long stopped tasks get to end before the staging folder goes


def import_ray() -> Any:
    """The ``ray`` module, or an error saying how to install it."""
    try:
        import ray
    except ImportError:
        raise ExecutorUnavailableError(
            "the ray executor needs the ray package, which is not installed here: install "
            "it with pip install 'tureen[ray]', or merge with the local executor",
            details={"executor": "ray"},
        ) from None
    return ray


@dataclass(frozen=True)
class ShardGroup:
    """The shards one task writes.

    Attributes:
        filenames: the shards, in the plan's order.
        bytes: their total size.
        memory: peak memory the task is expected to need (its ``memory`` resource).
    """

    filenames: tuple[str, ...]
    bytes: int
    memory: int


def shard_memory(plan: MergePlan, shard: ShardSpec) -> int:
    """Peak memory expected while merging ``shard``: the plan's estimate over its tensors."""
    alone = MergePlan(recipe=plan.recipe, inputs=plan.inputs, tensors=shard_tensors(plan, shard))
    return alone.peak_memory_estimate()


def group_shards(plan: MergePlan, shards: Sequence[ShardSpec], task_bytes: int) -> list[ShardGroup]:
    """Consecutive ``shards`` gathered into tasks of at most ``task_bytes`` (a larger shard
    is a task of its own)."""
    groups: list[ShardGroup] = []
    current: list[ShardSpec] = []

    def close() -> None:
        if current:
            groups.append(
                ShardGroup(
                    tuple(s.filename for s in current),
                    sum(s.size for s in current),
                    max(shard_memory(plan, s) for s in current),
                )
            )
            current.clear()

    for shard in shards:
        if current and sum(s.size for s in current) + shard.size > task_bytes:
            close()
        current.append(shard)
    close()
    return groups


class RayExecutor:
    """Merges the pending shards as tasks of a Ray cluster.

    Attributes:
        reports: what each merge task of the last run returned, in the order they finished.
        round_trips: for each of ``reports``, when the driver submitted the task and when it
            had its result (wall-clock seconds): against the task's own times, what Ray's
            scheduling and the wait for a free CPU cost.
    """

    name = "ray"

    def __init__(
        self,
        address: str | None = None,
        *,
        task_bytes: int = DEFAULT_TASK_BYTES,
        max_retries: int = DEFAULT_MAX_RETRIES,
        max_in_flight: int | None = None,
        num_cpus: float = 1.0,
        resources: Mapping[str, float] | None = None,
        upload: ShardUpload | None = None,
    ) -> None:
        """Describe how to run; nothing connects until a merge runs.

        Args:
            address: the cluster to connect to (None: ``RAY_ADDRESS``, else a cluster
                started on this machine, else a new local one); ignored when this process
                is already connected.
            task_bytes: shards are grouped into tasks of about this many output bytes.
            max_retries: how often a task lost with its node is run again.
            max_in_flight: most tasks submitted at once (None: twice the cluster's CPUs).
            num_cpus: CPUs each task declares.
            resources: custom resources each task also declares (e.g. to keep merges on a
                pool of nodes that offer them).
            upload: pre-upload each shard to this Hub repository from the node that wrote
                it, for a publication of the output in one commit that sends no shard from
                the driver (:mod:`merge_kernels.executors.hub_upload`).

        Raises:
            ExecutorUnavailableError: the ``ray`` package is not installed.
        """
        self._ray = import_ray()
        self.address = address
        self.task_bytes = task_bytes
        self.max_retries = max_retries
        self.max_in_flight = max_in_flight
        self.num_cpus = num_cpus
        self.resources = dict(resources or {})
        self.upload = upload
        self.reports: list[TaskReport] = []
        self.round_trips: list[tuple[float, float]] = []

    def __repr__(self) -> str:
        return f"RayExecutor(address={self.address!r})"

    def _connect(self) -> None:
        if not self._ray.is_initialized():
            self._ray.init(address=self.address)

    def _options(self, group: ShardGroup) -> dict[str, Any]:
        return {
            # Shard tasks are bound by memory and disk more than by CPU: spread over the
            # nodes, they put every node's memory and disk to work (Ray's default packs
            # tasks onto few nodes first).
            "scheduling_strategy": "SPREAD",
            "num_cpus": self.num_cpus,
            "memory": group.memory,
            "max_retries": self.max_retries,
            "resources": self.resources,
        }

    def merge_shards(self, work: ShardWork) -> None:
        """Merge the pending shards on the cluster, recording each as its task returns.

        Raises:
            ExecutorUnavailableError: no node of the cluster declares the memory some task
                needs.
            ShardTaskLostError: a task was lost more than ``max_retries`` times.
            MergeCancelledError: the merge was cancelled (running tasks are stopped first).
        """
        self._connect()
        ray = self._ray
        plan, counters = work.plan, work.counters
        self.reports = []
        self.round_trips = []
        submitted: dict[ShardGroup, float] = {}
        shards = {shard.filename: shard for shard in plan.shards}
        for shard in plan.shards:
            if shard.filename in work.done:
                counters["tensors"] += len(shard.tensors)
                counters["bytes"] += shard.size
                work.report(None)
        options = work.options
        node_options = replace(
            options,
            executor="local",
            ray_address=None,
            base_dir=(options.base_dir or Path.cwd()).resolve(),
        )
        hub = hub_inputs(plan)
        job = NodeJob(
            run=secrets.token_hex(8),
            recipe=plan.recipe,
            options=node_options,
            fingerprint=work.staging.fingerprint,
            staging=str(work.staging.path.resolve()),
            hub_inputs=hub,
            node_fingerprint=node_fingerprint(plan, hub),
            upload=self.upload,
        )
        if self.upload is not None:
            prepare_repository(self.upload)
        job_ref = ray.put(job)
        pending = [s for s in plan.shards if s.filename not in work.done]
        groups = group_shards(plan, pending, self.task_bytes)
        scope = model_trim_scope(plan) if pending else None
        trims: dict[PieceKey, tuple[TrimState, ...]] = {}
        if scope is not None:
            trims = self._model_trims(work, job_ref, scope)
        self._check_memory(groups)
        log.info(
            "merging %d shards in %d tasks on a Ray cluster of %d nodes",
            len(pending),
            len(groups),
            sum(1 for node in ray.nodes() if node["Alive"]),
        )
        remote = ray.remote(merge_shards_task)
        shard_of = {t.name: s.filename for s in plan.shards for t in s.tensors}

        def submit(group: ShardGroup) -> Any:
            names = set(group.filenames)
            own = {key: state for key, state in trims.items() if shard_of[key[0]] in names}
            submitted[group] = time.time()
            return remote.options(**self._options(group)).remote(job_ref, group.filenames, own)

        def record(group: ShardGroup, report: TaskReport) -> None:
            self.reports.append(report)
            self.round_trips.append((submitted[group], time.time()))
            if report.uploads:  # before the shards are recorded as done
                record_uploads(work.staging.path, report.uploads)
            for filename, digest in report.shards:
                work.staging.mark_shard_done(filename, digest)
                counters["tensors"] += len(shards[filename].tensors)
                counters["bytes"] += shards[filename].size
                work.report(None)

        try:
            self._run(work, groups, submit, record)
        finally:
            _clear_parts(work.staging.path)
        missing = [s.filename for s in pending if s.filename not in work.staging.completed()]
        if missing:  # never publish an output with a shard missing, whatever happened
            raise ShardTaskLostError(
                f"shards {', '.join(missing)} were not written; run the merge again to "
                "resume after the others",
                details={"executor": "ray", "shards": missing},
            )

    def _model_trims(
        self, work: ShardWork, job_ref: Any, scope: TrimScope
    ) -> dict[PieceKey, tuple[TrimState, ...]]:
        """The model-wide trim states, by map-reduce over every shard the scope touches."""
        plan = work.plan
        names = {piece.tensor.name for piece in scope.pieces}
        touched = [s for s in plan.shards if any(t.name in names for t in s.tensors)]
        groups = group_shards(plan, touched, self.task_bytes)
        self._check_memory(groups)
        histograms = self._ray.remote(histogram_task)
        ties = self._ray.remote(tie_counts_task)

        def map_histograms(selectors: list[MergeableSelect]) -> Iterable[list[MergeableSelect]]:
            parts: list[list[MergeableSelect]] = []
            self._run(
                work,
                groups,
                lambda g: histograms.options(**self._options(g)).remote(
                    job_ref, g.filenames, selectors
                ),
                lambda _, part: parts.append(part),
            )
            return parts

        def map_tie_counts(thresholds: list[MagnitudeThreshold]) -> Iterable[TieCounts]:
            parts: list[TieCounts] = []
            self._run(
                work,
                groups,
                lambda g: ties.options(**self._options(g)).remote(job_ref, g.filenames, thresholds),
                lambda _, part: parts.append(part),
            )
            return parts

        return reduce_model_trims(scope, map_histograms, map_tie_counts)

    def _check_memory(self, groups: Sequence[ShardGroup]) -> None:
        if not groups:
            return
        ray = self._ray
        largest = max(
            (float(node["Resources"].get("memory", 0)) for node in ray.nodes() if node["Alive"]),
            default=0.0,
        )
        needed = max(groups, key=lambda g: g.memory)
        if needed.memory > largest:
            raise ExecutorUnavailableError(
                f"merging {', '.join(needed.filenames)} needs about {needed.memory / 2**30:.1f} "
                f"GiB of memory, but the largest node of the Ray cluster declares "
                f"{largest / 2**30:.1f} GiB: add a node with more memory, or merge in smaller "
                "pieces (a smaller shard size or chunk size)",
                details={"executor": "ray", "memory_bytes": needed.memory},
            )

    def _limit(self) -> int:
        if self.max_in_flight is not None:
            return max(1, self.max_in_flight)
        return max(2, 2 * int(self._ray.cluster_resources().get("CPU", 1)))

    def _run(
        self,
        work: ShardWork,
        groups: Sequence[ShardGroup],
        submit: Callable[[ShardGroup], Any],
        done: Callable[[ShardGroup, Any], None],
    ) -> None:
        """Run one task per group, ``max_in_flight`` at a time; ``done`` gets each result."""
        ray = self._ray
        queue = deque(groups)
        running: dict[Any, ShardGroup] = {}
        limit = self._limit()
        try:
            while queue or running:
                while queue and len(running) < limit:
                    group = queue.popleft()
                    running[submit(group)] = group
                ready, _ = ray.wait(list(running), num_returns=1, timeout=WAIT_SECONDS)
                if ready:
                    ready, _ = ray.wait(list(running), num_returns=len(running), timeout=0)
                for ref in ready:
                    group = running.pop(ref)
                    done(group, self._result(ref, group))
                if work.should_cancel():
                    self._stop(running)
                    running = {}
                    work.check_cancel()  # discards the staging folder and raises
                    raise MergeCancelledError("the merge was cancelled")
        except BaseException:
            self._stop(running)
            raise

    def _result(self, ref: Any, group: ShardGroup) -> Any:
        ray = self._ray
        try:
            return ray.get(ref)
        except ray.exceptions.RayTaskError as error:
            log.debug("a task of %s failed: %s", ", ".join(group.filenames), error)
            cause = error.cause
            if isinstance(cause, Exception):
                raise cause from None  # the merge's own error, as the local executor raises it
            raise
        except ray.exceptions.RayError as error:
            raise ShardTaskLostError(
                f"the task merging {', '.join(group.filenames)} failed on the Ray cluster "
                f"({type(error).__name__}) after {self.max_retries} retries: the shards "
                "finished so far are kept; run the merge again to resume after them",
                details={"executor": "ray", "shards": list(group.filenames)},
            ) from error

    def _stop(self, running: Mapping[Any, ShardGroup]) -> None:
        """Cancel the running tasks and give them a moment to end."""
        if not running:
            return
        ray = self._ray
        refs = list(running)
        for ref in refs:
            try:
                ray.cancel(ref, force=True)
            except Exception:  # a task that just finished cannot be cancelled: nothing to stop
                log.debug("cannot cancel a task", exc_info=True)
        ray.wait(refs, num_returns=len(refs), timeout=STOP_SECONDS)


def _clear_parts(folder: Path) -> None:
    """Delete shards left half-written under a temporary name by tasks that were lost."""
    if not folder.is_dir():
        return
    for entry in folder.iterdir():
        if entry.name.startswith(".") and entry.name.endswith(PART_SUFFIX):
            entry.unlink(missing_ok=True)
