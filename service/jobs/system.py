"""The job system every kind shares: one store, one dispatcher, one way to queue and watch.

:class:`JobSystem` keeps the jobs of every registered kind (see :mod:`service.jobs.kinds`)
in one store and runs them through one :class:`~service.jobs.dispatcher.Dispatcher`. It
queues a kind's validated job (:meth:`JobSystem.enqueue`: idempotency keys and output names
are checked here, per kind), and gets, lists, cancels and watches jobs, reads their logs and
names their output folders, each call scoped to one kind so that one kind's routes never
see another's jobs. At start it takes over a training store of an older version (see
:mod:`service.jobs.store_migration`) and re-queues every job a previous server left
running.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path

from merge_kernels.errors import TureenError
from service.jobs import job_log
from service.jobs.dispatcher import Dispatcher
from service.jobs.kinds import JobKind, get_kind, registered_kinds
from service.jobs.models import DEFAULT_KIND, Job, JobStatus
from service.jobs.store import (
    IdempotencyConflictError,
    JobNotFoundError,
    JobStore,
    wait_for_update,
    watch,
)
from service.jobs.store_migration import adopt_training_store
from service.settings import ServiceSettings

log = logging.getLogger(__name__)


class OutputExistsError(TureenError):
    """The requested output name is taken by an existing folder or an unfinished job."""

    code = "output_exists"

    def __init__(self, name: str, reason: str) -> None:
        super().__init__(
            f"output name {name!r} is taken ({reason}); choose another name or leave it out",
            details={"name": name},
        )


class JobSystem:
    """Jobs of every registered kind, in one store, run by one dispatcher.

    Thread-safe: every public method may be called from any thread while the dispatcher
    runs. The kinds are those registered when it is created.

    Args:
        store: where jobs are kept.
        settings: the service settings.
    """

    def __init__(self, store: JobStore, settings: ServiceSettings) -> None:
        self.store = store
        self.settings = settings
        self.kinds = {kind.name: kind for kind in registered_kinds()}
        self._lock = threading.Lock()  # no two submissions may claim the same output name
        self.dispatcher = Dispatcher(
            store,
            settings,
            tuple(self.kinds.values()),
            output_path=self.output_path,
            log_dir=lambda kind: self.kind_log_dir(kind.name),
        )

    # -- life cycle ---------------------------------------------------------------------

    def start(self) -> None:
        """Take over an older training store, re-queue the jobs a previous server left
        running, then start dispatching.

        Only one manager may serve a store at a time: another one's running jobs would be
        re-queued and run twice.
        """
        self.settings.inputs_dir.mkdir(parents=True, exist_ok=True)
        for kind in self.kinds.values():
            kind.output_root(self.settings).mkdir(parents=True, exist_ok=True)
        adopt_training_store(self.store, self.settings.data_dir)
        requeued = self.store.requeue_interrupted()
        if requeued:
            log.info("re-queued %d interrupted job(s): %s", len(requeued), ", ".join(requeued))
        self.dispatcher.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop dispatching and end running workers; their jobs stay ``running`` to resume.

        Args:
            timeout: seconds to wait for the dispatcher and the workers before killing them.
        """
        self.dispatcher.stop(time.monotonic() + timeout)

    def dispatcher_problem(self) -> str | None:
        """Why no job can start, or None while the dispatcher works (see
        :meth:`Dispatcher.problem`)."""
        return self.dispatcher.problem()

    # -- queueing -----------------------------------------------------------------------

    def idempotent_repeat(self, kind: str, key: str | None, body_hash: str | None) -> Job | None:
        """The job of ``kind`` a repeated request with ``key`` created, or None for a new one.

        Raises:
            IdempotencyConflictError: the key was used with a different body.
        """
        if key is None:
            return None
        found = self.store.find_idempotent(key, kind)
        if found is None:
            return None
        job, known_hash = found
        if known_hash != body_hash:
            raise IdempotencyConflictError(key, job.id)
        return job

    def enqueue(
        self, job: Job, *, idempotency_key: str | None = None, body_hash: str | None = None
    ) -> tuple[Job, bool]:
        """Queue a validated job of its kind; the dispatcher starts it when a slot is free.

        Returns:
            ``(job, created)``: False when the idempotency key returned an earlier job.

        Raises:
            OutputExistsError: ``job.output.name`` is taken among the kind's outputs.
            IdempotencyConflictError: the key was used with a different body.
        """
        with self._lock:
            if job.output.name is not None:
                self._check_output_name(self.kinds[job.kind], job.output.name)
            job, created = self.store.create(
                job, idempotency_key=idempotency_key, body_hash=body_hash
            )
        if created:
            self.dispatcher.wake()
        return job, created

    def _check_output_name(self, kind: JobKind, name: str) -> None:
        if os.path.lexists(kind.output_root(self.settings) / name):
            raise OutputExistsError(name, f"an {kind.output_noun} folder of that name exists")
        for status in (JobStatus.QUEUED, JobStatus.RUNNING, JobStatus.PAUSED):
            offset = 0
            while True:
                page, total = self.store.list(
                    status=status, limit=500, offset=offset, kind=kind.name
                )
                if any(job.output.name == name for job in page):
                    raise OutputExistsError(name, f"an unfinished {kind.noun} writes to it")
                offset += len(page)
                if not page or offset >= total:
                    break

    # -- jobs of one kind ---------------------------------------------------------------

    def get(self, job_id: str, *, kind: str = DEFAULT_KIND) -> Job:
        """The job of ``kind`` with this id.

        Raises:
            JobNotFoundError: no such job (a job of another kind is not found either).
        """
        job = self.store.get(job_id)
        if job is None or job.kind != kind:
            raise JobNotFoundError(job_id)
        return job

    def list(
        self,
        *,
        status: JobStatus | None = None,
        limit: int = 50,
        offset: int = 0,
        kind: str = DEFAULT_KIND,
    ) -> tuple[list[Job], int]:
        """A page of the jobs of ``kind``, newest first, and the total count."""
        return self.store.list(status=status, limit=limit, offset=offset, kind=kind)

    def cancel(self, job_id: str, *, kind: str = DEFAULT_KIND) -> Job:
        """Cancel a job: a queued one at once, a running one within seconds.

        Returns:
            The job after the request (``cancel_requested`` set; finished jobs unchanged).

        Raises:
            JobNotFoundError: no such job.
        """
        before = self.get(job_id, kind=kind)
        job = self.store.request_cancel(job_id)
        if before.status in (JobStatus.QUEUED, JobStatus.PAUSED) and before.attempts > 0:
            # An interrupted or paused job waiting to resume has partial output: drop it.
            self.kinds[kind].discard(self.output_path(job))
        self.dispatcher.wake()
        return job

    def pause(self, job_id: str, *, kind: str = DEFAULT_KIND) -> Job:
        """Pause a job: a queued one at once, a running one within seconds (its worker is
        stopped, as a server stop stops it, so that it resumes where it was).

        Returns:
            The job after the request (finished and paused jobs unchanged).

        Raises:
            JobNotFoundError: no such job.
        """
        self.get(job_id, kind=kind)
        job = self.store.request_pause(job_id)
        self.dispatcher.wake()
        return job

    def resume(self, job_id: str, *, kind: str = DEFAULT_KIND) -> Job:
        """Queue a paused job again (or withdraw a pause not yet carried out).

        Raises:
            JobNotFoundError: no such job.
        """
        self.get(job_id, kind=kind)
        job = self.store.resume(job_id)
        self.dispatcher.wake()
        return job

    def wait_for_update(self, job_id: str, version: int, timeout: float = 15.0) -> Job:
        """Block until the job's version differs from ``version`` or ``timeout`` passes.

        See :func:`service.jobs.store.wait_for_update`; for async code use :meth:`watch`.
        """
        return wait_for_update(self.store, job_id, version, timeout)

    def watch(self, job_id: str) -> AsyncIterator[Job]:
        """The job now and after each change until it is final; see ``store.watch``."""
        return watch(self.store, job_id)

    def kind_log_dir(self, kind: str) -> Path:
        """Where the logs of ``kind``'s jobs are kept, ``data_dir/logs/<folder>``."""
        return job_log.logs_dir(self.settings.data_dir, get_kind(kind).log_folder)

    def log(self, job_id: str, *, kind: str = DEFAULT_KIND) -> str:
        """The job's log so far (see :mod:`service.jobs.job_log`).

        Raises:
            JobNotFoundError: no such job.
        """
        self.get(job_id, kind=kind)
        return job_log.read(self.kind_log_dir(kind), job_id)

    def output_path(self, job: Job) -> Path:
        """The job's output folder: ``<its kind's output root> / (output.name or job.id)``.

        Raises:
            ValueError: the name would leave the kind's folder (never for a valid job).
        """
        root = self.kinds[job.kind].output_root(self.settings).resolve()
        path = root / (job.output.name or job.id)
        if path.parent != root or path.name in ("", ".", ".."):
            raise ValueError(f"output name {path.name!r} leaves the {job.kind} outputs folder")
        return path

    def metrics(self) -> dict[str, float]:
        """Numbers for Prometheus, keyed by sample name with labels.

        Keys: each kind's ``<metric_family>{state="<status>"}`` for every status
        (``tureen_jobs`` for merges, ``tureen_trainings``), ``tureen_workers_busy`` (workers
        running a job of any kind), ``tureen_merged_bytes_total``,
        ``tureen_merge_seconds_sum`` and ``tureen_merge_seconds_count`` (succeeded merges).
        """
        result: dict[str, float] = {}
        for kind in self.kinds.values():
            if kind.metric_family is not None:
                for status, count in self.store.counts(kind.name).items():
                    result[f'{kind.metric_family}{{state="{status.value}"}}'] = float(count)
        result["tureen_workers_busy"] = float(self.dispatcher.busy())
        merged_bytes, seconds, count = self.store.merge_totals()
        result["tureen_merged_bytes_total"] = float(merged_bytes)
        result["tureen_merge_seconds_sum"] = seconds
        result["tureen_merge_seconds_count"] = float(count)
        return result
