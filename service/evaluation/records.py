"""Held-out records: a JSONL file of ``{"prompt", "completion"}`` or ``{"text"}`` lines."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from merge_kernels.checkpoints.confinement import UNCONFINED, Confinement
from merge_kernels.errors import RecipeError


@dataclass(frozen=True)
class Record:
    """One held-out example: a prompt and the completion scored after it.

    A ``{"text"}`` record has an empty prompt: every token after the first is scored.
    """

    prompt: str
    completion: str


def load_records(
    path: Path, *, max_records: int | None = None, confinement: Confinement = UNCONFINED
) -> list[Record]:
    """Read and check a held-out JSONL file.

    Args:
        path: the file.
        max_records: stop after this many records.
        confinement: where the file must resolve to (a service's allowed roots).

    Raises:
        RecipeError: (field ``evaluator.data``) unreadable file, a line that is not JSON or
            has neither prompt/completion nor text, or no records at all.
        PathOutsideRootsError: the file links outside ``confinement``.
    """
    records: list[Record] = []
    try:
        lines = confinement.read_bytes(path).decode("utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as error:
        raise RecipeError("evaluator.data", f"cannot read {path.name}: {error}") from None
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as error:
            raise RecipeError(
                "evaluator.data", f"{path.name} line {number} is not JSON: {error.msg}"
            ) from None
        records.append(_record(item, path.name, number))
        if max_records is not None and len(records) >= max_records:
            break
    if not records:
        raise RecipeError("evaluator.data", f"{path.name} holds no records")
    return records


def _record(item: object, name: str, number: int) -> Record:
    if isinstance(item, dict):
        prompt, completion, text = item.get("prompt"), item.get("completion"), item.get("text")
        if isinstance(prompt, str) and isinstance(completion, str) and completion:
            return Record(prompt, completion)
        if isinstance(text, str) and text:
            return Record("", text)
    raise RecipeError(
        "evaluator.data",
        f'{name} line {number}: give {{"prompt": ..., "completion": ...}} with a non-empty '
        'completion, or {"text": ...}',
    )
