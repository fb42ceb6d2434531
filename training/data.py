"""JSONL training data: reading and checking records, hashing files, holding out a split.

Supervised fine-tuning reads ``{"prompt": ..., "completion": ...}`` lines (loss on the
completion only) or ``{"text": ...}`` lines (loss on every token); DPO reads
``{"prompt": ..., "chosen": ..., "rejected": ...}`` lines. Every line of a file must have
the same form; other keys are ignored.
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from training.errors import TrainingDataError

RecordForm = Literal["prompt_completion", "text", "preference"]
_FIELDS: dict[RecordForm, tuple[str, ...]] = {
    "prompt_completion": ("prompt", "completion"),
    "text": ("text",),
    "preference": ("prompt", "chosen", "rejected"),
}


@dataclass(frozen=True)
class DataFile:
    """One data file as read: its records and what identifies its contents.

    Attributes:
        path: the file.
        form: the record form every line has.
        records: the records, each reduced to the form's fields.
        sha256: hash of the file's bytes.
    """

    path: Path
    form: RecordForm
    records: list[dict[str, str]]
    sha256: str

    def summary(self) -> dict[str, object]:
        """What the training report records about this file."""
        return {
            "path": str(self.path),
            "sha256": self.sha256,
            "records": len(self.records),
            "form": self.form,
        }


def _form_of(record: dict[str, object]) -> RecordForm | None:
    if "chosen" in record or "rejected" in record:
        return "preference"
    if "completion" in record:
        return "prompt_completion"
    if "text" in record:
        return "text"
    return None


def read_jsonl(path: Path, allowed: tuple[RecordForm, ...]) -> DataFile:
    """Read and check a JSONL data file.

    Args:
        path: the file.
        allowed: the record forms the caller accepts.

    Returns:
        The file's records, form and hash.

    Raises:
        TrainingDataError: the file is missing, empty, not JSONL, mixes forms, or a record
            lacks a field or has a non-string value (the line number is named).
    """
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as error:
        raise TrainingDataError(
            f"cannot read data file {path}: {error.strerror or error}", details={"path": str(path)}
        ) from None
    wanted = " or ".join(
        "{" + ", ".join(f'"{name}"' for name in _FIELDS[form]) + "}" for form in allowed
    )
    records: list[dict[str, str]] = []
    form: RecordForm | None = None
    for number, line in enumerate(raw.decode("utf-8", errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}, line {number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise TrainingDataError(
                f"{where} is not JSON: {error.msg}", details={"path": str(path), "line": number}
            ) from None
        line_form = _form_of(record) if isinstance(record, dict) else None
        if line_form is None or line_form not in allowed:
            raise TrainingDataError(
                f"{where}: expected a JSON object {wanted}",
                details={"path": str(path), "line": number},
            )
        if form is not None and line_form != form:
            raise TrainingDataError(
                f"{where}: every line must have the same form; earlier lines are {form}",
                details={"path": str(path), "line": number},
            )
        form = line_form
        values: dict[str, str] = {}
        for name in _FIELDS[line_form]:
            value = record.get(name)
            if not isinstance(value, str):
                raise TrainingDataError(
                    f"{where}: field {name!r} must be a string",
                    details={"path": str(path), "line": number, "field": name},
                )
            values[name] = value
        records.append(values)
    if form is None:
        raise TrainingDataError(
            f"data file {path} has no records; expected JSON lines {wanted}",
            details={"path": str(path)},
        )
    return DataFile(path, form, records, hashlib.sha256(raw).hexdigest())


def hold_out(
    records: list[dict[str, str]], fraction: float, seed: int
) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    """Split records into train and held-out parts, deterministically by seed.

    Args:
        records: the records to split.
        fraction: the share to hold out (at least one record, and at least one kept).
        seed: seeds the shuffle.

    Returns:
        ``(train, held_out)``, each in the records' original order.

    Raises:
        TrainingDataError: fewer than two records, so nothing can be held out.
    """
    if len(records) < 2:
        raise TrainingDataError(
            "need at least two records to hold some out; give data.eval a held-out file"
        )
    count = min(len(records) - 1, max(1, round(fraction * len(records))))
    order = list(range(len(records)))
    random.Random(seed).shuffle(order)
    held = set(order[:count])
    return (
        [r for i, r in enumerate(records) if i not in held],
        [r for i, r in enumerate(records) if i in held],
    )


def write_jsonl(path: Path, records: list[dict[str, str]]) -> None:
    """Write records as JSON lines (UTF-8, one object a line)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    text = "".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records)
    path.write_text(text, encoding="utf-8")


@dataclass(frozen=True)
class Splits:
    """Training and held-out records, with the files they came from.

    Attributes:
        train_file: the training file as read.
        held_out_file: the held-out file as read (None: held out from the training file).
        train: the records to train on.
        held_out: the records to evaluate on.
    """

    train_file: DataFile
    held_out_file: DataFile | None
    train: list[dict[str, str]]
    held_out: list[dict[str, str]]

    def counts(self) -> dict[str, int]:
        """Records used on each side."""
        return {"train": len(self.train), "held_out": len(self.held_out)}


def load_splits(
    train: Path,
    held_out: Path | None,
    *,
    allowed: tuple[RecordForm, ...],
    fraction: float,
    seed: int,
) -> Splits:
    """Read the training file and the held-out file, or hold out ``fraction`` of train.

    Raises:
        TrainingDataError: a file is unreadable or malformed, or the two files have
            different record forms.
    """
    train_file = read_jsonl(train, allowed)
    if held_out is None:
        kept, held = hold_out(train_file.records, fraction, seed)
        return Splits(train_file, None, kept, held)
    held_file = read_jsonl(held_out, allowed)
    if held_file.form != train_file.form:
        raise TrainingDataError(
            f"held-out file {held_out} has {held_file.form} records but the training file has "
            f"{train_file.form} records; both must have the same form",
            details={"path": str(held_out)},
        )
    return Splits(train_file, held_file, train_file.records, held_file.records)
