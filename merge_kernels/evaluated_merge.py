"""Merges that are scored: the greedy soup, and any merge compared against its inputs.

* ``greedy_soup``: the search (:mod:`merge_kernels.greedy_search`) picks the ingredients;
  the engine then writes their uniform average (atomic, model card), and the written soup
  is scored once more, so the reported final score is that of the bytes on disk.
* Any other method with an ``evaluator`` in its recipe: the engine writes the merge, then the
  merge and each of its inputs are scored. A merge is only worth shipping if it beats its
  parts; the report says whether it does.

The report goes into the model card, into ``evaluation.json`` next to the weights, and to
the caller.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from merge_kernels.candidates import Candidate, Evaluator, Score, finite_or_none
from merge_kernels.errors import RecipeError
from merge_kernels.greedy_search import (
    DEFAULT_MEMORY_LIMIT_BYTES,
    ScoreAsync,
    as_output,
    read_model,
    reference_document,
    search_greedy_soup,
    soup_recipe,
    working_set_bytes,
)
from merge_kernels.model_card import CardExtras
from merge_kernels.plan import MergePlan
from merge_kernels.recipe import Recipe, parse_recipe
from merge_kernels.runner import (
    CancelCheck,
    MergeOptions,
    MergeResult,
    Progress,
    ProgressCallback,
    close_inputs,
    plan_merge,
    run_merge,
)
from merge_kernels.tensor_parameters import resolve_parameters

SCRATCH_SUFFIX = ".tureen-candidates"


@dataclass
class EvaluatedMerge:
    """A finished scored merge: what the engine wrote, and the evaluation report."""

    result: MergeResult
    report: dict[str, Any]


def scratch_folder(out_dir: Path) -> Path:
    """Where candidates written to disk live while the merge runs (removed at the end)."""
    out_dir = Path(out_dir)
    return out_dir.parent / f".{out_dir.name}{SCRATCH_SUFFIX}"


def run_evaluated_merge(
    recipe: Recipe,
    out_dir: Path,
    evaluator: Evaluator,
    options: MergeOptions | None = None,
    *,
    progress: ProgressCallback | None = None,
    should_cancel: CancelCheck | None = None,
    memory_limit_bytes: int = DEFAULT_MEMORY_LIMIT_BYTES,
) -> EvaluatedMerge:
    """Run a greedy soup, or a merge scored against its inputs.

    Args:
        recipe: a greedy soup recipe, or any recipe (its ``evaluator`` says how to score).
        out_dir: the output folder; it appears only once complete.
        evaluator: scores candidates.
        options: engine options.
        progress: called with the engine's progress, and with phase ``evaluating`` (and the
            step in ``current``) during the search.
        should_cancel: polled between steps and pieces of work.
        memory_limit_bytes: keep candidates in memory when the working set fits.

    Returns:
        The engine's result and the evaluation report.

    Raises:
        RecipeError, IncompatibleCheckpointsError, MergeCancelledError, and whatever the
        evaluator raises; nothing is left at ``out_dir`` then.
    """
    options = options or MergeOptions()
    out_dir = Path(out_dir).absolute()  # the scratch folder is referenced from recipes
    scratch = scratch_folder(out_dir)
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir(parents=True)
    inner = replace(options, allowed_roots=_with_root(options.allowed_roots, scratch))
    try:
        if recipe.method.needs_evaluation:
            return _greedy_soup(
                recipe,
                Path(out_dir),
                evaluator,
                inner,
                scratch,
                progress,
                should_cancel,
                memory_limit_bytes,
            )
        return _scored_merge(
            recipe,
            Path(out_dir),
            evaluator,
            inner,
            scratch,
            progress,
            should_cancel,
            memory_limit_bytes,
        )
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _with_root(roots: tuple[Path, ...] | None, extra: Path) -> tuple[Path, ...] | None:
    return None if roots is None else (*roots, extra)


def _stepper(progress: ProgressCallback | None) -> Callable[[str], None]:
    def on_step(text: str) -> None:
        if progress is not None:
            progress(Progress(0, 0, 0, 0, text, "evaluating"))

    return on_step


def _greedy_soup(
    recipe: Recipe,
    out_dir: Path,
    evaluator: Evaluator,
    options: MergeOptions,
    scratch: Path,
    progress: ProgressCallback | None,
    should_cancel: CancelCheck | None,
    memory_limit_bytes: int,
) -> EvaluatedMerge:
    params = resolve_parameters(recipe, "", 0.0).method
    keep_rule = str(getattr(params, "keep_rule", ">"))
    max_ingredients = getattr(params, "max_ingredients", None)

    def run_linear(linear: Recipe, folder: Path) -> None:
        run_merge(linear, folder, options, should_cancel=should_cancel)

    plan, inputs = plan_merge(recipe, options)
    try:
        plan.raise_for_problems()
        search = search_greedy_soup(
            plan,
            evaluator,
            keep_rule=keep_rule,
            max_ingredients=max_ingredients,
            scratch=scratch,
            memory_limit_bytes=memory_limit_bytes,
            on_step=_stepper(progress),
            should_cancel=should_cancel,
            run_linear=run_linear,
            score_async=_ray_scorer(evaluator, options),
        )
    finally:
        close_inputs(inputs)
    report = search.report(evaluator, keep_rule)
    report["method"] = "greedy_soup"
    report["final_merge_bytes_read"] = search.model_bytes * len(search.kept)

    def evaluate_output(folder: Path) -> dict[str, Any]:
        _stepper(progress)("scoring the written soup")
        score = evaluator.evaluate(
            Candidate("final soup", report["evaluations"], report["kept"], folder=folder)
        )
        report["final_score"] = score.to_dict()["score"]
        report["final_metrics"] = score.to_dict()["metrics"]
        report["evaluations"] += 1
        best = report["best_single"]
        report["summary"] = [
            *({"model": row["reference"], "score": row["score"]} for row in report["ingredients"]),
            {"model": f"greedy soup ({len(search.kept)} kept)", "score": report["final_score"]},
        ]
        report["beats_best_single"] = _beats(score.value, best["score"], evaluator.higher_is_better)
        return report

    final = soup_recipe(recipe, search.kept)
    result = run_merge(
        final,
        out_dir,
        options,
        progress=progress,
        should_cancel=should_cancel,
        card=CardExtras(recipe=recipe, evaluate=evaluate_output),
    )
    return EvaluatedMerge(result, report)


def _ray_scorer(evaluator: Evaluator, options: MergeOptions) -> ScoreAsync | None:
    """Under the Ray executor, a soup's candidates are scored as Ray tasks (with the
    evaluator's resources, a GPU when it runs on CUDA) while the next one is merged."""
    from merge_kernels.executors.ray_cluster import RayExecutor  # imports no ray itself

    chosen = options.executor
    if isinstance(chosen, RayExecutor):
        address = chosen.address
    elif chosen == "ray":
        address = options.ray_address
    else:
        return None
    from merge_kernels.executors.ray_soup import RayScorer

    return RayScorer(evaluator, address=address)


