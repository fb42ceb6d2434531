"""``/v1/plans``: check a recipe against its checkpoints' headers without merging."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from starlette.concurrency import run_in_threadpool

from merge_kernels.errors import IncompatibleCheckpointsError
from merge_kernels.runner import close_inputs
from service.api.deps import Authenticated, ManagerDep, RecipeRequest, RecipeRequestDep
from service.api.multi_recipe import MultiRecipeRequest
from service.api.schemas import MultiPlanReport, PlanReport, recipe_body_openapi
from service.errors import error_responses
from service.jobs.manager import JobManager
from service.jobs.stages import in_stage, stage_warnings

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


def multi_plan_report(body: MultiRecipeRequest, manager: JobManager) -> dict[str, Any]:
    """Plan every stage of a multi-document recipe that can be planned before it runs.

    A stage that reads another stage's output is planned when the job runs it (its inputs'
    headers do not exist before): its ``plan`` is null. Blocking, like :func:`plan_report`.

    Raises:
        As :func:`plan_report`, the message and details naming the stage.
    """
    stages = []
    for step in body.merges.steps:
        planned = manager.plan_stage(step, body.output, body.merges.intermediate_dir)
        report = None
        if planned is not None:
            plan, inputs = planned
            try:
                report = plan.report()
            finally:
                close_inputs(inputs)
            if plan.problems:
                raise in_stage(IncompatibleCheckpointsError(plan.problems), step)
        stages.append(
            {
                "index": step.index,
                "name": step.name,
                "final": step.final,
                "reads": list(step.needs),
                "plan": report,
            }
        )
    return {"ok": True, "stages": stages, "warnings": stage_warnings(body.merges)}


@router.post(
    "",
    response_model=PlanReport | MultiPlanReport,
    summary="Plan a merge (dry run)",
    responses=error_responses(401, 413, 415, 422),
    openapi_extra=recipe_body_openapi(
        "The same body as `POST /v1/merges`; only configs and safetensors headers are read."
    ),
)
async def create_plan(body: RecipeRequestDep, manager: ManagerDep) -> dict[str, Any]:
    """The merge plan: inputs, output tensors and shards, peak-memory estimate.

    For a multi-document recipe, one plan per stage, in the order they would run.
    """
    if isinstance(body, MultiRecipeRequest):
        multi = body
        return await run_in_threadpool(multi_plan_report, multi, manager)
    single = body
    return await run_in_threadpool(plan_report, single, manager)
