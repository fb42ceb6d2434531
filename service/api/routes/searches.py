"""``/v1/searches``: submit, list, follow, pause, resume, cancel recipe searches.

The submit route is the search kind's own (:mod:`service.jobs.kinds.search`); the others
are the shared job routes (:mod:`service.api.job_routes`), pause and resume included,
showing each job as a :class:`SearchJob`: its progress (evaluations done, best score so
far), then its report (every point and score, the best recipe as a plain recipe that
``POST /v1/merges`` accepts) and the winner's files (``report.json``, ``scores.svg``,
``best_recipe.yaml`` beside the merged checkpoint and its model card).
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, Request, Response
from fastapi import Path as PathParam
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool

from merge_kernels.search import SearchSpec
from service.api.deps import Authenticated, IdempotencyKey, ManagerDep, _decode
from service.api.job_routes import (
    OPERATIONS,
    PAUSE_OPERATIONS,
    JobRoutes,
    Operation,
    add_job_routes,
)
from service.api.routes.merges import PUBLISH_BODY, HubToken, publish_options
from service.errors import error_responses
from service.jobs.kinds.search import SEARCH_KIND, split_request, submit_search
from service.jobs.models import Job, JobError, JobProgress, JobPublish, JobStatus

router = APIRouter(prefix="/v1/searches", tags=["searches"], dependencies=[Authenticated])


class SearchJob(BaseModel):
    """A search job and, once it succeeded, its report and the winner's output."""

    id: str
    status: JobStatus
    name: str | None = Field(None, description="The winner's folder name (default: the id).")
    spec: dict[str, Any] = Field(description="The validated search spec.")
    created_at: datetime
    started_at: datetime | None = None
    finished_at: datetime | None = None
    progress: JobProgress = Field(
        description="phase, evaluations_done, evaluations_total, best_score, last_score."
    )
    error: JobError | None = None
    cancel_requested: bool = False
    pause_requested: bool = False
    attempts: int = 0
    output_dir: str | None = Field(None, description="The winner's folder, once succeeded.")
    files: list[str] = Field(default_factory=list)
    report: dict[str, Any] | None = Field(
        None,
        description="Once succeeded: every evaluation (point, score, metrics), `best` (index, "
        "point, score), `best_recipe` (YAML text of a plain recipe for POST /v1/merges), "
        "`written_validation_score`, `test`, `stopped_by`.",
    )
    best_recipe: str | None = Field(
        None, description="The best recipe as YAML text, once succeeded (also in the report)."
    )
    seconds: float | None = Field(None, description="Seconds the successful run took.")
    publish: JobPublish | None = Field(
        None, description="Publication of the winner to the Hugging Face Hub, when asked for."
    )
    version: int = 0

    @classmethod
    def from_job(cls, job: Job) -> SearchJob:
        """The API view of a search job record."""
        succeeded = job.status in (JobStatus.SUCCEEDED, JobStatus.PUBLISHING)
        report = job.evaluation if succeeded else None
        return cls(
            id=job.id,
            status=job.status,
            name=job.output.name,
            spec=job.recipe,
            created_at=job.created_at,
            started_at=job.started_at,
            finished_at=job.finished_at,
            progress=job.progress,
            error=job.error,
            cancel_requested=job.cancel_requested,
            pause_requested=job.pause_requested,
            attempts=job.attempts,
            output_dir=job.output_dir if succeeded else None,
            files=job.files,
            report=report,
            best_recipe=None if report is None else report.get("best_recipe"),
            seconds=job.merge_seconds if succeeded else None,
            publish=job.publish,
            version=job.version,
        )


class SearchList(BaseModel):
    """One page of search jobs, newest first."""

    items: list[SearchJob]
    total: int = Field(description="Jobs matching the filter, on every page.")
    limit: int
    offset: int


_SUBMIT_DOC = (
    "A search spec, as JSON or YAML: `recipe` (a recipe whose parameter values may be "
    "`{search: {low, high, log?, step?, name?}}` or `{search: {values: [...]}}`), `strategy` "
    "(`grid`, `random`, `cmaes`, or `{name, ...}`), `budget` (`evaluations`, optional "
    "`seconds`), `seed`, `evaluator` (the validation split's), optional `test` (keys replacing "
    "the evaluator's for the winner's test score), plus `output.name` (the winner's folder "
    "name). Checkpoints and data files must lie inside the service's allowed folders; "
    "relative paths are relative to `data_dir/inputs`."
)


def _body_openapi() -> dict[str, Any]:
    spec = SearchSpec.model_json_schema()
    spec.setdefault("properties", {})["output"] = {
        "type": "object",
        "additionalProperties": False,
        "properties": {"name": {"type": "string"}},
    }
    content = {media: {"schema": spec} for media in ("application/json", "application/yaml")}
    return {"requestBody": {"required": True, "description": _SUBMIT_DOC, "content": content}}


