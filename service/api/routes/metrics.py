"""``/metrics``: job and training counts, bytes merged and merge durations (Prometheus)."""

from __future__ import annotations

import re

from fastapi import APIRouter
from fastapi.responses import PlainTextResponse
from starlette.concurrency import run_in_threadpool

from service.api.deps import Authenticated, ManagerDep
from service.errors import error_responses

router = APIRouter(tags=["operations"], dependencies=[Authenticated])

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# The manager's sample names, renamed where the exposition uses Prometheus' conventions.
_RENAMES = {
    "tureen_merge_seconds_sum": "tureen_merge_duration_seconds_sum",
    "tureen_merge_seconds_count": "tureen_merge_duration_seconds_count",
}

# Family name -> (type, help).
_FAMILIES = {
    "tureen_jobs": ("gauge", "Jobs in each state."),
    "tureen_trainings": ("gauge", "Training jobs in each state."),
    "tureen_searches": ("gauge", "Search jobs in each state."),
    "tureen_workers_busy": ("gauge", "Worker processes running a job."),
    "tureen_merged_bytes_total": ("counter", "Bytes written by succeeded merges."),
    "tureen_merge_duration_seconds": ("summary", "Seconds succeeded merges took."),
}

_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{.*\})?$")


def _family(name: str) -> str:
    for suffix in ("_sum", "_count"):
        base = name.removesuffix(suffix)
        if base != name and _FAMILIES.get(base, ("", ""))[0] == "summary":
            return base
    return name


def render_metrics(samples: dict[str, float]) -> str:
    """Prometheus text exposition (format 0.0.4) of ``samples`` keyed by ``name{labels}``."""
    families: dict[str, list[str]] = {}
    for key, value in samples.items():
        match = _SAMPLE.match(key)
        if match is None:
            continue
        name = _RENAMES.get(match.group(1), match.group(1))
        line = f"{name}{match.group(2) or ''} {value:.17g}"
        families.setdefault(_family(name), []).append(line)
    lines: list[str] = []
    for family in sorted(families):
        kind, text = _FAMILIES.get(family, ("untyped", family))
        lines += [f"# HELP {family} {text}", f"# TYPE {family} {kind}", *families[family]]
    return "\n".join(lines) + "\n"


@router.get(
    "/metrics",
    response_class=PlainTextResponse,
    summary="Prometheus metrics",
    responses={
        200: {"content": {"text/plain": {"schema": {"type": "string"}}}},
        **error_responses(401),
    },
)
async def metrics(manager: ManagerDep) -> PlainTextResponse:
    """Jobs and training jobs per state, busy workers, bytes merged and merge durations."""
    samples = await run_in_threadpool(manager.metrics)  # every kind's counts included
    return PlainTextResponse(render_metrics(samples), media_type=CONTENT_TYPE)