def _beats(score: float, other: float | None, higher_is_better: bool) -> bool | None:
    if other is None or score != score:
        return None
    return score >= other if higher_is_better else score <= other


def _scored_merge(
    recipe: Recipe,
    out_dir: Path,
    evaluator: Evaluator,
    options: MergeOptions,
    scratch: Path,
    progress: ProgressCallback | None,
    should_cancel: CancelCheck | None,
    memory_limit_bytes: int,
) -> EvaluatedMerge:
    on_step = _stepper(progress)
    inputs_recipe = _inputs_recipe(recipe)

    def evaluate(folder: Path) -> dict[str, Any]:
        on_step("scoring the merge")
        merged = evaluator.evaluate(Candidate("merge", 0, [], folder=folder))
        rows: list[dict[str, Any]] = []
        plan, inputs = plan_merge(inputs_recipe, options)
        try:
            in_memory = working_set_bytes(plan) <= memory_limit_bytes
            for position, item in enumerate(plan.inputs):
                name = item.checkpoint.display_name
                on_step(f"scoring input {position + 1}/{len(plan.inputs)}: {name}")
                candidate = _input_candidate(
                    plan, position, name, in_memory, scratch, options, should_cancel
                )
                score: Score = evaluator.evaluate(candidate)
                role = "base" if _is_base(recipe, name) else "model"
                rows.append({"reference": name, "role": role, **score.to_dict()})
        finally:
            close_inputs(inputs)
        finite = [r for r in rows if r["score"] is not None]
        pick = max if evaluator.higher_is_better else min
        best = pick(finite, key=lambda r: r["score"]) if finite else None
        return {
            "method": recipe.merge_method,
            "evaluator": evaluator.name,
            "higher_is_better": evaluator.higher_is_better,
            "merge": merged.to_dict(),
            "inputs": rows,
            "best_input": best,
            "beats_best_input": _beats(
                merged.value, best["score"] if best else None, evaluator.higher_is_better
            ),
            "summary": [
                *({"model": r["reference"], "score": r["score"]} for r in rows),
                {"model": f"{recipe.merge_method} merge", "score": finite_or_none(merged.value)},
            ],
            "evaluations": 1 + len(rows),
        }

    reports: list[dict[str, Any]] = []

    def evaluate_and_keep(folder: Path) -> dict[str, Any]:
        reports.append(evaluate(folder))
        return reports[-1]

    result = run_merge(
        recipe,
        out_dir,
        options,
        progress=progress,
        should_cancel=should_cancel,
        card=CardExtras(evaluate=evaluate_and_keep),
    )
    return EvaluatedMerge(result, reports[-1])


