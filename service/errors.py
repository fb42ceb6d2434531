"""One error shape for every HTTP failure: ``{"error": {"code", "message", "details"}}``.

Engine and job errors (``TureenError`` subclasses) map to statuses by class, then by code;
request validation errors and ``HTTPException`` take the same shape; anything else is a bug,
logged here and answered with a generic 500 that reveals nothing of the server.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from merge_kernels.errors import (
    CheckpointFileError,
    CheckpointNotFoundError,
    IncompatibleCheckpointsError,
    RecipeError,
    TureenError,
)
from service.client_paths import ClientPaths

log = logging.getLogger(__name__)

#: Statuses of the codes that are not the request's fault in the usual 422 sense.
_CODE_STATUS: dict[str, int] = {
    "not_found": 404,
    "idempotency_conflict": 409,
    "output_exists": 409,
    "conflict": 409,
    "cancelled": 409,
    "job_finished": 409,
    "job_not_finished": 409,
    "over_memory_budget": 422,
    "insufficient_space": 507,
}

#: Input errors: the recipe or the checkpoints it names are at fault (always 422, even for
#: a missing checkpoint, which shares the code ``not_found`` with a missing job).
_INPUT_ERRORS: tuple[type[TureenError], ...] = (
    RecipeError,
    IncompatibleCheckpointsError,
    CheckpointNotFoundError,
    CheckpointFileError,
)

_STATUS_CODE_NAMES: dict[int, str] = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    406: "not_acceptable",
    409: "conflict",
    413: "payload_too_large",
    415: "unsupported_media_type",
    416: "range_not_satisfiable",
    422: "invalid_request",
    500: "internal_error",
    503: "unavailable",
    507: "insufficient_space",
}


class ErrorInfo(BaseModel):
    """What went wrong."""

    code: str = Field(description="Stable machine-readable code, e.g. `invalid_recipe`.")
    message: str = Field(description="What was wrong and how to fix it.")
    details: dict[str, Any] = Field(
        default_factory=dict,
        description="Context: `field` (the offending recipe key), `problems`, `errors`...",
    )


class ErrorBody(BaseModel):
    """The body of every error response."""

    error: ErrorInfo


class ApiError(StarletteHTTPException):
    """An HTTP error raised by a route or dependency, with a code and details."""

    def __init__(
        self,
        status_code: int,
        code: str,
        message: str,
        *,
        details: Mapping[str, Any] | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(status_code, message, headers=dict(headers) if headers else None)
        self.code = code
        self.message = message
        self.details = dict(details or {})


def status_for(error: TureenError) -> int:
    """The HTTP status of an engine or job error."""
    if isinstance(error, _INPUT_ERRORS):
        return 422
    return _CODE_STATUS.get(error.code, 422)


def error_response(
    status_code: int,
    code: str,
    message: str,
    details: Mapping[str, Any] | None = None,
    headers: Mapping[str, str] | None = None,
) -> JSONResponse:
    """A response with the API's error body."""
    body = ErrorBody(error=ErrorInfo(code=code, message=message, details=dict(details or {})))
    return JSONResponse(
        body.model_dump(mode="json"),
        status_code=status_code,
        headers=dict(headers) if headers else None,
    )


def _location(loc: tuple[Any, ...]) -> str:
    path = ""
    for part in loc:
        if isinstance(part, int):
            path += f"[{part}]"
        else:
            path += f".{part}" if path else str(part)
    return path


async def _tureen_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, TureenError)
    settings = getattr(request.app.state, "settings", None)
    if settings is None:
        return error_response(status_for(exc), exc.code, exc.message, exc.details)
    message, details = ClientPaths.for_data_dir(settings.data_dir).error(exc)
    return error_response(status_for(exc), exc.code, message, details)


async def _validation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    errors = list(exc.errors())
    problems = [f"{_location(tuple(e.get('loc', ())))}: {e.get('msg', '')}" for e in errors]
    first = errors[0] if errors else {}
    field = _location(tuple(first.get("loc", ())))
    message = f"{field}: {first.get('msg', 'invalid request')}" if field else "invalid request"
    return error_response(
        422, "invalid_request", message, {"field": field or None, "errors": problems}
    )


_METHODS = ("DELETE", "GET", "HEAD", "OPTIONS", "PATCH", "POST", "PUT")


def allowed_methods(request: Request) -> list[str]:
    """Every method some route of the app serves at the request's path, sorted.

    Starlette's 405 names only the methods of the first route whose path matched, but
    FastAPI makes one route per method (``GET`` and ``DELETE /v1/merges/{id}`` are two).
    """
    routes = request.app.router.routes
    return [
        method
        for method in _METHODS
        if any(
            route.matches({**request.scope, "method": method})[0] is Match.FULL for route in routes
        )
    ]


async def _http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    headers = getattr(exc, "headers", None)
    if exc.status_code == 405:
        headers = {**(headers or {}), "Allow": ", ".join(allowed_methods(request))}
    if isinstance(exc, ApiError):
        return error_response(exc.status_code, exc.code, exc.message, exc.details, headers)
    code = _STATUS_CODE_NAMES.get(exc.status_code, f"http_{exc.status_code}")
    return error_response(exc.status_code, code, str(exc.detail), None, headers)


async def _unexpected_error(request: Request, exc: Exception) -> JSONResponse:
    log.error("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    return error_response(
        500, "internal_error", "the server failed to handle this request; it has been logged"
    )


def install_error_handlers(app: FastAPI) -> None:
    """Register the handlers that give every error the API's shape."""
    app.add_exception_handler(TureenError, _tureen_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(Exception, _unexpected_error)


def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses`` entries with the error body for ``statuses``."""
    descriptions = {
        401: "Missing or wrong bearer token.",
        404: "No such job or file.",
        409: "Conflict with the job's state or an earlier request.",
        413: "Request body larger than the configured limit.",
        415: "Body is neither JSON nor YAML.",
        416: "The requested range lies outside the file.",
        422: "Invalid request, recipe or checkpoints; `details` says which.",
        503: "Not ready.",
        507: "Too little free space on the data dir's disk; `details` has the numbers.",
    }
    return {
        status: {"model": ErrorBody, "description": descriptions.get(status, "Error.")}
        for status in statuses
    }
