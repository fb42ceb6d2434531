"""Refuse request text that no file name or stored record can hold.

A NUL character cannot be part of a path (the operating system refuses it) and an unpaired
UTF-16 surrogate (``\\ud800`` in JSON) cannot be encoded as UTF-8 at all, so either one in a
request body would fail deep inside the engine. :func:`check_text_fields` finds the first
such string, key or value, and names its field.
"""

from __future__ import annotations

from merge_kernels.checkpoints.confinement import unusable_text
from service.errors import ApiError


def _join(field: str, key: str | int) -> str:
    if isinstance(key, int):
        return f"{field}[{key}]"
    return f"{field}.{key}" if field else key


def _first_bad_text(value: object, field: str) -> tuple[str, str] | None:
    # An explicit stack rather than recursion: decoded bodies are already depth-checked by
    # the parser, but a walk must not be the thing that overflows.
    stack: list[tuple[object, str]] = [(value, field)]
    while stack:
        item, where = stack.pop()
        if isinstance(item, str):
            problem = unusable_text(item)
            if problem is not None:
                return where or "body", problem
        elif isinstance(item, dict):
            for key, child in reversed(list(item.items())):
                if isinstance(key, str):
                    problem = unusable_text(key)
                    if problem is not None:
                        return where or "body", f"{problem} in a key"
                stack.append((child, _join(where, str(key))))
        elif isinstance(item, list):
            stack.extend(
                (child, _join(where, index)) for index, child in reversed(list(enumerate(item)))
            )
    return None


def check_text_fields(document: object) -> None:
    """Raise a 422 naming the first string in ``document`` that holds NUL or a lone surrogate.

    Raises:
        ApiError: 422 ``invalid_text``, with ``details.field`` the offending field's path.
    """
    found = _first_bad_text(document, "")
    if found is None:
        return
    field, problem = found
    raise ApiError(
        422,
        "invalid_text",
        f"{field} holds {problem}, which no path or name can contain; send valid Unicode "
        "text without NUL characters",
        details={"field": field},
    )


def check_url_text(name: str, value: str) -> None:
    """Raise a 422 when a path or query parameter ``name`` holds NUL or a lone surrogate."""
    problem = unusable_text(value)
    if problem is not None:
        raise ApiError(
            422,
            "invalid_text",
            f"{name} holds {problem}, which no path or name can contain",
            details={"field": name},
        )
