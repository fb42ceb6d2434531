"""One dispatcher for every job kind: claiming, worker slots, crashes and cancellation.

:class:`Dispatcher` runs one thread that, a few times a second, reaps ended workers (a job
its worker left ``running`` fails with ``worker_crashed``, unless the kind finds its work
complete), kills workers that ignore a cancellation for the kind's grace time, and claims
the oldest queued job among the kinds with a free worker slot (FIFO across kinds; each kind
runs at most its ``concurrency`` jobs at once). Each kind's jobs go to its own
:class:`~service.jobs.worker_pool.WorkerPool` of standby workers.

Stopping leaves running jobs ``running`` in the store: the next start re-queues every kind's
(merges resume after their last finished shard; trainings start again).
"""

from __future__ import annotations

import logging
import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from service.jobs import job_log
from service.jobs.kinds import JobKind, WorkerSetup
from service.jobs.models import Job, JobError, JobStatus
from service.jobs.sqlite_store import paused_fields, utcnow
from service.jobs.store import JobStore
from service.jobs.worker import describe_exit, worker_environment
from service.jobs.worker_pool import WorkerPool
from service.settings import ServiceSettings

log = logging.getLogger(__name__)

DISPATCH_INTERVAL_S = 0.2
STALLED_AFTER_S = 30.0  # a dispatcher that has not gone round its loop this long is stuck
HELD_SLOT_GRACE_S = 10.0  # a slot still held this long after its job ended has leaked


@dataclass
class _Worker:
    kind: JobKind
    process: subprocess.Popen[bytes]
    cancel_seen_at: float | None = None
    pause_sent_at: float | None = None  # when the worker was told to stop for a pause
    job_ended_at: float | None = None  # the store shows the job over, the slot still held


