"""Merging through tureen's engine and scoring through its held-out evaluator.

Hyper-parameters are chosen as the TIES paper (Yadav et al., NeurIPS 2023) does: on a
validation split separate from the test split, here exact match averaged over the tasks'
validation splits, ties going to the lower loss.
"""

from __future__ import annotations

import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from quality_methods import Settings
from quality_tasks import TASKS

METRICS = ("exact_match", "token_accuracy", "loss")
_START = time.perf_counter()


def log(text: str) -> None:
    """Progress on stderr, with the time since start."""
    print(f"[{time.perf_counter() - _START:7.1f} s] {text}", file=sys.stderr, flush=True)


class Lab:
    """Merges through the engine and scores through the held-out evaluator."""

    def __init__(self, work: Path, base: Path, device: str, settings: Settings) -> None:
        from service.evaluation.held_out import HeldOutEvaluator
        from service.evaluation.records import load_records

        self.work = work
        self.base = base
        self.device = device
        self.merges = 0
        # Folders still needed (a spectral merge at scale 1, rescaled later): never discarded.
        self.kept: set[Path] = set()
        data = work / "data"

        def evaluator(*paths: Path) -> HeldOutEvaluator:
            records = [record for path in paths for record in load_records(path)]
            return HeldOutEvaluator(
                records,
                metric="exact_match",
                batch_size=settings.eval_batch_size,
                max_length=settings.max_length,
                max_new_tokens=settings.max_new_tokens,
                device=device,
            )

        self.test = {task.name: evaluator(data / task.name / "test.jsonl") for task in TASKS}
        # Equal-sized validation splits: exact match over all of them is the tasks' mean.
        self.validation = evaluator(*(data / task.name / "validation.jsonl" for task in TASKS))
        self.soup_validation = evaluator(data / settings.soup_task / "validation.jsonl")

    def merge(self, document: dict[str, Any], name: str) -> Path:
        """Run a recipe through the engine into a scratch folder."""
        from merge_kernels.recipe import parse_recipe
        from merge_kernels.runner import MergeOptions, run_merge

        out = self.work / "merges" / name
        run_merge(parse_recipe(document), out, MergeOptions(device=self.device, overwrite=True))
        self.merges += 1
        return out

    def rescale(self, merged: Path, scale: float, name: str) -> Path:
        """θ₀ + scale · (merged − θ₀): ``merged`` itself at scale 1, else a new merge."""
        if scale == 1.0:
            return merged
        return self.merge(rescale_recipe(self.base, merged, scale), name)

    def score(self, folder: Path, evaluator: Any) -> dict[str, float]:
        """Every metric of one checkpoint folder under one evaluator."""
        from merge_kernels.candidates import Candidate

        score = evaluator.evaluate(Candidate(folder.name, 0, [], folder=folder))
        return {name: float(score.metrics[name]) for name in METRICS}

    def test_scores(self, folder: Path) -> dict[str, dict[str, float]]:
        """Scores on every task's test split."""
        return {task: self.score(folder, evaluator) for task, evaluator in self.test.items()}

    def discard(self, folder: Path) -> None:
        """Remove a merged checkpoint that is no longer needed."""
        if folder != self.base and folder not in self.kept:
            shutil.rmtree(folder, ignore_errors=True)


def rescale_recipe(base: Path, merged: Path, scale: float) -> dict[str, Any]:
    """Task arithmetic over one merged model: θ₀ + scale · (merged − θ₀).

    For a merge linear in its scale, θ₀ + α·M, this is the merge at scale α·(its scale),
    up to float32 rounding.
    """
    return {
        "merge_method": "task_arithmetic",
        "base_model": str(base),
        "models": [{"model": str(merged)}],
        "parameters": {"lambda": scale},
        "dtype": "float32",
    }


def better(a: dict[str, float], b: dict[str, float]) -> bool:
    """Higher exact match wins; equal exact match goes to the lower loss."""
    if a["exact_match"] != b["exact_match"]:
        return a["exact_match"] > b["exact_match"]
    return a["loss"] < b["loss"]


def choose(
    lab: Lab,
    name: str,
    grid: list[dict[str, float]],
    build: Callable[[dict[str, float], str], Path],
) -> dict[str, Any]:
    """Build a model for every setting of ``grid``; keep the best on the validation split.

    ``build(setting, folder_name)`` returns the model's folder, which is discarded after
    scoring.
    """
    trials = []
    best: dict[str, Any] | None = None
    for number, parameters in enumerate(grid):
        folder = build(parameters, f"validation-{name}-{number}")
        validation = lab.score(folder, lab.validation)
        lab.discard(folder)
        trial = {"parameters": parameters, "validation": validation}
        trials.append(trial)
        log(f"  {name} {parameters}: validation exact match {validation['exact_match']:.3f}")
        if best is None or better(validation, best["validation"]):
            best = trial
    assert best is not None
    return {"trials": trials, "chosen": best["parameters"]}
