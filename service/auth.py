"""Bearer-token checks, in constant time and without ever logging a token."""

from __future__ import annotations

import hmac
from collections.abc import Iterable


def token_accepted(given: str, tokens: Iterable[str]) -> bool:
    """Whether ``given`` equals one of ``tokens``.

    Every token is compared, each with :func:`hmac.compare_digest`, so the time taken does
    not reveal which token (or how much of one) matched.
    """
    supplied = given.encode("utf-8")
    matched = False
    for token in tokens:
        matched |= hmac.compare_digest(supplied, token.encode("utf-8"))
    return matched
