"""The routes every job kind shares: list, get, cancel, events, log and output files.

:func:`add_job_routes` adds them to a kind's router (``/v1/merges``, ``/v1/trainings``...),
parametrised by a :class:`JobRoutes`: the kind, the API view of its jobs and the texts of
its operations. The kind's router adds its own submit route (and any routes of its own);
see :mod:`service.jobs.kinds` for adding a kind.
"""

# No ``from __future__ import annotations``: the endpoints are closures, and FastAPI reads
# their parameter annotations (built per kind) from the functions themselves.

import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Protocol

from fastapi import APIRouter, Depends, Header, Query, Request
from fastapi import Path as PathParam
from fastapi.responses import PlainTextResponse, StreamingResponse
from pydantic import BaseModel
from starlette.concurrency import run_in_threadpool

from service.api.deps import ManagerDep, PageOffset
from service.api.events import DEFAULT_HEARTBEAT_SECONDS, DEFAULT_POLL_SECONDS, job_events
from service.api.files import DOWNLOAD_RESPONSES, file_response, list_output_files
from service.api.job_logs import LOG_RESPONSES, LOG_SUMMARY_DOC, log_response
from service.api.schemas import FileList
from service.errors import ApiError, error_responses
from service.jobs.manager import JobManager
from service.jobs.models import Job, JobStatus

OPERATIONS = ("list", "get", "cancel", "events", "files", "download", "log")
#: Routes a kind may add too, by naming them in ``JobRoutes.order``: POST ``/{job_id}/pause``
#: and ``/{job_id}/resume`` (see :meth:`service.jobs.system.JobSystem.pause`).
PAUSE_OPERATIONS = ("pause", "resume")


class JobPage(Protocol):
    """The list model of a kind: a page of views (``JobList``, ``TrainingList``)."""

    def __init__(self, *, items: list[Any], total: int, limit: int, offset: int) -> None: ...


@dataclass(frozen=True)
class Operation:
    """How one shared route of a kind is named and documented.

    Attributes:
        name: the endpoint's name (its operation id is ``<tag>-<name>``).
        summary: the operation's summary.
        description: its description (indented continuation lines are fine); the log
            route's is the shared one of :mod:`service.api.job_logs`.
    """

    name: str
    summary: str
    description: str


@dataclass(frozen=True)
class JobRoutes:
    """A kind's shared routes.

    Attributes:
        kind: the jobs' ``Job.kind``.
        noun: how messages name one job (``job``, ``training``).
        job_model: the API view of one job.
        list_model: a page of views, built with ``items``, ``total``, ``limit``, ``offset``.
        view: the API view of a job record.
        id_description: the ``job_id`` path parameter's description.
        events_description: the events stream's 200 description.
        operations: the texts of each operation in ``order``.
        order: the routes to add, in order (the OpenAPI document's order): those of
            :data:`OPERATIONS`, and of :data:`PAUSE_OPERATIONS` for a kind that pauses.
    """

    kind: str
    noun: str
    job_model: type[BaseModel]
    list_model: Callable[..., BaseModel]
    view: Callable[[Job], BaseModel]
    id_description: str
    events_description: str
    operations: dict[str, Operation]
    order: tuple[str, ...] = field(default=OPERATIONS)


def succeeded_output(manager: JobManager, job_id: str, kind: str, noun: str) -> Path:
    """The output folder of a succeeded job of ``kind``.

    Raises:
        JobNotFoundError: no such job.
        ApiError: 409, the job has not succeeded.
    """
    job = manager.get(job_id, kind=kind)
    if job.status is not JobStatus.SUCCEEDED:
        raise ApiError(
            409,
            "job_not_succeeded",
            f"{noun} {job_id} is {job.status.value}; its files exist only once it has succeeded",
            details={"job_id": job_id, "status": job.status.value},
        )
    return manager.output_path(job)


def known_query(*names: str) -> Any:
    """A dependency refusing query parameters other than ``names`` with a 422 naming the
    first unknown one: a misspelled ``?stauts=failed`` must not list every job."""
    allowed = frozenset(names)

    def check(request: Request) -> None:
        unknown = sorted(set(request.query_params.keys()) - allowed)
        if unknown:
            raise ApiError(
                422,
                "invalid_query",
                f"unknown query parameter {unknown[0]!r}; this route takes "
                f"{', '.join(sorted(allowed)) or 'none'}",
                details={"field": unknown[0]},
            )

    return Depends(check)


