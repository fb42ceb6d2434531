"""Server-Sent Events for one job: ``progress`` while it runs, one final ``status``."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable
from typing import Protocol

import anyio
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request

from merge_kernels.errors import TureenError
from service.api.schemas import ProgressEvent
from service.jobs.models import JobProgress, JobStatus

DEFAULT_POLL_SECONDS = 0.25
DEFAULT_HEARTBEAT_SECONDS = 15.0


class JobView(Protocol):
    """What a stream reads of a job's API view (``Job``, ``TrainingJob``...)."""

    @property
    def id(self) -> str: ...
    @property
    def status(self) -> JobStatus: ...
    @property
    def version(self) -> int: ...
    @property
    def progress(self) -> JobProgress: ...
    def model_dump_json(self) -> str: ...


def format_event(event: str, data: str) -> str:
    """One SSE message (``data`` is a single line of JSON)."""
    return f"event: {event}\ndata: {data}\n\n"


async def job_events(
    get_job: Callable[[str], JobView],
    job_id: str,
    request: Request,
    *,
    poll_seconds: float = DEFAULT_POLL_SECONDS,
    heartbeat_seconds: float = DEFAULT_HEARTBEAT_SECONDS,
) -> AsyncIterator[str]:
    """Follow a job in the store until it finishes.

    Yields a ``progress`` event whenever the record changes while the job is unfinished
    (the first one at once), a comment line as a heartbeat after ``heartbeat_seconds`` of
    silence, and finally a ``status`` event with the whole view in its terminal state. Stops
    early when the client disconnects or the job disappears.
    """
    last_version: int | None = None
    last_sent = time.monotonic()
    while True:
        try:
            job = await run_in_threadpool(get_job, job_id)
        except TureenError:
            return
        if job.status.finished:
            yield format_event("status", job.model_dump_json())
            return
        if job.version != last_version:
            last_version = job.version
            event = ProgressEvent(
                id=job.id, status=job.status.value, progress=job.progress.model_dump(mode="json")
            )
            yield format_event("progress", event.model_dump_json())
            last_sent = time.monotonic()
        elif time.monotonic() - last_sent >= heartbeat_seconds:
            yield ": keepalive\n\n"
            last_sent = time.monotonic()
        if await request.is_disconnected():
            return
        await anyio.sleep(poll_seconds)
