""" "Did you mean" hints for misspelled names (methods, parameters, recipe keys)."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


def closest(word: str, candidates: Iterable[str]) -> str | None:
    """The candidate most like ``word``, when one is close enough to be a likely typo."""
    matches = difflib.get_close_matches(word, list(candidates), n=1, cutoff=0.6)
    return matches[0] if matches else None


def did_you_mean(word: str, candidates: Iterable[str]) -> str:
    """``"did you mean 'ties'? "`` for a likely typo of a candidate, else ``""``."""
    match = closest(word, candidates)
    return f"did you mean {match!r}? " if match is not None else ""
