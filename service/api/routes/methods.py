"""``/v1/methods``: the registered merge methods and their parameter schemas."""

from __future__ import annotations

from functools import cache

from fastapi import APIRouter

from merge_kernels.registry import MethodSpec, methods
from service.api.deps import Authenticated
from service.api.schemas import MethodInfo
from service.errors import error_responses

router = APIRouter(prefix="/v1/methods", tags=["methods"], dependencies=[Authenticated])


def method_info(spec: MethodSpec) -> MethodInfo:
    """What ``GET /v1/methods`` says about one method."""
    return MethodInfo(
        name=spec.name,
        title=spec.title,
        paper=spec.paper,
        description=spec.description,
        needs_base=spec.needs_base,
        needs_evaluation=spec.needs_evaluation,
        min_models=spec.min_models,
        max_models=spec.max_models,
        parameters=spec.params.model_json_schema(by_alias=True),
        model_parameters=spec.model_params.model_json_schema(by_alias=True),
        references={name: dict(values) for name, values in spec.references.items()},
    )


@cache
def _all_methods() -> tuple[MethodInfo, ...]:
    return tuple(method_info(spec) for spec in methods())


@router.get(
    "",
    response_model=list[MethodInfo],
    summary="List merge methods",
    responses=error_responses(401),
)
async def list_methods() -> list[MethodInfo]:
    """Every registered method: name, paper, description and JSON Schema of its parameters."""
    return list(_all_methods())