@router.post(
    "",
    name="submit_search",
    status_code=202,
    response_model=SearchJob,
    summary="Submit a search",
    responses={
        200: {"model": SearchJob, "description": "The job an earlier request with this key made."},
        202: {"description": "Queued.", "headers": {"Location": {"schema": {"type": "string"}}}},
        **error_responses(401, 409, 413, 415, 422, 507),
    },
    openapi_extra=_body_openapi(),
)
async def submit_search_job(
    request: Request,
    response: Response,
    manager: ManagerDep,
    idempotency_key: IdempotencyKey = None,
) -> SearchJob:
    """Validate the spec, its evaluators and the recipe (planned from headers at the middle
    of the space, as a merge), then queue the search.

    The search's state is saved in the job store after every evaluation: a paused search,
    or one a server restart interrupted, resumes where it was without scoring any point
    again.
    """
    document = _decode(await request.body(), request.headers.get("content-type", ""))
    search_request = split_request(document)
    job, created = await run_in_threadpool(
        lambda: submit_search(manager, search_request, idempotency_key=idempotency_key)
    )
    response.status_code = 202 if created else 200
    response.headers["Location"] = f"/v1/searches/{job.id}"
    return SearchJob.from_job(job)


# -- publishing to the Hugging Face Hub -------------------------------------------------------


@router.post(
    "/{job_id}/publish",
    name="publish_search",
    status_code=202,
    response_model=SearchJob,
    summary="Publish a search's winner to the Hugging Face Hub",
    responses=error_responses(401, 404, 409, 422),
    openapi_extra=PUBLISH_BODY,
)
async def publish_search(
    job_id: Annotated[str, PathParam(description="The search job id.", max_length=128)],
    request: Request,
    manager: ManagerDep,
    hub_token: HubToken = None,
) -> SearchJob:
    """Publish a succeeded search's winner (weights, model card with the search's summary,
    report.json, scores.svg, best_recipe.yaml) in one commit, as a merge is published.

    The job turns `publishing`, then `succeeded` again with `publish.state` `published` or
    `failed`; the local output is kept either way.
    """
    options = publish_options(await request.body())
    await run_in_threadpool(lambda: manager.get(job_id, kind=SEARCH_KIND))  # searches only
    job = await run_in_threadpool(manager.publisher.request, job_id, options, hub_token)
    return SearchJob.from_job(job)


# -- end publishing ----------------------------------------------------------------------------

SEARCH_ROUTES = JobRoutes(
    kind=SEARCH_KIND,
    noun="search",
    job_model=SearchJob,
    list_model=SearchList,
    view=SearchJob.from_job,
    id_description="The search job id.",
    events_description="`event: progress` with `ProgressEvent` data (evaluations done, best "
    "score so far) while the search is unfinished, comment heartbeats, then one `event: "
    "status` with the finished `SearchJob`; then the stream ends.",
    operations={
        "list": Operation(
            "list_searches",
            "List searches",
            "A page of search jobs, newest first, with the total matching the filter.",
        ),
        "get": Operation(
            "get_search",
            "Get a search",
            "Status, progress (evaluations, best score so far), error, and once succeeded the "
            "report and the best recipe.",
        ),
        "log": Operation("search_log", "Get a search's log", "The search worker's log."),
        "cancel": Operation(
            "cancel_search",
            "Cancel a search",
            """Cancel: a queued or paused search at once, a running one within seconds; its
            saved state and partial output are dropped. A finished job is returned
            unchanged.""",
        ),
        "pause": Operation(
            "pause_search",
            "Pause a search",
            """Pause: a queued search at once, a running one within seconds (between
            evaluations or while a candidate is merged); its state, every point scored so
            far, is kept for when it is resumed.""",
        ),
        "resume": Operation(
            "resume_search",
            "Resume a search",
            """Queue a paused search again; it goes on after its last scored evaluation.""",
        ),
        "events": Operation(
            "search_events",
            "Follow a search (Server-Sent Events)",
            "Stream the search's progress until it finishes.",
        ),
        "files": Operation(
            "list_search_files",
            "List a search's output files",
            """The winner's folder: the merged checkpoint, its model card (with the search's
            summary), evaluation.json, report.json, scores.svg and best_recipe.yaml.""",
        ),
        "download": Operation(
            "download_search_file",
            "Download a search output file",
            "Download one file of the winner's folder, whole or one byte range.",
        ),
    },
    order=(*OPERATIONS[:3], *PAUSE_OPERATIONS, *OPERATIONS[3:]),
)
add_job_routes(router, SEARCH_ROUTES)
