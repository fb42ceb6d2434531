"""``/v1/trainings``: submit, list, follow, cancel LoRA/DPO trainings and fetch adapters."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Annotated

import anyio
from fastapi import APIRouter, Header, Query, Request, Response
from fastapi import Path as PathParam
from fastapi.responses import PlainTextResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool

from merge_kernels.errors import TureenError
from service.api.deps import Authenticated, IdempotencyKey, PageOffset, _decode
from service.api.events import DEFAULT_HEARTBEAT_SECONDS, DEFAULT_POLL_SECONDS, format_event
from service.api.files import (
    DOWNLOAD_RESPONSES,
    file_response,
    list_output_files,
)
from service.api.job_logs import LOG_RESPONSES, LOG_SUMMARY_DOC, log_response
from service.api.schemas import FileList, ProgressEvent
from service.api.training_schemas import TrainingJob, TrainingList, training_body_openapi
from service.errors import ApiError, error_responses
from service.jobs.models import JobStatus
from service.jobs.training_manager import TrainingManager, split_request

router = APIRouter(prefix="/v1/trainings", tags=["trainings"], dependencies=[Authenticated])

JobId = Annotated[str, PathParam(description="The training job id.", max_length=128)]


def get_training_manager(request: Request) -> TrainingManager:
    """The running training manager."""
    manager = getattr(request.app.state, "trainings", None)
    if manager is None:
        raise ApiError(503, "unavailable", "the service is starting or stopping; retry shortly")
    assert isinstance(manager, TrainingManager)
    return manager


def _view(manager: TrainingManager, job_id: str) -> TrainingJob:
    job = manager.get(job_id)
    return TrainingJob.from_job(job, manager.adapter_reference(job))


@router.post(
    "",
    status_code=202,
    response_model=TrainingJob,
    summary="Submit a training",
    responses={
        200: {
            "model": TrainingJob,
            "description": "The job an earlier request with this key made.",
        },
        202: {"description": "Queued.", "headers": {"Location": {"schema": {"type": "string"}}}},
        **error_responses(401, 409, 413, 415, 422),
    },
    openapi_extra=training_body_openapi(),
)
async def submit_training(
    request: Request, response: Response, idempotency_key: IdempotencyKey = None
) -> TrainingJob:
    """Validate the config, its paths and its data, then queue the training.

    Every run reports held-out numbers before and after training (loss, token accuracy and
    exact match for LoRA; DPO loss, reward margin and preference accuracy for DPO).
    """
    manager = get_training_manager(request)
    document = _decode(await request.body(), request.headers.get("content-type", ""))
    training_request = split_request(document)
    job, created = await run_in_threadpool(
        lambda: manager.submit(training_request, idempotency_key=idempotency_key)
    )
    response.status_code = 202 if created else 200
    response.headers["Location"] = f"/v1/trainings/{job.id}"
    return TrainingJob.from_job(job, manager.adapter_reference(job))


@router.get(
    "", response_model=TrainingList, summary="List trainings", responses=error_responses(401, 422)
)
async def list_trainings(
    request: Request,
    status: Annotated[JobStatus | None, Query(description="Only jobs in this state.")] = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
    offset: PageOffset = 0,
) -> TrainingList:
    """A page of training jobs, newest first, with the total matching the filter."""
    manager = get_training_manager(request)
    jobs, total = await run_in_threadpool(
        lambda: manager.list(status=status, limit=limit, offset=offset)
    )
    items = [TrainingJob.from_job(job, manager.adapter_reference(job)) for job in jobs]
    return TrainingList(items=items, total=total, limit=limit, offset=offset)


@router.get(
    "/{job_id}",
    response_model=TrainingJob,
    summary="Get a training",
    responses=error_responses(401, 404, 422),
)
async def get_training(job_id: JobId, request: Request) -> TrainingJob:
    """Status, progress (steps, loss, ETA), error, adapter and held-out numbers."""
    return await run_in_threadpool(_view, get_training_manager(request), job_id)


@router.get(
    "/{job_id}/log",
    response_class=PlainTextResponse,
    summary="Get a training's log",
    description=LOG_SUMMARY_DOC,
    responses=LOG_RESPONSES,
)
async def training_log(job_id: JobId, request: Request) -> PlainTextResponse:
    """The training worker's log lines for this job."""
    return log_response(await run_in_threadpool(get_training_manager(request).log, job_id))


