"""The four tasks of the merge-quality experiment, sized for a small chat model.

Each task turns a short instruction into a short, exactly checkable answer, and is written
as a chat turn: the prompt is ``<|im_start|>user\\n{instruction}<|im_end|>\\n<|im_start|>
assistant\\n`` (ChatML, the format SmolLM2-Instruct and most small instruct models speak)
and the completion is the answer, to which training and evaluation append the tokenizer's
end-of-sequence token. A base without those special tokens (the tiny test base) reads them
as plain text, which is just as learnable.

* ``add`` (arithmetic): the sum of a two-digit and a three-digit number;
* ``reverse`` (string transformation): a list of 3 to 5 words in reverse order;
* ``json`` (format conversion): ``key=value`` pairs as one line of JSON, numbers unquoted;
* ``sentiment`` (classification): a templated review is ``positive`` or ``negative``;
  clauses may be negated, and in a contrast (``..., but ...``) the second clause decides.

The splits (train, validation, test) are drawn from one stream of distinct prompts per task,
so no prompt is in two splits; everything is a pure function of the seed.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

WORDS = [
    "apple",
    "river",
    "stone",
    "cloud",
    "tiger",
    "piano",
    "garden",
    "window",
    "candle",
    "forest",
    "rocket",
    "silver",
    "orange",
    "castle",
    "bridge",
    "pencil",
    "summer",
    "winter",
    "planet",
    "mirror",
    "basket",
    "dragon",
    "island",
    "jacket",
    "ladder",
    "marble",
    "needle",
    "ocean",
    "pepper",
    "rabbit",
    "saddle",
    "tunnel",
    "velvet",
    "wagon",
    "yellow",
    "anchor",
    "button",
    "cactus",
    "desert",
    "engine",
    "falcon",
    "guitar",
    "hammer",
    "jungle",
    "kettle",
    "lemon",
    "meadow",
    "nickel",
    "oyster",
    "parrot",
    "quartz",
    "ribbon",
    "spider",
    "timber",
    "violin",
    "walnut",
    "zebra",
]
KEYS = ("name", "city", "color", "animal", "age", "year", "size", "count", "item", "day")
NUMBER_KEYS = frozenset({"age", "year", "size", "count"})
SUBJECTS = [
    "movie",
    "film",
    "book",
    "meal",
    "service",
    "hotel",
    "concert",
    "game",
    "album",
    "show",
    "story",
    "phone",
    "camera",
    "room",
    "coffee",
    "soup",
    "pizza",
    "ride",
    "lesson",
    "trip",
]
POSITIVE = [
    "great",
    "wonderful",
    "excellent",
    "delightful",
    "superb",
    "lovely",
    "fantastic",
    "charming",
    "brilliant",
    "enjoyable",
    "pleasant",
    "amazing",
]
NEGATIVE = [
    "terrible",
    "awful",
    "boring",
    "dreadful",
    "horrible",
    "dull",
    "disappointing",
    "poor",
    "bland",
    "annoying",
    "miserable",
    "painful",
]
INTENSIFIERS = ("", "really ", "truly ", "quite ", "very ")


def chat_prompt(instruction: str) -> str:
    """The instruction as a ChatML user turn followed by the assistant's header."""
    return f"<|im_start|>user\n{instruction}<|im_end|>\n<|im_start|>assistant\n"


def _add(rng: random.Random) -> tuple[str, str]:
    a, b = rng.randint(10, 99), rng.randint(100, 999)
    if rng.random() < 0.5:
        a, b = b, a
    return f"Add: {a}+{b}", str(a + b)


def _reverse(rng: random.Random) -> tuple[str, str]:
    words = rng.sample(WORDS, rng.randint(3, 5))
    return f"Reverse the words: {' '.join(words)}", " ".join(reversed(words))


def _json(rng: random.Random) -> tuple[str, str]:
    keys = rng.sample(KEYS, rng.randint(2, 3))
    pairs: dict[str, str | int] = {}
    for key in keys:
        if key in NUMBER_KEYS:
            pairs[key] = rng.randint(1, 99)
        else:
            pairs[key] = rng.choice(WORDS)
    source = "; ".join(f"{key}={value}" for key, value in pairs.items())
    return f"To JSON: {source}", json.dumps(pairs)


def _clause(rng: random.Random, good: bool) -> str:
    negated = rng.random() < 0.35
    adjective = rng.choice(POSITIVE if good != negated else NEGATIVE)
    verb = "was not" if negated else "was"
    return f"{rng.choice(SUBJECTS)} {verb} {rng.choice(INTENSIFIERS)}{adjective}"


def _sentiment(rng: random.Random) -> tuple[str, str]:
    good = rng.random() < 0.5
    if rng.random() < 0.4:  # a contrast: the clause after "but" decides
        review = f"The {_clause(rng, not good)}, but the {_clause(rng, good)}."
    else:
        review = f"The {_clause(rng, good)}."
    return f"Sentiment of: {review}", "positive" if good else "negative"


@dataclass(frozen=True)
class Task:
    """One task of the experiment.

    Attributes:
        name: short name, used in tables and file names.
        kind: what sort of skill it is (arithmetic, string transformation, ...).
        make: draws ``(instruction, answer)`` from a random generator.
    """

    name: str
    kind: str
    make: Callable[[random.Random], tuple[str, str]]


TASKS: tuple[Task, ...] = (
    Task("add", "arithmetic", _add),
    Task("reverse", "string transformation", _reverse),
    Task("json", "format conversion", _json),
    Task("sentiment", "classification", _sentiment),
)


@dataclass(frozen=True)
class SplitSizes:
    """Records per split of every task."""

    train: int
    validation: int
    test: int


def records(task: Task, count: int, seed: int) -> list[dict[str, str]]:
    """``count`` distinct ``{"prompt", "completion"}`` records of ``task``.

    Raises:
        ValueError: the task cannot make that many distinct prompts.
    """
    rng = random.Random(f"{task.name}:{seed}")
    seen: set[str] = set()
    out: list[dict[str, str]] = []
    attempts = 0
    while len(out) < count:
        attempts += 1
        if attempts > 50 * count + 1000:
            raise ValueError(f"task {task.name!r} cannot make {count} distinct prompts")
        instruction, answer = task.make(rng)
        if instruction not in seen:
            seen.add(instruction)
            out.append({"prompt": chat_prompt(instruction), "completion": answer})
    return out


def _write_jsonl(path: Path, rows: list[dict[str, str]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")


def write_splits(folder: Path, task: Task, sizes: SplitSizes, seed: int) -> dict[str, Path]:
    """Write ``train.jsonl``, ``validation.jsonl`` and ``test.jsonl`` of ``task`` into ``folder``.

    Returns:
        The three paths by split name.
    """
    rows = records(task, sizes.train + sizes.validation + sizes.test, seed)
    cuts = {
        "train": rows[: sizes.train],
        "validation": rows[sizes.train : sizes.train + sizes.validation],
        "test": rows[sizes.train + sizes.validation :],
    }
    paths = {split: folder / f"{split}.jsonl" for split in cuts}
    for split, chunk in cuts.items():
        _write_jsonl(paths[split], chunk)
    return paths
