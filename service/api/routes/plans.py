"""``/v1/plans``: check a recipe against its checkpoints' headers without merging."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from starlette.concurrency import run_in_threadpool

from merge_kernels.runner import close_inputs
from service.api.deps import Authenticated, ManagerDep, RecipeRequest, RecipeRequestDep
from service.api.schemas import PlanReport, recipe_body_openapi
from service.errors import error_responses
from service.jobs.manager import JobManager

router = APIRouter(prefix="/v1/plans", tags=["plans"], dependencies=[Authenticated])


def plan_report(body: RecipeRequest, manager: JobManager) -> dict[str, Any]:
    """Plan the merge from configs and headers alone, exactly as a job would run it.

    Blocking (it reads every input's headers): run it off the event loop.

    Raises:
        IncompatibleCheckpointsError: every problem the plan found.
        CheckpointNotFoundError, CheckpointFileError, RecipeError: bad inputs, headers over
            the service's size limits included.
    """
    plan, inputs = manager.plan(body.recipe, body.output)
    try:
        report = plan.report()
    finally:
        close_inputs(inputs)
    plan.raise_for_problems()
    return report


@router.post(
    "",
    response_model=PlanReport,
    summary="Plan a merge (dry run)",
    responses=error_responses(401, 413, 415, 422),
    openapi_extra=recipe_body_openapi(
        "The same body as `POST /v1/merges`; only configs and safetensors headers are read."
    ),
)
async def create_plan(body: RecipeRequestDep, manager: ManagerDep) -> dict[str, Any]:
    """The merge plan: inputs, output tensors and shards, peak-memory estimate."""
    return await run_in_threadpool(plan_report, body, manager)