@router.delete(
    "/{job_id}",
    status_code=202,
    response_model=TrainingJob,
    summary="Cancel a training",
    responses=error_responses(401, 404, 422),
)
async def cancel_training(job_id: JobId, request: Request) -> TrainingJob:
    """Cancel: a queued training at once, a running one before its next step; no adapter
    is written. A finished job is returned unchanged."""
    manager = get_training_manager(request)
    job = await run_in_threadpool(manager.cancel, job_id)
    return TrainingJob.from_job(job, manager.adapter_reference(job))


async def _events(
    manager: TrainingManager, job_id: str, request: Request, poll: float, heartbeat: float
) -> AsyncIterator[str]:
    last_version: int | None = None
    last_sent = time.monotonic()
    while True:
        try:
            view = await run_in_threadpool(_view, manager, job_id)
        except TureenError:
            return
        if view.status.finished:
            yield format_event("status", view.model_dump_json())
            return
        if view.version != last_version:
            last_version = view.version
            event = ProgressEvent(
                id=view.id, status=view.status.value, progress=view.progress.model_dump(mode="json")
            )
            yield format_event("progress", event.model_dump_json())
            last_sent = time.monotonic()
        elif time.monotonic() - last_sent >= heartbeat:
            yield ": keepalive\n\n"
            last_sent = time.monotonic()
        if await request.is_disconnected():
            return
        await anyio.sleep(poll)


@router.get(
    "/{job_id}/events",
    response_class=StreamingResponse,
    summary="Follow a training (Server-Sent Events)",
    responses={
        200: {
            "description": "`event: progress` with `ProgressEvent` data while the training is "
            "unfinished, comment heartbeats, then one `event: status` with the finished "
            "`TrainingJob`; then the stream ends.",
            "content": {"text/event-stream": {"schema": {"type": "string"}}},
        },
        **error_responses(401, 404, 422),
    },
)
async def training_events(job_id: JobId, request: Request) -> StreamingResponse:
    """Stream the training's progress until it finishes."""
    manager = get_training_manager(request)
    await run_in_threadpool(manager.get, job_id)  # 404 before the stream starts
    state = request.app.state
    stream = _events(
        manager,
        job_id,
        request,
        getattr(state, "sse_poll_seconds", DEFAULT_POLL_SECONDS),
        getattr(state, "sse_heartbeat_seconds", DEFAULT_HEARTBEAT_SECONDS),
    )
    return StreamingResponse(
        stream,
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


def _adapter_folder(manager: TrainingManager, job_id: str) -> Path:
    job = manager.get(job_id)
    if job.status is not JobStatus.SUCCEEDED:
        raise ApiError(
            409,
            "job_not_succeeded",
            f"training {job_id} is {job.status.value}; its files exist only once it succeeded",
            details={"job_id": job_id, "status": job.status.value},
        )
    return manager.output_path(job)


@router.get(
    "/{job_id}/files",
    response_model=FileList,
    summary="List a training's adapter files",
    responses=error_responses(401, 404, 409, 422),
)
async def list_training_files(
    job_id: JobId,
    request: Request,
    sha256: Annotated[bool, Query(description="Also compute each file's SHA-256.")] = False,
) -> FileList:
    """The adapter folder's files (adapter_config.json, adapter_model.safetensors,
    training_report.json), with sizes and optional checksums."""
    manager = get_training_manager(request)

    def listing() -> FileList:
        root = _adapter_folder(manager, job_id)
        return FileList(job_id=job_id, files=list_output_files(root, checksums=sha256))

    return await run_in_threadpool(listing)


@router.get(
    "/{job_id}/files/{path:path}",
    response_class=StreamingResponse,
    summary="Download an adapter file",
    responses=DOWNLOAD_RESPONSES,
)
async def download_training_file(
    job_id: JobId,
    path: str,
    request: Request,
    range_header: Annotated[
        str | None,
        Header(alias="Range", description="One range: `bytes=a-b`, `bytes=a-` or `bytes=-n`."),
    ] = None,
) -> StreamingResponse:
    """Download one adapter file, whole or one byte range."""
    manager = get_training_manager(request)
    root = await run_in_threadpool(_adapter_folder, manager, job_id)
    missing = f"training {job_id} has no file {path!r}"
    return await run_in_threadpool(file_response, root, path, range_header, missing)
