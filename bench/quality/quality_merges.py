"""One seed set of the experiment, and the soups of the soup task's runs.

A seed set trains one adapter per task with one training seed, chooses every multi-task
method's hyper-parameter on the validation split (``quality_methods``) and scores it at its
chosen setting on the test splits, then scores the uniform soup of the four and each adapter
alone. The soups (Wortsman et al., "Model soups", ICML 2022) run once, after every seed set,
over seed set 0's adapter of the soup task and its extra runs.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from time import perf_counter
from typing import Any

from quality_lab import Lab, choose, log
from quality_methods import MethodRow, Settings, method_rows
from quality_training import Run, soup_runs, task_runs, train


def _slug(text: str) -> str:
    return text.lower().replace(" ", "-")


def train_all(
    lab: Lab, planned: list[Run], settings: Settings, folder: Path
) -> tuple[dict[str, Any], dict[str, str]]:
    """Train ``planned``; returns the training records and the ``BASE+ADAPTER`` references."""
    training: dict[str, Any] = {}
    adapters: dict[str, str] = {}
    for run in planned:
        log(f"training {run.label} (seed {run.seed}, lr {run.learning_rate:g})")
        out = folder / _slug(run.label)
        training[run.label] = train(run, lab.base, lab.work / "data", out, settings, lab.device)
        adapters[run.label] = f"{lab.base}+{out}"
        after = training[run.label]["validation_after"]
        log(f"  {training[run.label]['seconds']:.0f} s, validation loss {after['loss']:.3f}")
    return training, adapters


def seed_set(
    lab: Lab,
    settings: Settings,
    seed: int,
    timings: dict[str, float],
    record: dict[str, Any],
    publish: Callable[[], None],
) -> None:
    """Train, choose and score one seed set into ``record``, publishing after every row.

    Each method is chosen on validation and scored on test before the next one starts, in
    ``method_rows`` order, so a run stopped early keeps every row it finished.
    """
    clock = perf_counter()

    def phase(name: str) -> None:
        nonlocal clock
        now = perf_counter()
        timings[f"seed set {seed}: {name}"] = round(now - clock, 1)
        clock = now

    training, adapters = train_all(
        lab, task_runs(settings, seed), settings, lab.work / "adapters" / f"seed-{seed}"
    )
    selection: dict[str, dict[str, Any]] = {}
    rows: dict[str, dict[str, Any]] = {}
    record.update(
        {"seed": seed, "training": training, "adapters": adapters, "selection": selection}
    )
    record["rows"] = rows
    phase("training")
    models = [{"model": reference} for reference in adapters.values()]

    def document(row: MethodRow, parameters: dict[str, Any]) -> dict[str, Any]:
        recipe: dict[str, Any] = {
            "merge_method": row.method,
            "base_model": str(lab.base),
            "models": models,
            "parameters": {**dict(row.fixed), **parameters},
            "dtype": "float32",
        }
        if row.seeded:
            recipe["seed"] = seed
        return recipe

    def score(name: str, kind: str, folder: Path, parameters: dict[str, Any]) -> None:
        scores = lab.test_scores(folder)
        lab.discard(folder)
        rows[name] = {"seed": seed, "kind": kind, "parameters": parameters, "scores": scores}
        log(f"  {name}: " + ", ".join(f"{t} {s['exact_match']:.3f}" for t, s in scores.items()))
        phase(name)
        publish()

    for row in method_rows(settings):
        grid = row.grid(selection)
        name = f"{_slug(row.name)}-{seed}"
        log(f"seed set {seed}: {row.name}, chosen on validation, scored on test")
        test_folder = f"test-{seed}-{_slug(row.name)}"
        if row.scale is None:

            def build(parameters: dict[str, float], folder: str, row: MethodRow = row) -> Path:
                return lab.merge(document(row, parameters), folder)

            selection[row.name] = choose(lab, name, grid, build)
            chosen = selection[row.name]["chosen"]
            score(row.name, "merge", lab.merge(document(row, chosen), test_folder), chosen)
            continue
        # Linear in its scale: merged once at scale 1, then rescaled per setting.
        unit = lab.merge(document(row, {**grid[0], row.scale: 1.0}), f"unit-{name}")
        lab.kept.add(unit)

        def rescaled(
            parameters: dict[str, float], folder: str, unit: Path = unit, row: MethodRow = row
        ) -> Path:
            assert row.scale is not None
            return lab.rescale(unit, parameters[row.scale], folder)

        selection[row.name] = choose(lab, name, grid, rescaled)
        chosen = selection[row.name]["chosen"]
        score(row.name, "merge", rescaled(chosen, test_folder), chosen)
        lab.kept.discard(unit)
        lab.discard(unit)

    uniform = {"merge_method": "linear", "models": models, "dtype": "float32"}
    score("uniform soup", "merge", lab.merge(uniform, f"test-{seed}-uniform"), {})
    for label, reference in adapters.items():
        recipe = {"merge_method": "linear", "models": [{"model": reference}]}
        score(f"adapter: {label}", "adapter", lab.merge(recipe, f"test-{seed}-{label}"), {})


def soups(lab: Lab, settings: Settings, seed_zero: str) -> dict[str, Any]:
    """The uniform and greedy soups over the soup task's runs (``seed_zero`` first)."""
    training, extra = train_all(lab, soup_runs(settings), settings, lab.work / "adapters")
    references = {settings.soup_task: seed_zero, **extra}
    log(f"greedy soup over the {settings.soup_task} runs")
    greedy = _greedy_soup(lab, list(references.values()), settings)
    labels = {reference: label for label, reference in references.items()}
    rows: dict[str, dict[str, Any]] = {}
    for label, reference in extra.items():
        folder = lab.merge({"merge_method": "linear", "models": [{"model": reference}]}, label)
        rows[f"adapter: {label}"] = lab.test_scores(folder)
        lab.discard(folder)
    uniform = {"merge_method": "linear", "models": [{"model": r} for r in references.values()]}
    folder = lab.merge(uniform, "uniform-soup-runs")
    rows[f"uniform soup of the {settings.soup_task} runs"] = lab.test_scores(folder)
    lab.discard(folder)
    kept = greedy["report"]["kept"]
    soup_name = f"greedy soup of the {settings.soup_task} runs ({len(kept)} kept)"
    rows[soup_name] = lab.test_scores(greedy["folder"])
    lab.discard(greedy["folder"])
    return {"training": training, "labels": labels, "report": greedy["report"], "rows": rows}


def _greedy_soup(lab: Lab, references: list[str], settings: Settings) -> dict[str, Any]:
    """The greedy soup over ``references``, scored on the soup task's validation split."""
    from merge_kernels.evaluated_merge import run_evaluated_merge
    from merge_kernels.recipe import parse_recipe
    from merge_kernels.runner import MergeOptions

    recipe = parse_recipe(
        {
            "merge_method": "greedy_soup",
            "models": [{"model": ref} for ref in references],
            "parameters": {"keep_rule": ">"},
            "dtype": "float32",
            "evaluator": {
                "type": "held_out",
                "data": str(lab.work / "data" / settings.soup_task / "validation.jsonl"),
                "metric": "exact_match",
            },
        }
    )
    out = lab.work / "merges" / "greedy-soup"
    result = run_evaluated_merge(
        recipe, out, lab.soup_validation, MergeOptions(device=lab.device, overwrite=True)
    )
    lab.merges += 1
    report = result.report
    log(f"  kept {len(report['kept'])} of {len(references)}, validation {report['final_score']}")
    return {"report": report, "folder": out}
