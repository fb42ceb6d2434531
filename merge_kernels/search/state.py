"""Where a search keeps its state between evaluations: the store protocol and two stores.

A search saves its whole state (the strategy's, every evaluated point and score, the time
spent) after every evaluation, so a search that is stopped, killed or loses its machine
resumes where it was without scoring any point again. The state is plain JSON data: the
CLI keeps it in a file written atomically; the service can keep it in its job store.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Protocol

from merge_kernels.errors import RecipeError
from merge_kernels.io.staging import write_json_atomic


class SearchStateStore(Protocol):
    """Loads and saves one search's state (a JSON-able mapping)."""

    def load(self) -> dict[str, Any] | None:
        """The last saved state, or None if the search never saved one."""
        ...

    def save(self, state: dict[str, Any]) -> None:
        """Replace the saved state; on return it must survive a crash."""
        ...


class MemoryStateStore:
    """Keeps the state in this process (tests, and searches nobody resumes)."""

    def __init__(self, state: dict[str, Any] | None = None) -> None:
        self.state = state
        self.saves = 0

    def load(self) -> dict[str, Any] | None:
        return None if self.state is None else json.loads(json.dumps(self.state))

    def save(self, state: dict[str, Any]) -> None:
        # A JSON round trip: what is kept is what a file or a database would give back.
        self.state = json.loads(json.dumps(state))
        self.saves += 1


class JsonFileStateStore:
    """Keeps the state in a JSON file, replaced atomically at every save."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    def load(self) -> dict[str, Any] | None:
        if not self.path.exists():
            return None
        try:
            loaded = json.loads(self.path.read_text())
        except (OSError, ValueError) as error:
            raise RecipeError(
                "state", f"cannot read the search state {self.path}: {error}"
            ) from None
        if not isinstance(loaded, dict):
            raise RecipeError("state", f"{self.path} does not hold a search state")
        return loaded

    def save(self, state: dict[str, Any]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(self.path, state)
