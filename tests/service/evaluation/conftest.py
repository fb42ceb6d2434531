"""A soup world on disk: a target model, helpful and harmful ingredients, held-out data."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.service.evaluation.soup_models import (
    char_tokenizer,
    perturbed,
    save,
    target_model,
    write_held_out,
)

HELPFUL = ("ing0", "ing1", "ing2", "ing3")
HARMFUL = "bad"


@dataclass(frozen=True)
class SoupWorld:
    root: Path
    target: Path
    held_out: Path
    exact: Path

    def recipe(self, **extra: Any) -> dict[str, Any]:
        """A greedy soup over every ingredient, scored by held-out loss."""
        document: dict[str, Any] = {
            "merge_method": "greedy_soup",
            "models": [{"model": str(self.root / name)} for name in (*HELPFUL, HARMFUL)],
            "evaluator": {"type": "held_out", "data": str(self.held_out), "metric": "loss"},
        }
        document.update(extra)
        return document


@pytest.fixture(scope="session")
def soup_world(tmp_path_factory: pytest.TempPathFactory) -> SoupWorld:
    root = tmp_path_factory.mktemp("soup")
    tokenizer = char_tokenizer()
    target = target_model(seed=0)
    save(target, tokenizer, root / "target")
    write_held_out(target, tokenizer, root / "held_out.jsonl", count=48, seed=1)
    write_held_out(target, tokenizer, root / "exact.jsonl", count=16, seed=2, plain_only=True)
    for index, name in enumerate(HELPFUL):
        save(perturbed(target, 0.3, seed=10 + index), tokenizer, root / name)
    save(perturbed(target, 1.5, seed=99), tokenizer, root / HARMFUL)
    return SoupWorld(root, root / "target", root / "held_out.jsonl", root / "exact.jsonl")
