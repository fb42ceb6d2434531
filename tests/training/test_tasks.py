"""Synthetic tasks: right answers, deterministic by seed, disjoint splits."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path

import pytest

from training.tasks import TASKS, examples, preference_pairs, pretraining_text, write_task


@pytest.mark.parametrize("task", sorted(TASKS))
def test_answers_are_right_and_pairs_differ(task: str) -> None:
    for record in preference_pairs(task, 200, seed=3):
        prompt, chosen, rejected = record["prompt"], record["chosen"], record["rejected"]
        assert prompt.startswith(f"{task} ") and prompt.endswith(" =")
        assert chosen.startswith(" ") and rejected.startswith(" ") and chosen != rejected
        argument = prompt[len(task) + 1 : -2]
        answers: dict[str, Callable[[str], str]] = {
            "reverse": lambda a: a[::-1],
            "add": lambda a: str(sum(int(n) for n in a.split())),
            "upper": str.upper,
            "title": lambda a: " ".join(w.capitalize() for w in a.split()),
        }
        expected = answers[task](argument)
        assert chosen == f" {expected}", record


def test_same_seed_same_records_other_seed_other_records() -> None:
    assert examples("reverse", 50, seed=1) == examples("reverse", 50, seed=1)
    assert examples("reverse", 50, seed=1) != examples("reverse", 50, seed=2)
    prompts = [r["prompt"] for r in examples("add", 300, seed=0)]
    assert len(set(prompts)) == 300


def test_write_task_splits_without_shared_prompts(tmp_path: Path) -> None:
    files = write_task(tmp_path / "upper", "upper", train=40, heldout=10, seed=5)
    train = [json.loads(line) for line in files.train.read_text().splitlines()]
    held = [json.loads(line) for line in files.heldout.read_text().splitlines()]
    assert len(train) == 40 and len(held) == 10
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in held}
    assert set(train[0]) == {"prompt", "completion"}
    pairs = write_task(tmp_path / "pairs", "title", train=4, heldout=2, preferences=True)
    assert set(json.loads(pairs.train.read_text().splitlines()[0])) == {
        "prompt",
        "chosen",
        "rejected",
    }


def test_pretraining_text_holds_no_task_mapping() -> None:
    lines = pretraining_text(500, seed=0)
    assert lines == pretraining_text(500, seed=0)
    for line in lines:
        match = re.search(r"reverse (\w+) = (\w+)", line)
        assert match is None or match.group(2) != match.group(1)[::-1] or len(match.group(1)) < 2


def test_unknown_task_names_the_known_ones() -> None:
    with pytest.raises(KeyError, match="known tasks: reverse, add, upper, title"):
        examples("sort", 1, seed=0)