class Dispatcher:
    """Runs the queued jobs of ``kinds`` from ``store`` in worker processes.

    Thread-safe: ``wake``, ``busy`` and ``problem`` may be called from any thread.

    Args:
        store: where jobs are kept.
        settings: the service settings.
        kinds: the kinds it runs.
        output_path: a job's output folder.
        log_dir: a kind's logs folder.
    """

    def __init__(
        self,
        store: JobStore,
        settings: ServiceSettings,
        kinds: Sequence[JobKind],
        *,
        output_path: Callable[[Job], Path],
        log_dir: Callable[[JobKind], Path],
    ) -> None:
        self.store = store
        self.settings = settings
        self.kinds = {kind.name: kind for kind in kinds}
        self.output_path = output_path
        self.log_dir = log_dir
        self._workers: dict[str, _Worker] = {}
        self._lock = threading.Lock()  # guards _workers
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._last_round = time.monotonic()  # when the loop last went round
        self._pools = {kind.name: self._pool(kind) for kind in kinds}

    def _pool(self, kind: JobKind) -> WorkerPool:
        setup = WorkerSetup(self.store.location, self.settings, self.log_dir(kind))
        return WorkerPool(
            lambda: kind.standby_command(setup),
            worker_environment(),
            on_free=self._freed,
            on_exit=self._wake.set,
            spare=kind.spare(self.settings),
        )

    # -- life cycle ---------------------------------------------------------------------

    def start(self) -> None:
        """Start the spare workers and the dispatching thread."""
        self._stopping.clear()
        for pool in self._pools.values():
            pool.start()
        self._thread = threading.Thread(target=self._loop, name="tureen-jobs", daemon=True)
        self._thread.start()

    def stop(self, deadline: float) -> None:
        """Stop dispatching and end the workers (by ``time.monotonic()`` ``deadline``, then
        killed); their jobs stay ``running`` for the next start."""
        self._stopping.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(max(0.0, deadline - time.monotonic()))
            self._thread = None
        for pool in self._pools.values():
            pool.stop()
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

    def wake(self) -> None:
        """Look at the store now rather than at the next round (a job was queued or
        cancelled)."""
        self._wake.set()

    def busy(self, kind: str | None = None) -> int:
        """Worker processes running a job (of ``kind``, or of any)."""
        with self._lock:
            return sum(1 for w in self._workers.values() if kind in (None, w.kind.name))

    def idle_workers(self, kind: str) -> int:
        """Standby workers of ``kind`` waiting for a job."""
        return self._pools[kind].idle_count()

    def problem(self) -> str | None:
        """Why no job can start, or None while the dispatcher works.

        It is stuck when its thread is gone, when it has not gone round its loop for
        ``STALLED_AFTER_S`` seconds, or when a worker slot is still held
        ``HELD_SLOT_GRACE_S`` seconds after its job ended (then the slot is lost and, once
        all of a kind's slots are, none of its queued jobs ever starts).
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

    # -- the loop -----------------------------------------------------------------------

    def _loop(self) -> None:
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
            self._worker_gone(worker, job)

    def _worker_gone(self, worker: _Worker, job: Job) -> None:
        """Record the outcome of a running job whose worker ended without recording it."""
        kind = worker.kind
        output = self.output_path(job)
        if not job.cancel_requested and kind.recover(self.store, job, output, self.settings):
            return  # e.g. it died after publishing the output, before recording it
        if (job.pause_requested or worker.pause_sent_at is not None) and not job.cancel_requested:
            # Stopped for a pause: what it has done stays for its resumption.
            if job.pause_requested:
                self.store.update(job.id, **paused_fields(job))
                log.info("%s %s paused", kind.noun, job.id)
            else:  # resumed after its worker was told to stop: it goes on as soon as it can
                self.store.update(
                    job.id,
                    status=JobStatus.QUEUED,
                    worker_pid=None,
                    progress=job.progress.model_copy(update={"phase": "queued"}),
                )
            return
        kind.discard(output)
        if job.cancel_requested:
            self.store.update(job.id, status=JobStatus.CANCELLED, finished_at=utcnow())
            return
        how, details = describe_exit(worker.process.returncode)
        log.error("worker of %s %s %s", kind.noun, job.id, how)
        job_log.append(self.log_dir(kind), job.id, logging.ERROR, f"the worker process {how}")
        self.store.update(
            job.id,
            status=JobStatus.FAILED,
            finished_at=utcnow(),
            error=JobError(
                code="worker_crashed",
                message=f"the worker process running this {kind.noun} {how}",
                details=details,
            ),
        )

    def _note_ended_jobs(self, busy: Sequence[tuple[str, _Worker]]) -> None:
        """Mark the slots whose job the store shows over (see ``problem``)."""
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
        """Kill workers that ignore a cancellation; stop those of jobs being paused."""
        with self._lock:
            running = list(self._workers.items())
        now = time.monotonic()
        for job_id, worker in running:
            if worker.cancel_seen_at is None:
                job = self.store.get(job_id)
                if job is None or job.cancel_requested:
                    worker.cancel_seen_at = now
                elif job.pause_requested and worker.pause_sent_at is None:
                    # Stopped as a server stop stops it: its job keeps its partial work
                    # (``_worker_gone`` marks it paused once the process has ended).
                    log.info("stopping the worker of job %s to pause it", job_id)
                    worker.pause_sent_at = now
                    worker.process.terminate()
                elif worker.pause_sent_at is not None and now - worker.pause_sent_at > (
                    worker.kind.cancel_grace_s
                ):
                    worker.process.kill()
            elif now - worker.cancel_seen_at > worker.kind.cancel_grace_s:
                log.warning("worker of job %s ignored its cancellation; killing it", job_id)
                worker.process.kill()

    def _free_kinds(self) -> list[str]:
        with self._lock:
            counts: dict[str, int] = {}
            for worker in self._workers.values():
                counts[worker.kind.name] = counts.get(worker.kind.name, 0) + 1
        return [
            name
            for name, kind in self.kinds.items()
            if counts.get(name, 0) < kind.concurrency(self.settings)
        ]

    def _fill(self) -> None:
        while not self._stopping.is_set():
            free = self._free_kinds()
            if not free:
                return
            job = self.store.claim_next(free)
            if job is None:
                return
            kind = self.kinds[job.kind]
            if job.cancel_requested:  # cancelled while waiting to resume
                kind.discard(self.output_path(job))
                self.store.update(job.id, status=JobStatus.CANCELLED, finished_at=utcnow())
                continue
            try:
                process = self._spawn(kind, job)
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
            log.info(
                "%s %s started in worker %d (attempt %d)",
                kind.noun,
                job.id,
                process.pid,
                job.attempts,
            )

    def _spawn(self, kind: JobKind, job: Job) -> subprocess.Popen[bytes]:
        def hold_slot(process: subprocess.Popen[bytes]) -> None:
            # Before the job reaches the worker: a job that ends at once frees this slot
            # (``_freed``) before ``run`` returns, and must find it taken.
            with self._lock:
                self._workers[job.id] = _Worker(kind, process)

        try:
            return self._pools[kind.name].run(job.id, self.output_path(job), hold_slot)
        except BaseException:
            with self._lock:
                self._workers.pop(job.id, None)
            raise

    def _freed(self, job_id: str) -> None:
        # The worker recorded the job's outcome and waits for another: free the slot.
        with self._lock:
            self._workers.pop(job_id, None)
        self._wake.set()
