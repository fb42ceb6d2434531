"""Synthetic, learnable tasks for tiny models: prompt/completion pairs and preference pairs.

Each task maps a short prompt to a short answer that a small model learns in a few dozen
steps (``reverse abc =`` → `` cba``, ``add 12 7 =`` → `` 19``, ``upper abc =`` → `` ABC``,
``title ab cd =`` → `` Ab Cd``). Every prompt ends on a non-space character and every
completion starts with a space, so tokenizing prompt and completion apart or together gives
the same tokens. Preference pairs take a task's right answer as ``chosen`` and a typical
mistake (the input copied, an off-by-one sum, the wrong case) as ``rejected``.

Everything is a pure function of the seed; train and held-out splits never share a prompt.
"""

from __future__ import annotations

import random
import string
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from training.data import write_jsonl

_LETTERS = string.ascii_lowercase


def _word(rng: random.Random, low: int = 3, high: int = 6) -> str:
    return "".join(rng.choice(_LETTERS) for _ in range(rng.randint(low, high)))


def _reverse(rng: random.Random) -> tuple[str, str, str]:
    word = _word(rng)
    while word == word[::-1]:
        word = _word(rng)
    return f"reverse {word} =", f" {word[::-1]}", f" {word}"


def _add(rng: random.Random) -> tuple[str, str, str]:
    a, b = rng.randint(0, 49), rng.randint(0, 49)
    wrong = a + b + rng.choice((-2, -1, 1, 2))
    return f"add {a} {b} =", f" {a + b}", f" {abs(wrong)}"


def _upper(rng: random.Random) -> tuple[str, str, str]:
    word = _word(rng)
    return f"upper {word} =", f" {word.upper()}", f" {word}"


def _title(rng: random.Random) -> tuple[str, str, str]:
    words = [_word(rng, 2, 5) for _ in range(rng.randint(2, 3))]
    right = " ".join(w.capitalize() for w in words)
    return f"title {' '.join(words)} =", f" {right}", f" {' '.join(words)}"


@dataclass(frozen=True)
class Task:
    """A synthetic task.

    Attributes:
        name: the task's name, also the prompt's first word.
        description: what the answer is.
        make: draws ``(prompt, right answer, typical wrong answer)`` from a random generator.
    """

    name: str
    description: str
    make: Callable[[random.Random], tuple[str, str, str]]


TASKS: dict[str, Task] = {
    task.name: task
    for task in (
        Task("reverse", "the word spelled backwards", _reverse),
        Task("add", "the sum of two numbers below 50", _add),
        Task("upper", "the word in capitals", _upper),
        Task("title", "each word capitalised", _title),
    )
}


def get_task(name: str) -> Task:
    """Return the task called ``name``.

    Raises:
        KeyError: with the known task names.
    """
    if name not in TASKS:
        raise KeyError(f"unknown task {name!r}; known tasks: {', '.join(TASKS)}")
    return TASKS[name]


def _unique_triples(task: Task, count: int, seed: int) -> list[tuple[str, str, str]]:
    rng = random.Random(f"{task.name}:{seed}")
    seen: set[str] = set()
    triples: list[tuple[str, str, str]] = []
    attempts = 0
    while len(triples) < count:
        attempts += 1
        if attempts > 50 * count + 1000:
            raise ValueError(f"task {task.name!r} cannot make {count} distinct prompts")
        triple = task.make(rng)
        if triple[0] not in seen:
            seen.add(triple[0])
            triples.append(triple)
    return triples


def examples(task: str, count: int, seed: int) -> list[dict[str, str]]:
    """``count`` distinct ``{"prompt", "completion"}`` records of ``task``."""
    return [
        {"prompt": p, "completion": c} for p, c, _ in _unique_triples(get_task(task), count, seed)
    ]


def preference_pairs(task: str, count: int, seed: int) -> list[dict[str, str]]:
    """``count`` distinct ``{"prompt", "chosen", "rejected"}`` records of ``task``."""
    return [
        {"prompt": p, "chosen": c, "rejected": r}
        for p, c, r in _unique_triples(get_task(task), count, seed)
    ]


@dataclass(frozen=True)
class TaskFiles:
    """The files a task was written to."""

    train: Path
    heldout: Path


def write_task(
    folder: Path,
    task: str,
    *,
    train: int = 256,
    heldout: int = 64,
    seed: int = 0,
    preferences: bool = False,
) -> TaskFiles:
    """Write ``train.jsonl`` and ``heldout.jsonl`` of one task into ``folder``.

    Args:
        folder: where the two files go (created).
        task: a name from ``TASKS``.
        train: records in the training split.
        heldout: records in the held-out split (no prompt is in both).
        seed: seeds the generator.
        preferences: write preference pairs for DPO instead of prompt/completion pairs.

    Returns:
        The two paths.
    """
    make = preference_pairs if preferences else examples
    records = make(task, train + heldout, seed)
    files = TaskFiles(folder / "train.jsonl", folder / "heldout.jsonl")
    write_jsonl(files.train, records[:train])
    write_jsonl(files.heldout, records[train:])
    return files


def pretraining_text(count: int, seed: int) -> list[str]:
    """Generic lines over the tasks' alphabet, with none of the tasks' mappings.

    Lines mix the task keywords, lower-case, capitalised and upper-case words and numbers in
    random order, so a base pre-trained on them knows the symbols but not the tasks.
    """
    rng = random.Random(f"pretrain:{seed}")
    keywords = [*TASKS, "="]

    def item() -> str:
        kind = rng.randrange(5)
        if kind == 0:
            return rng.choice(keywords)
        if kind == 1:
            return str(rng.randint(0, 99))
        word = _word(rng, 2, 6)
        return (word, word.upper(), word.capitalize())[kind - 2]

    return [" ".join(item() for _ in range(rng.randint(3, 9))) for _ in range(count)]
