"""Accepting, dispatching, cancelling and watching merge jobs.

:class:`JobManager` validates a merge before it becomes a job (the plan is built from
headers, so a bad recipe or incompatible checkpoints are refused at once), keeps at most
``settings.workers`` worker processes running (see :mod:`service.jobs.worker`), first in
first out, and notices workers that die: their jobs fail with ``worker_crashed`` while the
service carries on. Stopping the manager leaves running jobs ``running`` in the store, so the
next start re-queues them and the engine resumes each after its last finished shard.
"""

from __future__ import annotations

import logging
import os
import subprocess
import threading
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from merge_kernels.checkpoints import open_checkpoint
from merge_kernels.errors import TureenError
from merge_kernels.io.disk_space import require_space
from merge_kernels.io.safetensors_header import header_limits
from merge_kernels.multi_merge import MergeStep, MultiMerge
from merge_kernels.plan import MergePlan, PlannedInput
from merge_kernels.recipe import Recipe
from merge_kernels.runner import MergeOptions, close_inputs, plan_merge
from merge_kernels.slices import input_references
from service.evaluation.config import build_evaluator
from service.hub import Publisher
from service.jobs import job_log
from service.jobs.models import Job, JobError, JobStage, JobStatus, OutputOptions
from service.jobs.sqlite_store import utcnow
from service.jobs.stages import in_stage, recipe_record, stage_records, stage_warnings
from service.jobs.store import (
    IdempotencyConflictError,
    JobNotFoundError,
    JobStore,
    wait_for_update,
    watch,
)
from service.jobs.worker import (
    describe_exit,
    discard_staging,
    record_if_committed,
    with_output_options,
    worker_command,
    worker_environment,
)
from service.jobs.worker_pool import WorkerPool
from service.settings import ServiceSettings

__all__ = [
    "IdempotencyConflictError",
    "JobManager",
    "JobNotFoundError",
    "OutputExistsError",
    "OverMemoryBudgetError",
]

log = logging.getLogger(__name__)

DISPATCH_INTERVAL_S = 0.2
CANCEL_GRACE_S = 5.0  # a worker that ignores a cancel this long is killed
STALLED_AFTER_S = 30.0  # a dispatcher that has not gone round its loop this long is stuck
HELD_SLOT_GRACE_S = 10.0  # a slot still held this long after its job ended has leaked


class OverMemoryBudgetError(TureenError):
    """The merge's estimated peak memory exceeds the service's memory budget."""

    code = "over_memory_budget"

    def __init__(self, estimate: int, budget: int) -> None:
        super().__init__(
            f"this merge is estimated to need {estimate / 1024**3:.2f} GiB ({estimate} bytes) "
            f"of memory at its peak, more than the service's budget of "
            f"{budget / 1024**3:.2f} GiB ({budget} bytes); merge fewer or smaller models",
            details={"estimate_bytes": estimate, "budget_bytes": budget},
        )


class OutputExistsError(TureenError):
    """The requested output name is taken by an existing folder or an unfinished job."""

    code = "output_exists"

    def __init__(self, name: str, reason: str) -> None:
        super().__init__(
            f"output name {name!r} is taken ({reason}); choose another name or leave it out",
            details={"name": name},
        )


@dataclass
class _Worker:
    process: subprocess.Popen[bytes]
    cancel_seen_at: float | None = None
    job_ended_at: float | None = None  # the store shows the job over, the slot still held


