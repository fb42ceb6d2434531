"""The search loop: propose, merge, score on validation, remember; then write the winner.

For each point the strategy proposes (until the budget of evaluations or seconds is spent,
or a grid is exhausted): the recipe at that point is merged, in memory when its working set
fits (the greedy soup's rule, :func:`~merge_kernels.greedy_search.working_set_bytes`), else
by the engine into one scratch folder that is removed once scored, so at most one candidate
is ever on disk; it is scored on the validation split, and the search's state is saved.
Stopping between evaluations (``should_stop``) keeps that state, and running the same spec
again with the same state resumes without scoring any point again.

The winner (the best validation score, the first of equal ones) is then merged by the
engine into the output folder like any merge, scored on validation again (the written
bytes' score, which equals the search's) and, once, on the test split; the output holds the
model card with the search's summary, ``evaluation.json``, ``report.json`` (every point
and score), ``scores.svg`` and ``best_recipe.yaml``, a plain recipe any merge accepts.

This is the loop of the TIES paper's validation sweep over lambda and of mergekit-evolve's
CMA-ES over weights and densities, with the evaluators of the greedy soup.
"""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from merge_kernels.candidates import Candidate, Evaluator, Score, finite_or_none
from merge_kernels.errors import EvaluationError, MergeCancelledError, NonFiniteOutputError
from merge_kernels.io.staging import write_bytes_atomic, write_json_atomic
from merge_kernels.model_card import CardExtras
from merge_kernels.recipe import Recipe
from merge_kernels.runner import MergeOptions, close_inputs, plan_merge, run_merge
from merge_kernels.search.in_memory import fits_in_memory, merge_in_memory
from merge_kernels.search.plot import scores_svg
from merge_kernels.search.records import (
    Evaluation,
    SearchReport,
    SearchState,
    SearchStoppedError,
    best_evaluation,
    report_data,
)
from merge_kernels.search.space import SearchSpace, SearchSpec, Value, search_space
from merge_kernels.search.state import MemoryStateStore, SearchStateStore
from merge_kernels.search.strategies import build_strategy, restore_strategy

log = logging.getLogger(__name__)

EvaluatorFactory = Callable[[Mapping[str, Any]], Evaluator]
SCRATCH_SUFFIX = ".tureen-search"
REPORT_FILE = "report.json"
PLOT_FILE = "scores.svg"
BEST_RECIPE_FILE = "best_recipe.yaml"


@dataclass(frozen=True)
class SearchProgress:
    """How far a search has come.

    Attributes:
        done: evaluations finished (resumed ones included).
        budget: the evaluations budget.
        phase: ``resumed``, ``evaluated``, ``writing`` (the winner) or ``done``.
        point: the point just scored (``evaluated``), else the best one.
        score: its score (None: failed or not scored yet).
        best: the best score so far.
        in_memory: whether the candidate was merged in memory.
    """

    done: int
    budget: int
    phase: str
    point: Mapping[str, Value] | None = None
    score: float | None = None
    best: float | None = None
    in_memory: bool | None = None


ProgressCallback = Callable[[SearchProgress], None]


def scratch_folder(out_dir: Path) -> Path:
    """Where a candidate merged on disk lives while it is scored."""
    out_dir = Path(out_dir)
    return out_dir.parent / f".{out_dir.name}{SCRATCH_SUFFIX}"


class _Loop:
    def __init__(
        self,
        spec: SearchSpec,
        space: SearchSpace,
        evaluator: Evaluator,
        options: MergeOptions,
        scratch: Path,
        should_stop: Callable[[], bool] | None,
    ) -> None:
        self.spec = spec
        self.space = space
        self.evaluator = evaluator
        self.options = options
        self.scratch = scratch
        self.should_stop = should_stop

    def stopping(self) -> bool:
        return self.should_stop is not None and self.should_stop()

    def check_stop(self) -> None:
        if self.stopping():
            raise SearchStoppedError(
                "the search was stopped; its state is saved up to the last finished "
                "evaluation: run the same search again with the same state to resume"
            )

    def score(self, recipe: Recipe, index: int) -> tuple[Score, bool]:
        """Merge ``recipe`` (in memory when it fits) and score it on validation."""
        label = f"candidate {index}"
        plan, inputs = plan_merge(recipe, self.options)
        try:
            plan.raise_for_problems()
            in_memory = fits_in_memory(plan, self.spec.memory_limit_bytes)
            if in_memory:
                tensors = merge_in_memory(plan, self.options.device, self.check_stop)
                candidate = Candidate(
                    label,
                    index,
                    [],
                    tensors=tensors,
                    companion=plan.inputs[0].checkpoint,
                    scratch=self.scratch,
                )
                try:
                    return self.evaluator.evaluate(candidate), True
                finally:
                    self.discard(candidate.written_folder)
        finally:
            close_inputs(inputs)
        folder = self.scratch / "candidate"
        self.discard(folder)
        try:
            try:
                run_merge(
                    recipe,
                    folder,
                    replace(self.options, overwrite=True),
                    should_cancel=self.stopping,
                )
            except MergeCancelledError:
                self.check_stop()  # stopped midway: say so as a stopped search
                raise
            return self.evaluator.evaluate(Candidate(label, index, [], folder=folder)), False
        finally:
            self.discard(folder)

    def discard(self, folder: Path | None) -> None:
        """Remove a candidate folder (never anything outside the scratch folder)."""
        if folder is not None and folder.resolve().is_relative_to(self.scratch.resolve()):
            shutil.rmtree(folder, ignore_errors=True)


