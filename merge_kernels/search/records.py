"""What a search remembers: its evaluations, the state it saves, and its report."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from merge_kernels.candidates import finite_or_none, is_better
from merge_kernels.errors import RecipeError, TureenError
from merge_kernels.recipe import Recipe
from merge_kernels.search.space import SearchSpace, SearchSpec

STATE_VERSION = 1


class SearchStoppedError(TureenError):
    """The search was stopped (paused or cancelled) between evaluations; its state is saved
    up to the last finished evaluation, and running it again resumes there."""

    code = "search_stopped"


@dataclass
class Evaluation:
    """One scored point."""

    index: int
    point: dict[str, Any]
    unit: list[float]
    score: float
    metrics: dict[str, float | None]
    seconds: float
    in_memory: bool
    error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        row: dict[str, Any] = {
            "index": self.index,
            "point": self.point,
            "unit": self.unit,
            "score": finite_or_none(self.score),
            "metrics": self.metrics,
            "seconds": round(self.seconds, 4),
            "in_memory": self.in_memory,
        }
        if self.error is not None:
            row["error"] = self.error
        return row

    @classmethod
    def from_dict(cls, row: dict[str, Any]) -> Evaluation:
        score = row["score"]
        return cls(
            index=int(row["index"]),
            point=dict(row["point"]),
            unit=[float(u) for u in row["unit"]],
            score=math.nan if score is None else float(score),
            metrics=dict(row.get("metrics", {})),
            seconds=float(row.get("seconds", 0.0)),
            in_memory=bool(row.get("in_memory", True)),
            error=row.get("error"),
        )


@dataclass
class SearchState:
    """Everything a resumed search needs."""

    fingerprint: str
    strategy: dict[str, Any]
    evaluations: list[Evaluation] = field(default_factory=list)
    seconds: float = 0.0
    status: str = "running"
    report: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "version": STATE_VERSION,
            "fingerprint": self.fingerprint,
            "status": self.status,
            "seconds": self.seconds,
            "strategy": self.strategy,
            "evaluations": [e.to_dict() for e in self.evaluations],
            "report": self.report,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any], fingerprint: str) -> SearchState:
        """The saved state of the search whose spec hashes to ``fingerprint``.

        Raises:
            RecipeError: (field ``state``) another search's state, or not a state.
        """
        if data.get("version") != STATE_VERSION:
            raise RecipeError("state", f"not a search state of version {STATE_VERSION}")
        if data.get("fingerprint") != fingerprint:
            raise RecipeError(
                "state",
                "the saved state belongs to another search (the spec changed); give a new "
                "state file, or run the spec it was saved for",
            )
        try:
            return cls(
                fingerprint=fingerprint,
                strategy=dict(data["strategy"]),
                evaluations=[Evaluation.from_dict(row) for row in data["evaluations"]],
                seconds=float(data["seconds"]),
                status=str(data["status"]),
                report=data.get("report"),
            )
        except (KeyError, TypeError, ValueError) as error:
            raise RecipeError("state", f"the saved search state is damaged ({error})") from None


def best_evaluation(evaluations: list[Evaluation], higher_is_better: bool) -> Evaluation | None:
    """The first evaluation with the best score (None if none has a score)."""
    best: Evaluation | None = None
    for evaluation in evaluations:
        current = math.nan if best is None else best.score
        if is_better(
            evaluation.score, current, higher_is_better=higher_is_better, allow_equal=False
        ):
            best = evaluation
    return best


@dataclass
class SearchReport:
    """A finished search: the report (also ``report.json``), the winner and its output."""

    data: dict[str, Any]
    best_recipe: Recipe
    out_dir: Path


def report_data(
    spec: SearchSpec,
    space: SearchSpace,
    state: SearchState,
    best: Evaluation,
    *,
    evaluator: str,
    higher_is_better: bool,
    stopped_by: str,
    best_recipe: Recipe,
) -> dict[str, Any]:
    """The search as JSON-able data (the written output's scores are added after)."""
    return {
        "strategy": spec.strategy.model_dump(mode="json", exclude_none=True),
        "seed": spec.seed,
        "budget": spec.budget.model_dump(mode="json", exclude_none=True),
        "evaluator": evaluator,
        "higher_is_better": higher_is_better,
        "dimensions": [
            {"name": d.name, **d.spec.model_dump(mode="json", exclude_none=True)}
            for d in space.dimensions
        ],
        "evaluations": [e.to_dict() for e in state.evaluations],
        "stopped_by": stopped_by,
        "seconds": round(state.seconds, 3),
        "best": {
            "index": best.index,
            "point": best.point,
            "score": finite_or_none(best.score),
            "metrics": best.metrics,
        },
        "best_recipe": best_recipe.to_yaml(),
    }
