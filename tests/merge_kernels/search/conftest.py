"""A TIES world on disk: a far base, fine-tunes near a target, validation and test data.

The held-out completions are the target's, so a merge scores well when it is close to the
target. The fine-tunes are the target plus independent noise and the base is far from it:
each task vector is (target − base) plus noise, so the best merge adds about one task
vector's worth of the shared direction (``lambda``) while trimming the noise (``density``).
"""

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

FINETUNES = ("ft0", "ft1", "ft2")


@dataclass(frozen=True)
class TiesWorld:
    root: Path
    validation: Path
    test: Path

    def recipe(self) -> dict[str, Any]:
        """TIES over the fine-tunes, one shared density and lambda searched."""
        density = {"search": {"low": 0.1, "high": 1.0, "name": "density"}}
        return {
            "merge_method": "ties",
            "base_model": str(self.root / "base"),
            "models": [
                {"model": str(self.root / name), "parameters": {"weight": 1.0, "density": density}}
                for name in FINETUNES
            ],
            "parameters": {"lambda": {"search": {"low": 0.25, "high": 2.0}}},
            "dtype": "float32",
        }

    def spec(self, strategy: Any, evaluations: int, **extra: Any) -> dict[str, Any]:
        document: dict[str, Any] = {
            "recipe": self.recipe(),
            "strategy": strategy,
            "budget": {"evaluations": evaluations},
            "seed": 0,
            "evaluator": {"type": "held_out", "data": str(self.validation), "metric": "loss"},
            "test": {"data": str(self.test)},
        }
        document.update(extra)
        return document


@pytest.fixture(scope="session")
def ties_world(tmp_path_factory: pytest.TempPathFactory) -> TiesWorld:
    root = tmp_path_factory.mktemp("ties_world")
    tokenizer = char_tokenizer()
    target = target_model(seed=0)
    save(perturbed(target, 1.0, seed=5), tokenizer, root / "base")
    for index, name in enumerate(FINETUNES):
        save(perturbed(target, 0.4, seed=20 + index), tokenizer, root / name)
    validation = write_held_out(target, tokenizer, root / "validation.jsonl", count=16, seed=1)
    test = write_held_out(target, tokenizer, root / "test.jsonl", count=8, seed=2)
    return TiesWorld(root, validation, test)