def _is_base(recipe: Recipe, name: str) -> bool:
    return recipe.base_model is not None and str(recipe.base_model) == name


def _inputs_recipe(recipe: Recipe) -> Recipe:
    """A linear recipe over every input of ``recipe`` (base first), to read them alike."""
    references = []
    if recipe.base_model is not None:
        references.append(recipe.base_model)
    references += [
        entry.model for entry in recipe.models or [] if str(entry.model) != str(recipe.base_model)
    ]
    document: dict[str, Any] = {
        "merge_method": "linear",
        "models": [{"model": reference_document(ref)} for ref in references],
    }
    for key in ("dtype", "out_dtype"):
        value = getattr(recipe, key)
        if value is not None:
            document[key] = value
    if len(references) < 1:
        raise RecipeError("models", "list at least one model to merge")
    return parse_recipe(document)


def _input_candidate(
    plan: MergePlan,
    position: int,
    name: str,
    in_memory: bool,
    scratch: Path,
    options: MergeOptions,
    should_cancel: CancelCheck | None,
) -> Candidate:
    companion = plan.inputs[position].checkpoint
    if in_memory:
        tensors, _ = read_model(plan, position)
        return Candidate(
            f"input {position}",
            position,
            [name],
            tensors=as_output(plan, tensors),
            companion=companion,
            scratch=scratch,
        )
    folder = scratch / f"input-{position:04d}"
    reference = reference_document(plan.recipe.merged_models()[position][1].model)
    single = parse_recipe(
        {"merge_method": "linear", "models": [{"model": reference}], **_dtypes(plan.recipe)}
    )
    run_merge(single, folder, options, should_cancel=should_cancel)
    return Candidate(f"input {position}", position, [name], folder=folder)


def _dtypes(recipe: Recipe) -> dict[str, str]:
    return {k: v for k in ("dtype", "out_dtype") if (v := getattr(recipe, k)) is not None}