def run_search(
    spec: SearchSpec,
    out_dir: Path,
    *,
    evaluators: EvaluatorFactory,
    state_store: SearchStateStore | None = None,
    options: MergeOptions | None = None,
    on_progress: ProgressCallback | None = None,
    should_stop: Callable[[], bool] | None = None,
    clock: Callable[[], float] = time.monotonic,
) -> SearchReport:
    """Run (or resume) a search and write its winner into ``out_dir``.

    Args:
        spec: the search.
        out_dir: the winner's output folder; it appears only once complete.
        evaluators: builds an evaluator from an evaluator section (the spec's validation
            one, then the test one); the caller decides the data roots and hosts allowed.
        state_store: where the state is saved after every evaluation and loaded from at
            the start (None: kept in memory only).
        options: engine options; ``base_dir`` is the folder relative paths in the spec's
            recipe are relative to.
        on_progress: called after every evaluation and at each phase.
        should_stop: polled before each evaluation and while a candidate is merged; True
            stops the search (:class:`SearchStoppedError`) with its state saved.
        clock: seconds, for the time budget.

    Returns:
        The report, the best recipe and the output folder.

    Raises:
        RecipeError: an invalid spec or a state saved for another spec.
        SearchStoppedError: ``should_stop`` said so; nothing is written at ``out_dir``.
        EvaluationError: no candidate got a score; and whatever the evaluator raises.
    """
    options = options or MergeOptions()
    store = state_store if state_store is not None else MemoryStateStore()
    space = search_space(spec, options.base_dir)
    evaluator = evaluators(spec.evaluator)
    budget = spec.budget.evaluations
    common: dict[str, Any] = {
        "seed": spec.seed,
        "budget": budget,
        "higher_is_better": evaluator.higher_is_better,
    }
    fingerprint = spec.fingerprint()
    saved = store.load()
    if saved is not None:
        state = SearchState.from_dict(saved, fingerprint)
        if state.status == "finished" and state.report is not None and Path(out_dir).is_dir():
            return SearchReport(state.report, _best_recipe(space, state.report), Path(out_dir))
        strategy = restore_strategy(spec.strategy, space, state.strategy, **common)
        _announce(on_progress, SearchProgress(len(state.evaluations), budget, "resumed"))
    else:
        strategy = build_strategy(spec.strategy, space, **common)
        state = SearchState(fingerprint, strategy.state())
    scratch = scratch_folder(Path(out_dir).absolute())
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir(parents=True)
    loop = _Loop(spec, space, evaluator, options, scratch, should_stop)
    try:
        stopped_by = _evaluate_points(loop, state, strategy, store, on_progress, clock)
        best = best_evaluation(state.evaluations, evaluator.higher_is_better)
        if best is None:
            raise EvaluationError(
                f"none of the {len(state.evaluations)} candidates got a score; see report "
                "errors in the state"
            )
        best_recipe = space.instantiate(best.point)
        data = report_data(
            spec,
            space,
            state,
            best,
            evaluator=evaluator.name,
            higher_is_better=evaluator.higher_is_better,
            stopped_by=stopped_by,
            best_recipe=best_recipe,
        )
        _announce(
            on_progress,
            SearchProgress(len(state.evaluations), budget, "writing", best.point, best.score),
        )
        loop.check_stop()
        result = _write_winner(spec, best_recipe, data, Path(out_dir), evaluator, evaluators, loop)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    state.status, state.report = "finished", data
    store.save(state.to_dict())
    _announce(on_progress, SearchProgress(len(state.evaluations), budget, "done", best.point))
    return SearchReport(data, best_recipe, result)