def add_job_routes(router: APIRouter, spec: JobRoutes) -> None:
    """Add the shared routes of ``spec``'s kind to ``router``, in ``spec.order``."""
    kind, noun = spec.kind, spec.noun
    job_id_type = Annotated[str, PathParam(description=spec.id_description, max_length=128)]

    def view(manager: JobManager, job_id: str) -> BaseModel:
        return spec.view(manager.get(job_id, kind=kind))

    async def list_jobs(
        manager: ManagerDep,
        status: Annotated[JobStatus | None, Query(description="Only jobs in this state.")] = None,
        limit: Annotated[int, Query(ge=1, le=500)] = 50,
        offset: PageOffset = 0,
    ) -> Any:
        jobs, total = await run_in_threadpool(
            lambda: manager.list(status=status, limit=limit, offset=offset, kind=kind)
        )
        items = [spec.view(job) for job in jobs]
        return spec.list_model(items=items, total=total, limit=limit, offset=offset)

    async def get_job(job_id: job_id_type, manager: ManagerDep) -> Any:
        return await run_in_threadpool(view, manager, job_id)

    async def cancel_job(job_id: job_id_type, manager: ManagerDep) -> Any:
        return spec.view(await run_in_threadpool(lambda: manager.cancel(job_id, kind=kind)))

    async def pause_job(job_id: job_id_type, manager: ManagerDep) -> Any:
        return spec.view(await run_in_threadpool(lambda: manager.pause(job_id, kind=kind)))

    async def resume_job(job_id: job_id_type, manager: ManagerDep) -> Any:
        return spec.view(await run_in_threadpool(lambda: manager.resume(job_id, kind=kind)))

    async def job_events_stream(
        job_id: job_id_type, request: Request, manager: ManagerDep
    ) -> StreamingResponse:
        await run_in_threadpool(view, manager, job_id)  # 404 before the stream starts
        state = request.app.state
        stream = job_events(
            lambda job_id: view(manager, job_id),  # type: ignore[arg-type,return-value]
            job_id,
            request,
            poll_seconds=getattr(state, "sse_poll_seconds", DEFAULT_POLL_SECONDS),
            heartbeat_seconds=getattr(state, "sse_heartbeat_seconds", DEFAULT_HEARTBEAT_SECONDS),
        )
        return StreamingResponse(
            stream,
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )

    async def list_files(
        job_id: job_id_type,
        manager: ManagerDep,
        sha256: Annotated[bool, Query(description="Also compute each file's SHA-256.")] = False,
    ) -> FileList:
        def listing() -> FileList:
            root = succeeded_output(manager, job_id, kind, noun)
            return FileList(job_id=job_id, files=list_output_files(root, checksums=sha256))

        return await run_in_threadpool(listing)

    async def download_file(
        job_id: job_id_type,
        path: str,
        manager: ManagerDep,
        range_header: Annotated[
            str | None,
            Header(alias="Range", description="One range: `bytes=a-b`, `bytes=a-` or `bytes=-n`."),
        ] = None,
    ) -> StreamingResponse:
        root = await run_in_threadpool(succeeded_output, manager, job_id, kind, noun)
        missing = f"{noun} {job_id} has no output file {path!r}"
        return await run_in_threadpool(file_response, root, path, range_header, missing)

    async def job_log(job_id: job_id_type, manager: ManagerDep) -> PlainTextResponse:
        return log_response(await run_in_threadpool(lambda: manager.log(job_id, kind=kind)))

    not_found = error_responses(401, 404, 422)
    routes: dict[str, tuple[str, Callable[..., Any], dict[str, Any]]] = {
        "list": (
            "",
            list_jobs,
            {
                "response_model": spec.list_model,
                "responses": error_responses(401, 422),
                "dependencies": [known_query("status", "limit", "offset")],
            },
        ),
        "get": ("/{job_id}", get_job, {"response_model": spec.job_model, "responses": not_found}),
        "cancel": (
            "/{job_id}",
            cancel_job,
            {
                "methods": ["DELETE"],
                "status_code": 202,
                "response_model": spec.job_model,
                "responses": not_found,
            },
        ),
        **{
            operation: (
                f"/{{job_id}}/{operation}",
                endpoint,
                {
                    "methods": ["POST"],
                    "status_code": 202,
                    "response_model": spec.job_model,
                    "responses": not_found,
                },
            )
            for operation, endpoint in (("pause", pause_job), ("resume", resume_job))
        },
        "events": (
            "/{job_id}/events",
            job_events_stream,
            {
                "response_class": StreamingResponse,
                "responses": {
                    200: {
                        "description": spec.events_description,
                        "content": {"text/event-stream": {"schema": {"type": "string"}}},
                    },
                    **not_found,
                },
            },
        ),
        "files": (
            "/{job_id}/files",
            list_files,
            {
                "response_model": FileList,
                "responses": error_responses(401, 404, 409, 422),
                "dependencies": [known_query("sha256")],
            },
        ),
        "download": (
            "/{job_id}/files/{path:path}",
            download_file,
            {"response_class": StreamingResponse, "responses": DOWNLOAD_RESPONSES},
        ),
        "log": (
            "/{job_id}/log",
            job_log,
            {"response_class": PlainTextResponse, "responses": LOG_RESPONSES},
        ),
    }
    for operation in spec.order:
        path, endpoint, options = routes[operation]
        text = spec.operations[operation]
        options.setdefault("methods", ["GET"])
        description = LOG_SUMMARY_DOC if operation == "log" else inspect.cleandoc(text.description)
        router.add_api_route(
            path,
            endpoint,
            name=text.name,
            summary=text.summary,
            description=description,
            **options,
        )
