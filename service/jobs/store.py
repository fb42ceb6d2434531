"""The job store interface, so that a server database can replace the SQLite file.

A store keeps :class:`~service.jobs.models.Job` records and makes the few state changes that
must be atomic across processes (claiming the next job, requesting cancellation,
re-queueing interrupted jobs) single operations. Every write increases the record's
``version`` and sets ``updated_at``, so readers can notice changes by polling cheaply.
"""

from __future__ import annotations

import asyncio
import builtins  # `list` is a method name in the class below
import time
from collections.abc import AsyncIterator, Collection
from typing import Any, Protocol, runtime_checkable

from merge_kernels.errors import TureenError
from service.jobs.models import DEFAULT_KIND, Job, JobStatus


class IdempotencyConflictError(TureenError):
    """An idempotency key was reused with a different request body."""

    code = "idempotency_conflict"

    def __init__(self, key: str, job_id: str) -> None:
        super().__init__(
            f"idempotency key {key!r} was already used for job {job_id} with a different "
            "request body; send the same body to get that job back, or use a new key",
            details={"idempotency_key": key, "job_id": job_id},
        )


class JobNotFoundError(TureenError):
    """No job has the given id."""

    code = "not_found"

    def __init__(self, job_id: str) -> None:
        super().__init__(f"there is no job {job_id!r}", details={"job_id": job_id})


POLL_INTERVAL_S = 0.25  # how often waiting readers look at the store


@runtime_checkable
class JobStore(Protocol):
    """Where jobs are kept; safe to use from several threads and several processes.

    Attributes:
        location: what a worker process needs to reach the same store (for SQLite, the
            database file's path); see :func:`service.jobs.sqlite_store.open_store`.
    """

    location: str

    def create(
        self, job: Job, *, idempotency_key: str | None = None, body_hash: str | None = None
    ) -> tuple[Job, bool]:
        """Add a job, unless the idempotency key was used before.

        Args:
            job: the new job (its ``version`` and ``updated_at`` are set by the store).
            idempotency_key: a client's key for this request, or None.
            body_hash: a hash of the request body the key came with.

        Returns:
            ``(job, True)`` for a new job; ``(existing job, False)`` when the key was used
            before with the same body hash.

        Raises:
            IdempotencyConflictError: the key was used before with a different body hash.
        """
        ...

    def find_idempotent(
        self, idempotency_key: str, kind: str = DEFAULT_KIND
    ) -> tuple[Job, str | None] | None:
        """The job of ``kind`` created with this idempotency key and its body hash, or None.

        Keys are unique per kind (``create`` looks among the new job's kind).
        """
        ...

    def get(self, job_id: str) -> Job | None:
        """The job with this id, or None."""
        ...

    def list(
        self,
        *,
        status: JobStatus | None = None,
        limit: int = 50,
        offset: int = 0,
        kind: str | None = None,
    ) -> tuple[list[Job], int]:
        """A page of jobs (of ``kind``, or all), newest first, and the total count (with the
        same filters)."""
        ...

    def update(self, job_id: str, **fields: object) -> Job:
        """Change fields of a job atomically and return the new record.

        Raises:
            JobNotFoundError: no such job.
            TypeError: a field name that ``Job`` does not have, or ``id``.
            pydantic.ValidationError: a value ``Job`` does not accept.
        """
        ...

    def claim_next(self, kinds: Collection[str] | None = None) -> Job | None:
        """Move the oldest queued job to running (attempts + 1, started_at now), atomically.

        Args:
            kinds: only jobs of these kinds (None: any kind), so that a kind whose workers
                are all busy does not hold up the others.

        Returns:
            The claimed job, or None when nothing is queued.
        """
        ...

    def request_cancel(self, job_id: str) -> Job:
        """Cancel a job: a queued one at once, a running one by flagging it for its worker.

        A finished job is returned unchanged.

        Raises:
            JobNotFoundError: no such job.
        """
        ...

    def request_pause(self, job_id: str) -> Job:
        """Pause a job: a queued one at once (``paused``), a running one by flagging it for
        the dispatcher, which stops its worker and marks it ``paused``. A paused job keeps
        its record and its partial output, and is never claimed; other jobs are returned
        unchanged.

        Raises:
            JobNotFoundError: no such job.
        """
        ...

    def resume(self, job_id: str) -> Job:
        """Queue a paused job again (its FIFO place kept), or withdraw the pause request of
        a running one; other jobs are returned unchanged.

        Raises:
            JobNotFoundError: no such job.
        """
        ...

    def cancel_requested(self, job_id: str) -> bool:
        """Whether the job was asked to stop (True for a job that no longer exists)."""
        ...

    def requeue_interrupted(self) -> builtins.list[str]:
        """Put every running job back in the queue (at start, after a previous server died).

        A job whose pausing was asked for turns ``paused`` instead.

        Returns:
            The ids of the re-queued jobs; they keep their place (FIFO by ``created_at``).
        """
        ...

    def counts(self, kind: str | None = None) -> dict[JobStatus, int]:
        """How many jobs (of ``kind``, or all) are in each state (every state, zero too)."""
        ...

    def merge_totals(self) -> tuple[int, float, int]:
        """Over succeeded merge jobs: total bytes written, total seconds, number of jobs."""
        ...

    # -- search jobs ---------------------------------------------------------------------

    def search_state(self, job_id: str) -> dict[str, Any] | None:
        """The search state a search job saved last (None: none saved, or no such job)."""
        ...

    def save_search_state(self, job_id: str, state: dict[str, Any]) -> None:
        """Replace a search job's saved state; durable on return. A cancelled job keeps
        none (it is dropped when the job turns ``cancelled``).

        Raises:
            JobNotFoundError: no such job.
        """
        ...

    # -- end search jobs -----------------------------------------------------------------

    def close(self) -> None:
        """Release connections; the store must not be used afterwards."""
        ...


def wait_for_update(store: JobStore, job_id: str, version: int, timeout: float = 15.0) -> Job:
    """Block until the job's ``version`` differs from ``version``, or until ``timeout``.

    Polls the store a few times a second (changes may come from worker processes, which
    cannot notify this one), so call it from a worker thread in an async server.

    Returns:
        The job as it is now (unchanged when the timeout passed).

    Raises:
        JobNotFoundError: no such job.
    """
    deadline = time.monotonic() + timeout
    while True:
        job = store.get(job_id)
        if job is None:
            raise JobNotFoundError(job_id)
        if job.version != version or time.monotonic() >= deadline:
            return job
        time.sleep(min(POLL_INTERVAL_S, max(0.0, deadline - time.monotonic())))


async def watch(
    store: JobStore, job_id: str, *, interval: float = POLL_INTERVAL_S
) -> AsyncIterator[Job]:
    """Yield the job now and after every change, ending after it reaches a final state.

    For event streams. The store is read in a worker thread, so the event loop never waits
    on the database.

    Raises:
        JobNotFoundError: no such job (also if it disappears while watched).
    """
    version: int | None = None
    while True:
        job = await asyncio.to_thread(store.get, job_id)
        if job is None:
            raise JobNotFoundError(job_id)
        if job.version != version:
            version = job.version
            yield job
            if job.status.finished:
                return
        await asyncio.sleep(interval)
