"""``/healthz`` (the process answers) and ``/readyz`` (it can take work); both open."""

from __future__ import annotations

import logging
import tempfile

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from service.api.schemas import Health, Readiness
from service.jobs.manager import JobManager
from service.settings import ServiceSettings

log = logging.getLogger(__name__)

router = APIRouter(tags=["operations"])


@router.get("/healthz", response_model=Health, summary="Liveness")
async def healthz() -> Health:
    """The server process is up and answering."""
    return Health()


def _database_ok(manager: JobManager) -> bool:
    try:
        manager.store.counts()
    except Exception:
        log.warning("readiness: the job database is not reachable", exc_info=True)
        return False
    return True


def _data_dir_writable(settings: ServiceSettings) -> bool:
    try:
        with tempfile.TemporaryFile(dir=settings.data_dir, prefix=".ready-"):
            return True
    except OSError:
        log.warning("readiness: the data dir %s is not writable", settings.data_dir)
        return False


def _dispatcher_working(manager: JobManager) -> bool:
    problem = manager.dispatcher_problem()
    if problem is not None:
        log.warning("readiness: %s", problem)
    return problem is None


def readiness(settings: ServiceSettings, manager: JobManager | None) -> Readiness:
    """Run every readiness check."""
    checks = {
        "database": manager is not None and _database_ok(manager),
        "data_dir": _data_dir_writable(settings),
        "dispatcher": manager is not None and _dispatcher_working(manager),
    }
    return Readiness(status="ready" if all(checks.values()) else "not_ready", checks=checks)


@router.get(
    "/readyz",
    response_model=Readiness,
    summary="Readiness",
    responses={503: {"model": Readiness, "description": "A check failed."}},
)
async def readyz(request: Request) -> JSONResponse:
    """The job database answers, the data dir is writable and the dispatcher can start jobs."""
    state = request.app.state
    result = await run_in_threadpool(readiness, state.settings, state.manager)
    return JSONResponse(result.model_dump(), status_code=200 if result.status == "ready" else 503)