class JobManager:
    """Runs merge jobs from a store in worker processes.

    Thread-safe: ``submit``, ``cancel``, ``get``, ``list``, ``wait_for_update``, ``watch``
    and ``metrics`` may be called from any thread while the dispatcher thread runs.

    Args:
        store: where jobs are kept.
        settings: the service settings (data dir, allowed roots, workers, budget, device).
    """

    def __init__(self, store: JobStore, settings: ServiceSettings) -> None:
        self.store = store
        self.settings = settings
        self._workers: dict[str, _Worker] = {}
        self._lock = threading.Lock()  # guards _workers and output-name checks
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._last_round = time.monotonic()  # when the dispatcher last went round its loop
        self._pool = WorkerPool(
            lambda: self._command(None),
            worker_environment(),
            on_free=self._freed,
            on_exit=self._wake.set,
            spare=1 if settings.standby_worker else 0,
        )
        # Publishing to the Hugging Face Hub runs in this process (see service.hub).
        self.publisher = Publisher(store, settings, self.output_path)

    # -- life cycle ---------------------------------------------------------------------

    def start(self) -> None:
        """Re-queue jobs a previous server left running, then start dispatching.

        Only one manager may serve a store at a time: another one's running jobs would be
        re-queued and run twice.
        """
        self.settings.outputs_dir.mkdir(parents=True, exist_ok=True)
        self.settings.inputs_dir.mkdir(parents=True, exist_ok=True)
        requeued = self.store.requeue_interrupted()
        if requeued:
            log.info("re-queued %d interrupted job(s): %s", len(requeued), ", ".join(requeued))
        self._stopping.clear()
        self._pool.start()
        self._thread = threading.Thread(target=self._dispatch, name="tureen-jobs", daemon=True)
        self._thread.start()
        self.publisher.start()  # publishing to the Hub

    def stop(self, timeout: float = 10.0) -> None:
        """Stop dispatching and end running workers; their jobs stay ``running`` to resume.

        Args:
            timeout: seconds to wait for the dispatcher and the workers before killing them.
        """
        deadline = time.monotonic() + timeout
        self._stopping.set()
        self._wake.set()
        self.publisher.stop(max(0.0, deadline - time.monotonic()) / 2)  # publishing to the Hub
        if self._thread is not None:
            self._thread.join(max(0.0, deadline - time.monotonic()))
            self._thread = None
        self._pool.stop()
        with self._lock:
            workers, self._workers = dict(self._workers), {}
        for worker in workers.values():
            worker.process.terminate()
        for job_id, worker in workers.items():
            try:
                worker.process.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning("worker of job %s did not stop; killing it", job_id)
                worker.process.kill()
                worker.process.wait()

    # -- requests -----------------------------------------------------------------------

    def engine_options(self, output: OutputOptions | None = None) -> MergeOptions:
        """The engine options jobs run with (and are planned with), for ``output``."""
        options = MergeOptions(
            device=self.settings.device,
            allowed_roots=self.settings.input_roots,
            base_dir=self.settings.inputs_dir,
            executor=self.settings.executor,
            ray_address=self.settings.ray_address,
        )
        return with_output_options(options, output) if output is not None else options

    def check_evaluator(self, recipe: Recipe) -> None:
        """Check the recipe's evaluator (data file inside the roots, host allowed), if any.

        Checked before a job exists, so that a bad data path or a disallowed host is a 4xx,
        not a failed job.

        Raises:
            RecipeError: naming ``evaluator.*``.
        """
        if recipe.method.needs_evaluation or recipe.evaluator is not None:
            options = self.engine_options()
            build_evaluator(
                recipe.evaluator,
                base_dir=options.base_dir,
                allowed_roots=options.allowed_roots,
                allowed_hosts=self.settings.evaluator_hosts,
                device=options.device,
            )

    def plan(self, recipe: Recipe, output: OutputOptions) -> tuple[MergePlan, list[PlannedInput]]:
        """Plan the merge as a job would run it, within the service's header limits, after
        checking its evaluator; the caller closes the inputs.

        Raises:
            RecipeError, CheckpointNotFoundError, CheckpointFileError: the merge cannot be
                planned (headers over the limits included).
        """
        self.check_evaluator(recipe)
        with header_limits(self.settings.header_limits()):
            return plan_merge(recipe, self.engine_options(output))

    def validate(self, recipe: Recipe, output: OutputOptions) -> int:
        """Plan the merge from headers, as a job would run it, and check the memory budget.

        Returns:
            The plan's peak-memory estimate in bytes.

        Raises:
            RecipeError, IncompatibleCheckpointsError, CheckpointNotFoundError,
            CheckpointFileError: the merge cannot run.
            OverMemoryBudgetError: the estimate exceeds ``settings.memory_budget_bytes``.
            InsufficientSpaceError: the output does not fit on the data dir's disk.
        """
        options = self.engine_options(output)
        plan, inputs = self.plan(recipe, output)
        try:
            plan.raise_for_problems()
            estimate = plan.peak_memory_estimate()
            output_bytes = plan.output_bytes
        finally:
            close_inputs(inputs)
        # Refused now rather than failed later; the worker checks again before it writes.
        require_space(self.settings.outputs_dir, output_bytes, options.space_reserve_bytes)
        budget = self.settings.memory_budget_bytes
        if budget is not None and estimate > budget:
            raise OverMemoryBudgetError(estimate, budget)
        return estimate

    def submit(
        self,
        recipe: Recipe,
        output: OutputOptions,
        *,
        idempotency_key: str | None = None,
        body_hash: str | None = None,
        hub_token: str | None = None,
    ) -> tuple[Job, bool]:
        """Validate a merge and queue it as a job.

        Blocks while the inputs' headers are read (for Hub references, downloaded), so call
        it from a worker thread in an async server.

        Args:
            recipe: the validated recipe.
            output: the client's output options.
            idempotency_key: the client's key for this request; a repeat with the same
                ``body_hash`` returns the first job without validating again.
            body_hash: a hash of the request body.
            hub_token: the request's Hugging Face token for ``output.publish``; held in this
                process's memory only (see :mod:`service.hub`), never stored.

        Returns:
            ``(job, created)``: the queued job, and False when the key returned an
            existing job.

        Raises:
            IdempotencyConflictError: the key was used with a different body.
            OutputExistsError: ``output.name`` is taken.
            OverMemoryBudgetError: the merge needs more memory than the budget.
            TureenError: the engine's errors for a merge that cannot run (see ``validate``).
        """
        repeat = self._idempotent_repeat(idempotency_key, body_hash)
        if repeat is not None:
            return repeat, False
        self.validate(recipe, output)
        return self._create(
            recipe.model_dump(mode="json"),
            output,
            warnings=recipe.warnings(),
            stages=None,
            idempotency_key=idempotency_key,
            body_hash=body_hash,
            hub_token=hub_token,
            method=recipe.merge_method,
        )

    def plan_stage(
        self, step: MergeStep, output: OutputOptions, intermediate_dir: Path
    ) -> tuple[MergePlan, list[PlannedInput]] | None:
        """Plan one stage of a multi-document merge; errors name the stage.

        A stage that reads another stage's output (``intermediate_dir/name``, not written
        before the job runs) cannot be planned yet: its other inputs are opened (headers
        only), so that every file under them is checked against the roots now, and None is
        returned.

        Raises:
            As :meth:`plan`, the message and details naming the stage.
        """
        try:
            if not step.needs:
                return self.plan(step.recipe, output)
            options = self.engine_options(output)
            with header_limits(self.settings.header_limits()):
                for _, _, reference in input_references(step.recipe):
                    if not str(reference).startswith(f"{intermediate_dir}/"):
                        with open_checkpoint(
                            reference,
                            allowed_roots=options.allowed_roots,
                            allow_pickle=options.allow_pickle,
                            base_dir=options.base_dir,
                        ) as checkpoint:
                            # Read through the confinement, as a plan reads them.
                            _ = (checkpoint.config, checkpoint.entries())
            return None
        except TureenError as error:
            raise in_stage(error, step) from None

    def validate_stages(self, merges: MultiMerge, output: OutputOptions) -> None:
        """:meth:`validate` every stage that can be planned before the job runs: those that
        read only the request's checkpoints. The others are planned as they start; their
        other inputs are opened now (see :meth:`plan_stage`).

        Raises:
            As :meth:`validate`, the message and details naming the stage.
        """
        for step in merges.steps:
            if step.needs:
                self.plan_stage(step, output, merges.intermediate_dir)
                continue
            try:
                self.validate(step.recipe, output)
            except TureenError as error:
                raise in_stage(error, step) from None

    def submit_stages(
        self,
        merges: MultiMerge,
        output: OutputOptions,
        *,
        idempotency_key: str | None = None,
        body_hash: str | None = None,
        hub_token: str | None = None,
    ) -> tuple[Job, bool]:
        """Validate a multi-document merge and queue it as one job (see :meth:`submit`).

        The job's stages run in ``merges``' order; only the final one writes the output.

        Raises:
            As :meth:`submit`, errors of a stage naming it.
        """
        repeat = self._idempotent_repeat(idempotency_key, body_hash)
        if repeat is not None:
            return repeat, False
        self.validate_stages(merges, output)
        return self._create(
            recipe_record(merges),
            output,
            warnings=stage_warnings(merges),
            stages=stage_records(merges),
            idempotency_key=idempotency_key,
            body_hash=body_hash,
            hub_token=hub_token,
            method=" then ".join(step.recipe.merge_method for step in merges.steps),
        )

    def _idempotent_repeat(self, key: str | None, body_hash: str | None) -> Job | None:
        """The job a repeated request with ``key`` created, or None for a new request.

        Raises:
            IdempotencyConflictError: the key was used with a different body.
        """
        if key is None:
            return None
        found = self.store.find_idempotent(key)
        if found is None:
            return None
        job, known_hash = found
        if known_hash != body_hash:
            raise IdempotencyConflictError(key, job.id)
        return job

    def _create(
        self,
        recipe: dict[str, Any],
        output: OutputOptions,
        *,
        warnings: list[str],
        stages: list[JobStage] | None,
        idempotency_key: str | None,
        body_hash: str | None,
        hub_token: str | None,
        method: str,
    ) -> tuple[Job, bool]:
        with self._lock:  # no two submissions may claim the same output name
            if output.name is not None:
                self._check_output_name(output.name)
            job = Job(
                id=uuid.uuid4().hex,
                status=JobStatus.QUEUED,
                recipe=recipe,
                output=output,
                created_at=utcnow(),
                warnings=warnings,
                stages=stages,
                publish=(  # publishing to the Hub
                    Publisher.initial(output.publish, hub_token) if output.publish else None
                ),
            )
            job, created = self.store.create(
                job, idempotency_key=idempotency_key, body_hash=body_hash
            )
            if created and output.publish is not None:
                self.publisher.remember(job.id, hub_token)
        if created:
            log.info("job %s queued (%s)", job.id, method)
            self._wake.set()
        return job, created

    def _check_output_name(self, name: str) -> None:
        if os.path.lexists(self.settings.outputs_dir / name):
            raise OutputExistsError(name, "an output folder of that name exists")
        for status in (JobStatus.QUEUED, JobStatus.RUNNING):
            offset = 0
            while True:
                page, total = self.store.list(status=status, limit=500, offset=offset)
                if any(job.output.name == name for job in page):
                    raise OutputExistsError(name, "an unfinished job writes to it")
                offset += len(page)
                if not page or offset >= total:
                    break

    def cancel(self, job_id: str) -> Job:
        """Cancel a job: a queued one at once, a running one within seconds.

        Returns:
            The job after the request (``cancel_requested`` set; finished jobs unchanged).

        Raises:
            JobNotFoundError: no such job.
        """
        before = self.get(job_id)
        job = self.store.request_cancel(job_id)
        if before.status is JobStatus.QUEUED and before.attempts > 0:
            # An interrupted job waiting to resume has partial output: drop it.
            discard_staging(self.output_path(job))
        self._wake.set()
        return job

    def get(self, job_id: str) -> Job:
        """The job with this id.

        Raises:
            JobNotFoundError: no such job.
        """
        job = self.store.get(job_id)
        if job is None:
            raise JobNotFoundError(job_id)
        return job

    def list(
        self, *, status: JobStatus | None = None, limit: int = 50, offset: int = 0
    ) -> tuple[list[Job], int]:
        """A page of jobs, newest first, and the total count."""
        return self.store.list(status=status, limit=limit, offset=offset)

    def wait_for_update(self, job_id: str, version: int, timeout: float = 15.0) -> Job:
        """Block until the job's version differs from ``version`` or ``timeout`` passes.

        See :func:`service.jobs.store.wait_for_update`; for async code use :meth:`watch`.
        """
        return wait_for_update(self.store, job_id, version, timeout)

    def watch(self, job_id: str) -> AsyncIterator[Job]:
        """The job now and after each change until it is final; see ``store.watch``."""
        return watch(self.store, job_id)

    @property
    def log_dir(self) -> Path:
        """Where the jobs' logs are kept, ``data_dir/logs/merges``."""
        return job_log.logs_dir(self.settings.data_dir, "merges")

    def log(self, job_id: str) -> str:
        """The job's log so far (see :mod:`service.jobs.job_log`).

        Raises:
            JobNotFoundError: no such job.
        """
        self.get(job_id)
        return job_log.read(self.log_dir, job_id)

    def output_path(self, job: Job) -> Path:
        """The job's output folder: ``outputs_dir / (output.name or job.id)``.

        Raises:
            ValueError: the name would leave the outputs folder (never for a valid job).
        """
        root = self.settings.outputs_dir.resolve()
        path = root / (job.output.name or job.id)
        if path.parent != root or path.name in ("", ".", ".."):
            raise ValueError(f"output name {path.name!r} leaves the outputs folder")
        return path

    def metrics(self) -> dict[str, float]:
        """Numbers for Prometheus, keyed by sample name with labels.

        Keys: ``tureen_jobs{state="<status>"}`` for every status,
        ``tureen_workers_busy``, ``tureen_merged_bytes_total``,
        ``tureen_merge_seconds_sum`` and ``tureen_merge_seconds_count`` (succeeded jobs).
        """
        result: dict[str, float] = {
            f'tureen_jobs{{state="{status.value}"}}': float(count)
            for status, count in self.store.counts().items()
        }
        with self._lock:
            result["tureen_workers_busy"] = float(len(self._workers))
        merged_bytes, seconds, count = self.store.merge_totals()
        result["tureen_merged_bytes_total"] = float(merged_bytes)
        result["tureen_merge_seconds_sum"] = seconds
        result["tureen_merge_seconds_count"] = float(count)
        return result

    # -- dispatching --------------------------------------------------------------------

    def dispatcher_problem(self) -> str | None:
        """Why the dispatcher cannot start jobs, or None while it works.

        It is stuck when its thread is gone, when it has not gone round its loop for
        ``STALLED_AFTER_S`` seconds, or when a worker slot is still held
        ``HELD_SLOT_GRACE_S`` seconds after its job ended (then the slot is lost and, once
        all slots are, no queued job ever starts).
        """
        thread = self._thread
        if thread is None or not thread.is_alive():
            return "the job dispatcher is not running"
        idle = time.monotonic() - self._last_round
        if idle > STALLED_AFTER_S:
            return f"the job dispatcher has not run for {idle:.0f} s"
        now = time.monotonic()
        with self._lock:
            leaked = [
                job_id
                for job_id, worker in self._workers.items()
                if worker.job_ended_at is not None and now - worker.job_ended_at > HELD_SLOT_GRACE_S
            ]
        if leaked:
            return f"worker slots are held by jobs that ended: {', '.join(sorted(leaked))}"
        return None

    def _dispatch(self) -> None:
        while not self._stopping.is_set():
            self._last_round = time.monotonic()
            try:
                self._reap()
                self._enforce_cancels()
                self._fill()
            except Exception:  # the dispatcher must outlive a bad moment of the database
                log.exception("job dispatcher error; retrying")
            self._wake.wait(DISPATCH_INTERVAL_S)
            self._wake.clear()

    def _reap(self) -> None:
        with self._lock:
            ended = {
                job_id: worker
                for job_id, worker in self._workers.items()
                if worker.process.poll() is not None
            }
            for job_id in ended:
                del self._workers[job_id]
            busy = list(self._workers.items())
        self._note_ended_jobs(busy)
        for job_id, worker in ended.items():
            job = self.store.get(job_id)
            if job is None or job.status is not JobStatus.RUNNING:
                continue  # the worker recorded the outcome
            output = self.output_path(job)
            if not job.cancel_requested and record_if_committed(
                self.store, job, output, self.engine_options()
            ):
                continue  # it died after publishing the output, before recording it
            discard_staging(output)
            returncode = worker.process.returncode
            if job.cancel_requested:
                self.store.update(job_id, status=JobStatus.CANCELLED, finished_at=utcnow())
                continue
            how, details = describe_exit(returncode)
            log.error("worker of job %s %s", job_id, how)
            job_log.append(self.log_dir, job_id, logging.ERROR, f"the worker process {how}")
            self.store.update(
                job_id,
                status=JobStatus.FAILED,
                finished_at=utcnow(),
                error=JobError(
                    code="worker_crashed",
                    message=f"the worker process running this job {how}",
                    details=details,
                ),
            )

    def _note_ended_jobs(self, busy: Sequence[tuple[str, _Worker]]) -> None:
        """Mark the slots whose job the store shows over (see ``dispatcher_problem``)."""
        now = time.monotonic()
        for job_id, worker in busy:
            job = self.store.get(job_id)
            over = job is None or job.status is not JobStatus.RUNNING
            if not over:
                worker.job_ended_at = None
            elif worker.job_ended_at is None:
                worker.job_ended_at = now
            elif now - worker.job_ended_at > HELD_SLOT_GRACE_S:
                log.error("the worker slot of job %s is still held after the job ended", job_id)

    def _enforce_cancels(self) -> None:
        with self._lock:
            running = list(self._workers.items())
        now = time.monotonic()
        for job_id, worker in running:
            if worker.cancel_seen_at is None:
                if self.store.cancel_requested(job_id):
                    worker.cancel_seen_at = now
            elif now - worker.cancel_seen_at > CANCEL_GRACE_S:
                log.warning("worker of job %s ignored its cancellation; killing it", job_id)
                worker.process.kill()

    def _fill(self) -> None:
        while not self._stopping.is_set():
            with self._lock:
                if len(self._workers) >= self.settings.workers:
                    return
            job = self.store.claim_next()
            if job is None:
                return
            if job.cancel_requested:  # cancelled while waiting to resume
                discard_staging(self.output_path(job))
                self.store.update(job.id, status=JobStatus.CANCELLED, finished_at=utcnow())
                continue
            try:
                process = self._spawn(job)
            except Exception as error:
                log.exception("cannot start a worker for job %s", job.id)
                self.store.update(
                    job.id,
                    status=JobStatus.FAILED,
                    finished_at=utcnow(),
                    error=JobError(
                        code="internal_error", message=f"cannot start a worker: {error}"
                    ),
                )
                continue
            self.store.update(job.id, worker_pid=process.pid)
            log.info("job %s started in worker %d (attempt %d)", job.id, process.pid, job.attempts)

    def _command(self, job: Job | None) -> Sequence[str]:
        return worker_command(
            None if job is None else job.id,
            store_location=self.store.location,
            output=None if job is None else self.output_path(job),
            device=self.settings.device,
            base_dir=self.settings.inputs_dir,
            allowed_roots=self.settings.input_roots,
            evaluator_hosts=self.settings.evaluator_hosts,
            log_level=self.settings.log_level,
            public_url=self.settings.public_url,
            log_dir=self.log_dir,
            executor=self.settings.executor,
            ray_address=self.settings.ray_address,
        )

    def _spawn(self, job: Job) -> subprocess.Popen[bytes]:
        def hold_slot(process: subprocess.Popen[bytes]) -> None:
            # Before the job reaches the worker: a job that ends at once frees this slot
            # (``_freed``) before ``run`` returns, and must find it taken.
            with self._lock:
                self._workers[job.id] = _Worker(process)

        try:
            return self._pool.run(job.id, self.output_path(job), hold_slot)
        except BaseException:
            with self._lock:
                self._workers.pop(job.id, None)
            raise

    def _freed(self, job_id: str) -> None:
        # The worker recorded the job's outcome and waits for another: free the slot.
        with self._lock:
            self._workers.pop(job_id, None)
        self._wake.set()
