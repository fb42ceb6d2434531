"""The plain-text answer of ``GET /v1/merges/{id}/log`` and ``GET /v1/trainings/{id}/log``."""

from __future__ import annotations

from typing import Any

from fastapi.responses import PlainTextResponse

from service.errors import error_responses
from service.jobs.job_log import MAX_LOG_BYTES

LOG_SUMMARY_DOC = (
    "What the job's worker process logged while running it, one line per record "
    f"(time, level, message), as `text/plain`; at most {MAX_LOG_BYTES} bytes, after which "
    "a last line says the rest was dropped. Empty until the job has started."
)

LOG_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {
        "content": {"text/plain": {"schema": {"type": "string"}}},
        "description": "The job's log.",
    },
    **error_responses(401, 404, 422),
}


def log_response(text: str) -> PlainTextResponse:
    """The job's log as an uncached ``text/plain`` answer (it grows while the job runs)."""
    return PlainTextResponse(text, headers={"Cache-Control": "no-store"})
