"""``/v1/merges``: submit, list, follow, cancel merge jobs and download their output.

The submit, candidate and publish routes are the merge kind's own; the others are the
shared job routes (:mod:`service.api.job_routes`).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, Header, Request, Response
from fastapi import Path as PathParam
from fastapi.responses import StreamingResponse
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool

from merge_kernels.evaluated_merge import scratch_folder
from merge_kernels.io.staging import StagingDir
from service.api.deps import Authenticated, IdempotencyKey, ManagerDep, RecipeRequestDep
from service.api.files import DOWNLOAD_RESPONSES, read_chunks, resolve_output_file
from service.api.job_routes import JobRoutes, Operation, add_job_routes
from service.api.multi_recipe import MultiRecipeRequest
from service.api.schemas import JobList, recipe_body_openapi
from service.api.text_fields import check_text_fields
from service.errors import ApiError, error_responses
from service.jobs.kinds.merge import MERGE_KIND
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


MERGE_ROUTES = JobRoutes(
    kind=MERGE_KIND,
    noun="job",
    job_model=Job,
    list_model=JobList,
    view=lambda job: job,
    id_description="The job id.",
    events_description="`event: progress` with `ProgressEvent` data while the job is "
    "unfinished, comment heartbeats, then one `event: status` with the finished `Job`; then "
    "the stream ends.",
    operations={
        "list": Operation(
            "list_merges",
            "List merges",
            "A page of jobs, newest first, with the total matching the filter.",
        ),
        "get": Operation(
            "get_merge",
            "Get a merge",
            "Status, progress (with ETA), timings, error and output of one job.",
        ),
        "cancel": Operation(
            "cancel_merge",
            "Cancel a merge",
            """Cancel: a queued job at once, a running one within seconds, leaving no output.

            A finished job is returned unchanged.""",
        ),
        "events": Operation(
            "merge_events",
            "Follow a merge (Server-Sent Events)",
            "Stream the job's progress until it finishes.",
        ),
        "files": Operation(
            "list_files",
            "List a merge's output files",
            "The files of a succeeded merge, with sizes (and checksums when asked for).",
        ),
        "download": Operation(
            "download_file",
            "Download an output file",
            "Download one output file, whole or one byte range.",
        ),
        "log": Operation("merge_log", "Get a merge's log", "The merge worker's log lines."),
    },
)
add_job_routes(router, MERGE_ROUTES)


# -- greedy-soup candidates, for HTTP evaluators on other machines -------------------------

_CANDIDATE = re.compile(r"^((candidate|merge|input)-\d{4}|final)$")


def _candidate_folder(manager: JobManager, job_id: str, candidate: str) -> Path:
    job = manager.get(job_id, kind=MERGE_KIND)
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

PUBLISH_BODY = {
    "requestBody": {
        "required": False,
        "description": "Where to publish; omitted, the job's last publish options (a retry).",
        "content": {
            "application/json": {"schema": {"$ref": "#/components/schemas/PublishOptions"}}
        },
    }
}


def publish_options(body: bytes) -> PublishOptions | None:
    """A publish request's options from its JSON body (None when the body is empty); shared
    by every kind whose output can be published."""
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
    openapi_extra=PUBLISH_BODY,
)
async def publish_merge(
    job_id: JobId, request: Request, manager: ManagerDep, hub_token: HubToken = None
) -> Job:
    """Publish a succeeded merge's output in one commit, or retry a failed publication.

    The job turns `publishing`, then `succeeded` again with `publish.state` `published`
    (`commit_url`, `commit_sha`, `pr_url`) or `failed` (`publish.error`); the local output
    is kept either way.
    """
    options = publish_options(await request.body())
    await run_in_threadpool(lambda: manager.get(job_id, kind=MERGE_KIND))  # merges only
    return await run_in_threadpool(manager.publisher.request, job_id, options, hub_token)


# -- end publishing ----------------------------------------------------------------------------
