"""Keep credentials that clients put in query strings out of the access log.

The API takes tokens only in the ``Authorization`` header, but a client may still send one
as ``?token=...``; uvicorn's access log would write it to disk. The filter here rewrites each
access record's path so that only the API's own query parameters keep their values.
"""

from __future__ import annotations

import copy
import logging
from typing import Any
from urllib.parse import parse_qsl

#: Query parameters of the API (list pages, checksums); no credential is among them.
LOGGED_QUERY_PARAMETERS = frozenset({"status", "limit", "offset", "sha256"})
REDACTED = "***"


def redact_query(path: str) -> str:
    """``path`` with every query parameter but the API's own replaced by ``***``.

    A parameter the API does not define, name and value, could be a credential, so neither
    is kept: ``/v1/merges?limit=5&token=abc`` becomes ``/v1/merges?limit=5&***``.
    """
    route, separator, query = path.partition("?")
    if not separator:
        return path
    kept = []
    for name, value in parse_qsl(query, keep_blank_values=True):
        if name in LOGGED_QUERY_PARAMETERS and value.isalnum() and len(value) <= 32:
            kept.append(f"{name}={value}")
        else:
            kept.append(REDACTED)
    if not kept and query:
        kept.append(REDACTED)
    return f"{route}?{'&'.join(kept)}"


class QueryRedactionFilter(logging.Filter):
    """A filter for uvicorn's access log handler that redacts query strings."""

    def filter(self, record: logging.LogRecord) -> bool:
        """Rewrite the record's path argument; never drops a record."""
        args = record.args
        # uvicorn logs: client address, method, path with query, HTTP version, status.
        if isinstance(args, tuple) and len(args) == 5 and isinstance(args[2], str):
            record.args = (args[0], args[1], redact_query(args[2]), args[3], args[4])
        return True


def uvicorn_log_config() -> dict[str, Any]:
    """uvicorn's default logging configuration with query strings redacted in the access log."""
    from uvicorn.config import LOGGING_CONFIG

    config = copy.deepcopy(LOGGING_CONFIG)
    config.setdefault("filters", {})["redact_query"] = {
        "()": f"{__name__}.{QueryRedactionFilter.__name__}"
    }
    config["handlers"]["access"]["filters"] = ["redact_query"]
    return config
