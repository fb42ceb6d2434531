"""A TIES search over lambda and density on tiny Llamas with the held-out evaluator."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from merge_kernels.candidates import Candidate, Evaluator, Score
from merge_kernels.recipe import load_recipe
from merge_kernels.runner import run_merge
from merge_kernels.search import (
    JsonFileStateStore,
    MemoryStateStore,
    SearchReport,
    SearchStoppedError,
    parse_search_spec,
    run_search,
)
from service.evaluation.config import build_evaluator
from tests.merge_kernels.search.conftest import TiesWorld

BUDGET = 9


class Counting:
    """An evaluator that counts its calls and can crash (a killed process) at one of them."""

    def __init__(self, inner: Evaluator, crash_at: int | None = None) -> None:
        self.inner = inner
        self.name = inner.name
        self.higher_is_better = inner.higher_is_better
        self.calls = 0
        self.crash_at = crash_at

    def evaluate(self, candidate: Candidate) -> Score:
        self.calls += 1
        if self.crash_at is not None and self.calls == self.crash_at:
            raise KeyboardInterrupt  # as a kill: nothing after the last saved state survives
        return self.inner.evaluate(candidate)


def search(
    world: TiesWorld, out: Path, strategy: Any, budget: int = BUDGET, **kwargs: Any
) -> SearchReport:
    spec = parse_search_spec(world.spec(strategy, budget, **kwargs.pop("spec", {})))
    evaluators = kwargs.pop("evaluators", None) or (lambda section: build_evaluator(section))
    return run_search(spec, out, evaluators=evaluators, **kwargs)


@pytest.fixture(scope="module")
def runs(ties_world: TiesWorld, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("runs")
    return {
        name: search(ties_world, root / name, name, state_store=MemoryStateStore())
        for name in ("grid", "cmaes")
    }


def scores(report: SearchReport) -> list[float]:
    return [row["score"] for row in report.data["evaluations"]]


def test_cmaes_finds_a_recipe_at_least_as_good_as_the_grid_with_the_same_budget(
    runs: dict[str, SearchReport],
) -> None:
    # The grid is the sweep one would run by hand with 9 evaluations: 3 × 3 levels, both ends
    # of each range and its middle (lambda 0.25, 1.125, 2.0; density 0.1, 0.55, 1.0), which
    # holds lambda near its best value; CMA-ES starts at the same middle with the same budget.
    grid, cmaes = runs["grid"].data, runs["cmaes"].data
    assert len(grid["evaluations"]) == len(cmaes["evaluations"]) == BUDGET
    assert {row["point"]["parameters.lambda"] for row in grid["evaluations"]} == {0.25, 1.125, 2.0}
    assert {row["point"]["density"] for row in grid["evaluations"]} == {0.1, 0.55, 1.0}
    assert grid["higher_is_better"] is False  # held-out loss
    assert cmaes["best"]["score"] <= grid["best"]["score"]
    assert cmaes["best"]["score"] == min(scores(runs["cmaes"]))
    # Every candidate was merged in memory (tiny models) and the scratch folder is gone.
    assert all(row["in_memory"] for row in cmaes["evaluations"])


def test_the_output_is_the_winner_with_the_reports_and_the_written_score_matches(
    runs: dict[str, SearchReport], ties_world: TiesWorld, tmp_path: Path
) -> None:
    report = runs["cmaes"]
    out = report.out_dir
    for name in ("model.safetensors", "README.md", "report.json", "scores.svg", "best_recipe.yaml"):
        assert (out / name).is_file(), name
    data = json.loads((out / "report.json").read_text())
    assert data == report.data
    best = data["best"]
    assert data["written_validation_score"] == pytest.approx(best["score"], rel=1e-9, abs=0)
    assert data["test"]["score"] is not None  # the winner, once, on the test split
    card = (out / "README.md").read_text()
    assert "Found by a cmaes search over density, parameters.lambda (9 evaluations)" in card
    evaluation = json.loads((out / "evaluation.json").read_text())
    assert evaluation["search"]["best_point"] == best["point"]
    svg = (out / "scores.svg").read_text()
    assert svg.startswith("<svg") and svg.count("<circle") == BUDGET

    # The best recipe is a plain recipe: merged again by the runner it scores the same.
    recipe = load_recipe(out / "best_recipe.yaml")
    assert recipe.merge_method == "ties"
    assert recipe.parameters is not None
    document = yaml.safe_load((out / "best_recipe.yaml").read_text())
    assert document["parameters"]["lambda"] == best["point"]["parameters.lambda"]
    assert {m["parameters"]["density"] for m in document["models"]} == {best["point"]["density"]}
    again = run_merge(recipe, tmp_path / "again")
    evaluator = build_evaluator({"type": "held_out", "data": str(ties_world.validation)})
    score = evaluator.evaluate(Candidate("again", 0, [], folder=again.out_dir))
    assert score.value == best["score"]


@pytest.mark.parametrize("how", ["pause", "kill"])
def test_a_stopped_search_resumes_to_the_uninterrupted_result(
    runs: dict[str, SearchReport], ties_world: TiesWorld, tmp_path: Path, how: str
) -> None:
    store = JsonFileStateStore(tmp_path / "state.json")
    out = tmp_path / "out"
    first = Counting(build_evaluator({"type": "held_out", "data": str(ties_world.validation)}))
    stop_after = 4
    if how == "pause":
        with pytest.raises(SearchStoppedError):
            search(
                ties_world,
                out,
                "cmaes",
                state_store=store,
                evaluators=lambda section: first,
                should_stop=lambda: first.calls >= stop_after,
            )
    else:
        first.crash_at = stop_after + 1
        with pytest.raises(KeyboardInterrupt):
            search(ties_world, out, "cmaes", state_store=store, evaluators=lambda s: first)
    assert not out.exists()
    saved = json.loads(store.path.read_text())
    assert len(saved["evaluations"]) == stop_after and saved["status"] == "running"

    calls: list[Counting] = []

    def evaluators(section: Any) -> Counting:
        calls.append(Counting(build_evaluator(section)))
        return calls[-1]

    resumed = search(ties_world, out, "cmaes", state_store=store, evaluators=evaluators)
    uninterrupted = runs["cmaes"].data
    assert resumed.data["evaluations"] == [
        {**row, "seconds": resumed.data["evaluations"][i]["seconds"]}
        for i, row in enumerate(uninterrupted["evaluations"])
    ]
    assert resumed.data["best"] == uninterrupted["best"]
    # No point scored twice: the remaining points, then the written winner (validation).
    assert calls[0].calls == BUDGET - stop_after + 1
    assert json.loads(store.path.read_text())["status"] == "finished"


def test_candidates_too_large_for_memory_go_through_the_disk_one_at_a_time(
    ties_world: TiesWorld, tmp_path: Path, runs: dict[str, SearchReport]
) -> None:
    seen: list[Path] = []

    class Watching(Counting):
        def evaluate(self, candidate: Candidate) -> Score:
            folder = candidate.written_folder
            assert folder is not None  # on disk: the evaluator gets a folder
            seen.append(folder)
            scratch = folder.parent
            if scratch.name.endswith(".tureen-search"):
                assert [p.name for p in scratch.iterdir()] == ["candidate"]
            return super().evaluate(candidate)

    watcher = Watching(build_evaluator({"type": "held_out", "data": str(ties_world.validation)}))
    report = search(
        ties_world,
        tmp_path / "out",
        "grid",
        budget=4,
        spec={"memory_limit_bytes": 0},
        evaluators=lambda section: watcher,
    )
    rows = report.data["evaluations"]
    assert [row["in_memory"] for row in rows] == [False] * 4
    # Grid of 2 × 2 = the corners; the same points in memory (the 3 × 3 grid) scored the same.
    in_memory = {json.dumps(r["point"], sort_keys=True): r["score"] for r in scores_rows(runs)}
    for row in rows:
        assert row["score"] == in_memory[json.dumps(row["point"], sort_keys=True)]
    assert not (tmp_path / ".out.tureen-search").exists()


def scores_rows(runs: dict[str, SearchReport]) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = runs["grid"].data["evaluations"]
    return rows
