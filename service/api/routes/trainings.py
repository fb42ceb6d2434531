"""``/v1/trainings``: submit, list, follow, cancel LoRA/DPO trainings and fetch adapters.

The submit route is the training kind's own; the others are the shared job routes
(:mod:`service.api.job_routes`), showing each job as a :class:`TrainingJob`.
"""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from starlette.concurrency import run_in_threadpool

from service.api.deps import Authenticated, IdempotencyKey, ManagerDep, _decode
from service.api.job_routes import JobRoutes, Operation, add_job_routes
from service.api.training_schemas import TrainingJob, TrainingList, training_body_openapi
from service.errors import error_responses
from service.jobs.kinds.training import (
    TRAINING_KIND,
    adapter_reference,
    split_request,
    submit_training,
)
from service.jobs.models import Job

router = APIRouter(prefix="/v1/trainings", tags=["trainings"], dependencies=[Authenticated])


def training_view(job: Job) -> TrainingJob:
    """The API view of a training job record."""
    return TrainingJob.from_job(job, adapter_reference(job))


@router.post(
    "",
    name="submit_training",
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
async def submit_training_job(
    request: Request,
    response: Response,
    manager: ManagerDep,
    idempotency_key: IdempotencyKey = None,
) -> TrainingJob:
    """Validate the config, its paths and its data, then queue the training.

    Every run reports held-out numbers before and after training (loss, token accuracy and
    exact match for LoRA; DPO loss, reward margin and preference accuracy for DPO).
    """
    document = _decode(await request.body(), request.headers.get("content-type", ""))
    training_request = split_request(document)
    job, created = await run_in_threadpool(
        lambda: submit_training(manager, training_request, idempotency_key=idempotency_key)
    )
    response.status_code = 202 if created else 200
    response.headers["Location"] = f"/v1/trainings/{job.id}"
    return training_view(job)


TRAINING_ROUTES = JobRoutes(
    kind=TRAINING_KIND,
    noun="training",
    job_model=TrainingJob,
    list_model=TrainingList,
    view=training_view,
    id_description="The training job id.",
    events_description="`event: progress` with `ProgressEvent` data while the training is "
    "unfinished, comment heartbeats, then one `event: status` with the finished "
    "`TrainingJob`; then the stream ends.",
    operations={
        "list": Operation(
            "list_trainings",
            "List trainings",
            "A page of training jobs, newest first, with the total matching the filter.",
        ),
        "get": Operation(
            "get_training",
            "Get a training",
            "Status, progress (steps, loss, ETA), error, adapter and held-out numbers.",
        ),
        "log": Operation("training_log", "Get a training's log", "The training worker's log."),
        "cancel": Operation(
            "cancel_training",
            "Cancel a training",
            """Cancel: a queued training at once, a running one before its next step; no adapter
            is written. A finished job is returned unchanged.""",
        ),
        "events": Operation(
            "training_events",
            "Follow a training (Server-Sent Events)",
            "Stream the training's progress until it finishes.",
        ),
        "files": Operation(
            "list_training_files",
            "List a training's adapter files",
            """The adapter folder's files (adapter_config.json, adapter_model.safetensors,
            training_report.json), with sizes and optional checksums.""",
        ),
        "download": Operation(
            "download_training_file",
            "Download an adapter file",
            "Download one adapter file, whole or one byte range.",
        ),
    },
    order=("list", "get", "log", "cancel", "events", "files", "download"),
)
add_job_routes(router, TRAINING_ROUTES)