def _evaluate_points(
    loop: _Loop,
    state: SearchState,
    strategy: Any,
    store: SearchStateStore,
    on_progress: ProgressCallback | None,
    clock: Callable[[], float],
) -> str:
    """Score points until the budget is spent; returns what ended the search."""
    budget = loop.spec.budget
    higher = loop.evaluator.higher_is_better
    while True:
        if len(state.evaluations) >= budget.evaluations:
            return "evaluations"
        if budget.seconds is not None and state.seconds >= budget.seconds:
            return "seconds"
        loop.check_stop()
        unit = strategy.ask()
        if unit is None:
            return "exhausted"
        started = clock()
        index = len(state.evaluations)
        point = loop.space.decode(unit)
        recipe = loop.space.instantiate(point)
        error = None
        try:
            score, in_memory = loop.score(recipe, index)
        except NonFiniteOutputError as failure:  # a point that blows up is a bad point
            score, in_memory, error = Score(float("nan")), True, failure.message
        seconds = clock() - started
        strategy.tell(unit, score.value)
        metrics = {name: finite_or_none(v) for name, v in score.metrics.items()}
        state.evaluations.append(
            Evaluation(index, dict(point), unit, score.value, metrics, seconds, in_memory, error)
        )
        state.seconds += seconds
        state.strategy = strategy.state()
        store.save(state.to_dict())
        best = best_evaluation(state.evaluations, higher)
        log.info("search: candidate %d scored %s", index, score.value)
        _announce(
            on_progress,
            SearchProgress(
                len(state.evaluations),
                budget.evaluations,
                "evaluated",
                point,
                finite_or_none(score.value),
                None if best is None else best.score,
                in_memory,
            ),
        )


def _write_winner(
    spec: SearchSpec,
    best_recipe: Recipe,
    data: dict[str, Any],
    out_dir: Path,
    evaluator: Evaluator,
    evaluators: EvaluatorFactory,
    loop: _Loop,
) -> Path:
    """Merge the winner into ``out_dir`` with the search's files and model card."""

    def finish(folder: Path) -> dict[str, Any]:
        index = len(data["evaluations"])
        written = evaluator.evaluate(Candidate("best (written)", index, [], folder=folder))
        data["written_validation_score"] = finite_or_none(written.value)
        data["written_validation_metrics"] = written.to_dict()["metrics"]
        test_section = spec.test_evaluator()
        data["test"] = None
        if test_section is not None:
            tested = evaluators(test_section).evaluate(
                Candidate("best (test)", index + 1, [], folder=folder)
            )
            data["test"] = tested.to_dict()
        write_json_atomic(folder / REPORT_FILE, data)
        title = f"{spec.strategy.name} search: {data['evaluator']}"
        scores = [row["score"] for row in data["evaluations"]]
        svg = scores_svg(scores, higher_is_better=evaluator.higher_is_better, title=title)
        write_bytes_atomic(folder / PLOT_FILE, svg.encode())
        write_bytes_atomic(folder / BEST_RECIPE_FILE, best_recipe.to_yaml().encode())
        return _card_summary(data)

    try:
        result = run_merge(
            best_recipe,
            out_dir,
            loop.options,
            should_cancel=loop.stopping,
            card=CardExtras(evaluate=finish),
        )
    except MergeCancelledError:
        loop.check_stop()  # stopped while the winner was written: resumable as any stop
        raise
    return result.out_dir


def _card_summary(data: dict[str, Any]) -> dict[str, Any]:
    """The model card's and ``evaluation.json``'s part of the report (no point list)."""
    summary = [
        {"model": "best candidate (validation, in the search)", "score": data["best"]["score"]},
        {"model": "this merge (validation)", "score": data["written_validation_score"]},
    ]
    if data["test"] is not None:
        summary.append({"model": "this merge (test)", "score": data["test"]["score"]})
    scored = [row for row in data["evaluations"] if row["score"] is not None]
    return {
        "method": "search",
        "evaluator": data["evaluator"],
        "higher_is_better": data["higher_is_better"],
        "search": {
            "strategy": data["strategy"]["name"],
            "seed": data["seed"],
            "evaluations": len(data["evaluations"]),
            "scored": len(scored),
            "stopped_by": data["stopped_by"],
            "dimensions": [d["name"] for d in data["dimensions"]],
            "best_point": data["best"]["point"],
            "best_index": data["best"]["index"],
        },
        "summary": summary,
        "test": data["test"],
        "files": [REPORT_FILE, PLOT_FILE, BEST_RECIPE_FILE],
    }


def _best_recipe(space: SearchSpace, report: Mapping[str, Any]) -> Recipe:
    return space.instantiate(report["best"]["point"])


def _announce(callback: ProgressCallback | None, progress: SearchProgress) -> None:
    if callback is not None:
        callback(progress)
