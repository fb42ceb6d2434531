"""``/v1/merges``: submit, list, follow, cancel merge jobs and download their output."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, Header, Query, Request, Response
from fastapi import Path as PathParam
from fastapi.responses import PlainTextResponse, StreamingResponse
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool

from merge_kernels.evaluated_merge import scratch_folder
from merge_kernels.io.staging import StagingDir
from service.api.deps import Authenticated, IdempotencyKey, ManagerDep, PageOffset, RecipeRequestDep
from service.api.events import DEFAULT_HEARTBEAT_SECONDS, DEFAULT_POLL_SECONDS, job_events
from service.api.files import (
    DOWNLOAD_RESPONSES,
    file_response,
    list_output_files,
    read_chunks,
    resolve_output_file,
)
from service.api.job_logs import LOG_RESPONSES, LOG_SUMMARY_DOC, log_response
from service.api.multi_recipe import MultiRecipeRequest
from service.api.schemas import FileList, JobList, recipe_body_openapi
from service.api.text_fields import check_text_fields
from service.errors import ApiError, error_responses
from service.jobs.manager import JobManager
from service.jobs.models import Job, JobStatus, PublishOptions

router = APIRouter(prefix="/v1/merges", tags=["merges"], dependencies=[Authenticated])

JobId = Annotated[str, PathParam(description="The job id.", max_length=128)]
# Publishing to the Hub: the request's token travels in a header, never in the body.
HubToken = Annotated[
    str | None,
    Header(
        alias="X-HF-Token",
        max_length=1024,
        description="A Hugging Face token that may write to the publish repository; held in "
        "the server's memory for the upload only (never stored, logged or returned). Default: "
        "the server's configured token.",
    ),
]

_SUBMIT_DOC = (
    "The recipe document itself (mergekit-style keys), as JSON or YAML, plus an optional "
    "`output` key. Local checkpoints must lie inside the service's allowed folders; "
    "relative paths are relative to `data_dir/inputs`. Several merges in one job "
    '(mergekit-multimerge): several YAML documents, or JSON `{"merges": [recipe, ...], '
    '"output": {...}}`; a recipe with a `name` may be a later recipe\'s model, and the one '
    "without a name is the final merge, the job's output."
)


def _location(job: Job) -> str:
    return f"/v1/merges/{job.id}"


@router.post(
    "",
    status_code=202,
    response_model=Job,
    summary="Submit a merge",
    responses={
        200: {"model": Job, "description": "The job an earlier request with this key made."},
        202: {
            "description": "Queued.",
            "headers": {"Location": {"schema": {"type": "string"}}},
        },
        **error_responses(401, 409, 413, 415, 422, 507),
    },
    openapi_extra=recipe_body_openapi(_SUBMIT_DOC),
)
async def submit_merge(
    body: RecipeRequestDep,
    manager: ManagerDep,
    response: Response,
    idempotency_key: IdempotencyKey = None,
    hub_token: HubToken = None,
) -> Job:
    """Validate the recipe and its checkpoints (headers only), then queue the merge.

    With `output.publish`, the job goes on to `publishing` once merged, then back to
    `succeeded` with `publish.state` `published` (and the commit) or `failed`.

    A multi-document recipe (several YAML documents, or JSON `{"merges": [...]}`) is one
    job: its `stages` run in dependency order and only the final merge is its output.
    """
    if isinstance(body, MultiRecipeRequest):
        merges = body.merges
        job, created = await run_in_threadpool(
            lambda: manager.submit_stages(
                merges,
                body.output,
                idempotency_key=idempotency_key,
                body_hash=body.body_hash,
                hub_token=hub_token,
            )
        )
    else:
        recipe = body.recipe
        job, created = await run_in_threadpool(
            lambda: manager.submit(
                recipe,
                body.output,
                idempotency_key=idempotency_key,
                body_hash=body.body_hash,
                hub_token=hub_token,
            )
        )
    response.status_code = 202 if created else 200
    response.headers["Location"] = _location(job)
    return job


@router.get("", response_model=JobList, summary="List merges", responses=error_responses(401, 422))
async def list_merges(
    manager: ManagerDep,
    status: Annotated[JobStatus | None, Query(description="Only jobs in this state.")] = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
    offset: PageOffset = 0,
) -> JobList:
    """A page of jobs, newest first, with the total matching the filter."""
    jobs, total = await run_in_threadpool(
        lambda: manager.list(status=status, limit=limit, offset=offset)
    )
    return JobList(items=jobs, total=total, limit=limit, offset=offset)


@router.get(
    "/{job_id}",
    response_model=Job,
    summary="Get a merge",
    responses=error_responses(401, 404, 422),
)
async def get_merge(job_id: JobId, manager: ManagerDep) -> Job:
    """Status, progress (with ETA), timings, error and output of one job."""
    return await run_in_threadpool(manager.get, job_id)


@router.delete(
    "/{job_id}",
    status_code=202,
    response_model=Job,
    summary="Cancel a merge",
    responses=error_responses(401, 404, 422),
)
async def cancel_merge(job_id: JobId, manager: ManagerDep) -> Job:
    """Cancel: a queued job at once, a running one within seconds, leaving no output.

    A finished job is returned unchanged.
    """
    return await run_in_threadpool(manager.cancel, job_id)


@router.get(
    "/{job_id}/events",
    response_class=StreamingResponse,
    summary="Follow a merge (Server-Sent Events)",
    responses={
        200: {
            "description": "`event: progress` with `ProgressEvent` data while the job is "
            "unfinished, comment heartbeats, then one `event: status` with the finished "
            "`Job`; then the stream ends.",
            "content": {"text/event-stream": {"schema": {"type": "string"}}},
        },
        **error_responses(401, 404, 422),
    },
)
async def merge_events(job_id: JobId, request: Request, manager: ManagerDep) -> StreamingResponse:
    """Stream the job's progress until it finishes."""
    await run_in_threadpool(manager.get, job_id)  # 404 before the stream starts
    state = request.app.state
    stream = job_events(
        manager.get,
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


def _succeeded_output(manager: JobManager, job_id: str) -> Path:
    job = manager.get(job_id)
    if job.status is not JobStatus.SUCCEEDED:
        raise ApiError(
            409,
            "job_not_succeeded",
            f"job {job_id} is {job.status.value}; its files exist only once it has succeeded",
            details={"job_id": job_id, "status": job.status.value},
        )
    return manager.output_path(job)


@router.get(
    "/{job_id}/files",
    response_model=FileList,
    summary="List a merge's output files",
    responses=error_responses(401, 404, 409, 422),
)
async def list_files(
    job_id: JobId,
    manager: ManagerDep,
    sha256: Annotated[bool, Query(description="Also compute each file's SHA-256.")] = False,
) -> FileList:
    """The files of a succeeded merge, with sizes (and checksums when asked for)."""

    def listing() -> FileList:
        root = _succeeded_output(manager, job_id)
        return FileList(job_id=job_id, files=list_output_files(root, checksums=sha256))

    return await run_in_threadpool(listing)


@router.get(
    "/{job_id}/files/{path:path}",
    response_class=StreamingResponse,
    summary="Download an output file",
    responses=DOWNLOAD_RESPONSES,
)
async def download_file(
    job_id: JobId,
    path: str,
    manager: ManagerDep,
    range_header: Annotated[
        str | None,
        Header(alias="Range", description="One range: `bytes=a-b`, `bytes=a-` or `bytes=-n`."),
    ] = None,
) -> StreamingResponse:
    """Download one output file, whole or one byte range."""
    root = await run_in_threadpool(_succeeded_output, manager, job_id)
    missing = f"job {job_id} has no output file {path!r}"
    return await run_in_threadpool(file_response, root, path, range_header, missing)


@router.get(
    "/{job_id}/log",
    response_class=PlainTextResponse,
    summary="Get a merge's log",
    description=LOG_SUMMARY_DOC,
    responses=LOG_RESPONSES,
)
async def merge_log(job_id: JobId, manager: ManagerDep) -> PlainTextResponse:
    """The merge worker's log lines for this job."""
    return log_response(await run_in_threadpool(manager.log, job_id))


# -- greedy-soup candidates, for HTTP evaluators on other machines -------------------------

_CANDIDATE = re.compile(r"^((candidate|merge|input)-\d{4}|final)$")


def _candidate_folder(manager: JobManager, job_id: str, candidate: str) -> Path:
    job = manager.get(job_id)
    if job.status is not JobStatus.RUNNING:
        raise ApiError(
            409,
            "job_not_running",
            f"job {job_id} is {job.status.value}; its candidates exist only while it runs",
            details={"job_id": job_id, "status": job.status.value},
        )
    output = manager.output_path(job)
    if candidate == "final":  # the written soup, scored before it is published
        folder = StagingDir(output, "read").path
    else:
        folder = scratch_folder(output) / candidate
    if not _CANDIDATE.match(candidate) or not folder.is_dir():
        raise ApiError(
            404,
            "not_found",
            f"job {job_id} has no candidate {candidate!r} now (candidates are removed once scored)",
            details={"candidate": candidate},
        )
    return folder


@router.get(
    "/{job_id}/candidates/{candidate}/files/{path:path}",
    response_class=StreamingResponse,
    summary="Download a file of a candidate being scored",
    responses=DOWNLOAD_RESPONSES,
)
async def download_candidate_file(
    job_id: JobId,
    candidate: str,
    path: str,
    manager: ManagerDep,
) -> StreamingResponse:
    """One file of a greedy-soup candidate, while the evaluator scores it (its `url`)."""
    folder = await run_in_threadpool(_candidate_folder, manager, job_id, candidate)
    file = await run_in_threadpool(resolve_output_file, folder, path)
    if file is None:
        raise ApiError(
            404,
            "not_found",
            f"candidate {candidate!r} has no file {path!r}",
            details={"path": path},
        )
    size = file.stat().st_size
    headers = {
        "Content-Length": str(size),
        "Content-Disposition": f'attachment; filename="{file.name}"',
    }
    return StreamingResponse(
        read_chunks(file, 0, size), media_type="application/octet-stream", headers=headers
    )


# -- publishing to the Hugging Face Hub -------------------------------------------------------

_PUBLISH_BODY = {
    "requestBody": {
        "required": False,
        "description": "Where to publish; omitted, the job's last publish options (a retry).",
        "content": {
            "application/json": {"schema": {"$ref": "#/components/schemas/PublishOptions"}}
        },
    }
}


def _publish_options(body: bytes) -> PublishOptions | None:
    if not body.strip():
        return None
    try:
        document = json.loads(body)
    except (ValueError, RecursionError) as error:
        raise ApiError(
            422, "invalid_body", f"the body is not valid JSON: {error}", details={"field": "body"}
        ) from None
    if document is None:
        return None
    check_text_fields(document)
    try:
        return PublishOptions.model_validate(document)
    except ValidationError as error:
        first = error.errors()[0]
        field = ".".join(str(part) for part in first["loc"]) or "body"
        raise ApiError(
            422, "invalid_request", f"{field}: {first['msg']}", details={"field": field}
        ) from None


@router.post(
    "/{job_id}/publish",
    status_code=202,
    response_model=Job,
    summary="Publish a merge to the Hugging Face Hub",
    responses=error_responses(401, 404, 409, 422),
    openapi_extra=_PUBLISH_BODY,
)
async def publish_merge(
    job_id: JobId, request: Request, manager: ManagerDep, hub_token: HubToken = None
) -> Job:
    """Publish a succeeded merge's output in one commit, or retry a failed publication.

    The job turns `publishing`, then `succeeded` again with `publish.state` `published`
    (`commit_url`, `commit_sha`, `pr_url`) or `failed` (`publish.error`); the local output
    is kept either way.
    """
    options = _publish_options(await request.body())
    return await run_in_threadpool(manager.publisher.request, job_id, options, hub_token)


# -- end publishing ----------------------------------------------------------------------------
