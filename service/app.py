"""The FastAPI application of ``tureen serve``.

:func:`create_app` builds the app for some settings: the routers (one per resource), the
error handlers, a request-body size limit, the OpenAPI document built from the method
registry, and a lifespan that opens the job store and starts and stops the job manager.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from fastapi.routing import APIRoute
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.api.routes import console as console_routes  # the web console
from service.api.routes import docs, health, merges, methods, metrics, plans
from service.api.routes import searches as searches_routes  # search jobs
from service.api.routes import tensor_stats as tensor_stats_routes  # the web console
from service.api.routes import trainings as trainings_routes  # training jobs
from service.api.schemas import MERGE_REQUEST_SCHEMA_NAME, merge_request_schema
from service.errors import ApiError, ErrorBody, error_response, install_error_handlers
from service.jobs import data_dir_lock
from service.jobs.manager import JobManager
from service.jobs.sqlite_store import SqliteJobStore
from service.settings import ServiceSettings

log = logging.getLogger(__name__)

WORKER_STOP_SECONDS = 10.0  # on shutdown, workers still running after this are killed
API_TITLE = "tureen"
API_VERSION = "1.0.0"
API_DESCRIPTION = (
    "Merge fine-tuned checkpoints of one base into a single checkpoint: soups, task "
    "arithmetic, TIES, DARE and SLERP, run as background jobs. Every error has the body "
    '`{"error": {"code", "message", "details"}}`.'
)


class BodyLimitMiddleware:
    """Refuse request bodies over ``max_bytes`` with 413, chunked ones included.

    A declared ``Content-Length`` over the limit is refused before the body is read; a body
    without one is counted as it arrives and refused once it passes the limit.
    """

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = Headers(scope=scope).get("content-length", "").strip()
        if declared.isdigit() and int(declared) > self.max_bytes:
            response = error_response(413, "payload_too_large", self._message())
            await response(scope, receive, send)
            return
        received = 0

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise ApiError(413, "payload_too_large", self._message())
            return message

        await self.app(scope, limited_receive, send)

    def _message(self) -> str:
        return f"the request body is larger than the limit of {self.max_bytes} bytes"


def _lifespan(settings: ServiceSettings) -> Any:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        # Before the store is opened: a second server would re-queue this one's jobs.
        data_dir_lock.acquire(settings.data_dir)
        # One store and one manager for every kind of job (merges, trainings).
        store = SqliteJobStore(settings.database_path)
        manager = JobManager(store, settings)
        manager.start()
        app.state.manager = manager
        log.info(
            "tureen service ready: data dir %s, %d worker(s), auth %s",
            settings.data_dir,
            settings.workers,
            "on" if settings.api_tokens else "off",
        )
        try:
            yield
        finally:
            app.state.manager = None
            manager.stop(timeout=app.state.worker_stop_seconds)
            store.close()
            data_dir_lock.release(settings.data_dir)

    return lifespan


def build_openapi(app: FastAPI) -> dict[str, Any]:
    """The OpenAPI document: FastAPI's, plus the recipe body built from the registry."""
    if app.openapi_schema is not None:
        return app.openapi_schema
    document = get_openapi(
        title=app.title,
        version=app.version,
        description=app.description,
        routes=app.routes,
        tags=app.openapi_tags,
    )
    schemas: dict[str, Any] = document.setdefault("components", {}).setdefault("schemas", {})
    request, definitions = merge_request_schema("#/components/schemas/{model}")
    for name, schema in {**definitions, MERGE_REQUEST_SCHEMA_NAME: request}.items():
        if name not in schemas:
            schemas[name] = schema
        elif schemas[name].get("title") != schema.get("title"):
            # The same model (OutputOptions) is kept as FastAPI wrote it; others must differ.
            raise RuntimeError(f"two different OpenAPI schemas are both named {name!r}")
    document["components"]["schemas"] = dict(sorted(schemas.items()))
    _errors_as_json(document)
    app.openapi_schema = document
    return document


def _errors_as_json(document: dict[str, Any]) -> None:
    # FastAPI files error bodies under a route's own media type (text/plain for /metrics,
    # none for streams); the handlers always answer errors as JSON.
    reference = {"$ref": f"#/components/schemas/{ErrorBody.__name__}"}
    for path_item in document.get("paths", {}).values():
        for operation in path_item.values():
            for response in operation.get("responses", {}).values():
                content = response.get("content", {})
                if any(media.get("schema") == reference for media in content.values()):
                    response["content"] = {"application/json": {"schema": dict(reference)}}


def _operation_id(route: APIRoute) -> str:
    # Short, stable operation ids for generated clients: "merges-submit_merge".
    return f"{route.tags[0]}-{route.name}" if route.tags else route.name


def create_app(settings: ServiceSettings) -> FastAPI:
    """The tureen API for ``settings``; running it starts the job manager."""
    app = FastAPI(
        title=API_TITLE,
        version=API_VERSION,
        description=API_DESCRIPTION,
        lifespan=_lifespan(settings),
        # FastAPI's pages load scripts from public CDNs and its document skips auth:
        # service.api.routes.docs serves both instead.
        openapi_url=None,
        docs_url=None,
        redoc_url=None,
        generate_unique_id_function=_operation_id,
        openapi_tags=[
            {"name": "merges", "description": "Merge jobs and their output."},
            {"name": "plans", "description": "Dry runs from configs and headers."},
            {"name": "methods", "description": "The registered merge methods."},
            {"name": "operations", "description": "Health, readiness and metrics."},
            {"name": "trainings", "description": "LoRA and DPO training jobs and their adapters."},
            {"name": "searches", "description": "Recipe searches and their best merge."},
        ],
    )
    app.state.settings = settings
    app.state.manager = None
    app.state.worker_stop_seconds = WORKER_STOP_SECONDS
    install_error_handlers(app)
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_body_bytes)
    for module in (merges, plans, methods, health, metrics):
        app.include_router(module.router)
    app.include_router(trainings_routes.router)  # training jobs
    app.include_router(searches_routes.router)  # search jobs
    for router in (console_routes.page_router, console_routes.roots_router):  # web console
        app.include_router(router)
    app.include_router(tensor_stats_routes.router)  # the web console's compare view
    app.include_router(docs.openapi_router)
    if settings.docs:
        app.include_router(docs.docs_router)
    app.openapi = lambda: build_openapi(app)  # type: ignore[method-assign]
    return app
