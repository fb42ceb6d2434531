"""JSONL data files: forms, line-numbered errors, hashes and the held-out split."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from training.data import hold_out, load_splits, read_jsonl
from training.errors import TrainingDataError


def test_reads_records_and_hashes_the_file(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    path.write_text(
        '{"prompt": "a", "completion": "b", "extra": 1}\n\n{"prompt": "c", "completion": "d"}\n'
    )
    data = read_jsonl(path, ("prompt_completion", "text"))
    assert data.form == "prompt_completion"
    assert data.records == [{"prompt": "a", "completion": "b"}, {"prompt": "c", "completion": "d"}]
    assert data.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('{"prompt": "a", "completion": "b"}\nnot json\n', "line 2 is not JSON"),
        (
            '{"text": "a"}\n{"prompt": "a", "completion": "b"}\n',
            "line 2: every line must have the same form",
        ),
        ('{"prompt": "a", "completion": 3}\n', "line 1: field 'completion' must be a string"),
        (
            '{"question": "a"}\n',
            'line 1: expected a JSON object {"prompt", "completion"} or {"text"}',
        ),
        ("\n", "has no records"),
    ],
)
def test_errors_name_the_line(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text(text)
    with pytest.raises(TrainingDataError, match=message.replace("{", r"\{").replace("}", r"\}")):
        read_jsonl(path, ("prompt_completion", "text"))


def test_missing_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(TrainingDataError, match=r"cannot read data file .*nope\.jsonl"):
        read_jsonl(tmp_path / "nope.jsonl", ("text",))


def test_hold_out_is_deterministic_and_disjoint() -> None:
    records = [{"text": str(i)} for i in range(20)]
    train, held = hold_out(records, 0.25, seed=4)
    assert (train, held) == hold_out(records, 0.25, seed=4)
    assert len(held) == 5 and len(train) == 15
    assert sorted(r["text"] for r in train + held) == sorted(r["text"] for r in records)
    assert hold_out(records, 0.25, seed=5)[1] != held
    with pytest.raises(TrainingDataError, match="at least two records"):
        hold_out(records[:1], 0.5, seed=0)


def test_held_out_file_must_match_the_training_form(tmp_path: Path) -> None:
    (tmp_path / "t.jsonl").write_text('{"text": "a"}\n')
    (tmp_path / "h.jsonl").write_text('{"prompt": "a", "completion": "b"}\n')
    with pytest.raises(TrainingDataError, match="both must have the same form"):
        load_splits(
            tmp_path / "t.jsonl",
            tmp_path / "h.jsonl",
            allowed=("prompt_completion", "text"),
            fraction=0.1,
            seed=0,
        )
