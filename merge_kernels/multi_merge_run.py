"""Running and planning a multi-document file's merges (see :mod:`merge_kernels.multi_merge`).

Each merge is an ordinary :func:`~merge_kernels.runner.run_merge`, so each is atomic and
resumable on its own. An intermediate keeps its commit record beside its folder, so a later
run of the same file finds it complete (same recipe, same inputs) and does not merge it
again; a stale intermediate of another recipe is replaced.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from merge_kernels.errors import MergeCancelledError
from merge_kernels.model_card import CardExtras
from merge_kernels.multi_merge import MergeStep, MultiMerge
from merge_kernels.runner import (
    CancelCheck,
    MergeOptions,
    MergeResult,
    ProgressCallback,
    close_inputs,
    committed_result,
    plan_merge,
    run_merge,
)


@dataclass(frozen=True)
class StepResult:
    """What one merge of the file produced.

    Attributes:
        step: the merge.
        result: what it wrote (or what an earlier run had written).
        reused: True when an earlier run's complete output was kept as it was.
    """

    step: MergeStep
    result: MergeResult
    reused: bool


def step_options(step: MergeStep, options: MergeOptions) -> MergeOptions:
    """``options`` for ``step``: an intermediate keeps its commit record and replaces a
    stale folder of its name; the final merge runs with ``options`` unchanged."""
    if step.final:
        return options
    return replace(options, keep_commit_record=True, overwrite=True)


def run_multi_merge(
    merges: MultiMerge,
    out_dir: Path,
    options: MergeOptions | None = None,
    *,
    progress: ProgressCallback | None = None,
    announce: Any = None,
    should_cancel: CancelCheck | None = None,
) -> list[StepResult]:
    """Run every merge of ``merges`` in order; the final one writes ``out_dir``.

    Args:
        merges: the parsed file.
        out_dir: the final merge's output folder.
        options: how to run every merge.
        progress: passed to each merge.
        announce: called with ``(step, output_folder, reused)`` before each merge runs.
        should_cancel: polled before each merge and within it (see ``run_merge``); True
            stops the run, leaving the merges finished so far for a later run to keep.

    Returns:
        One result per merge, in the order they ran.

    Raises:
        The errors of :func:`~merge_kernels.runner.run_merge`, for the merge that failed.
        MergeCancelledError: ``should_cancel`` said so.
    """
    options = options or MergeOptions()
    results = []
    for step in merges.steps:
        if should_cancel is not None and should_cancel():
            raise MergeCancelledError("the merges were cancelled; no output was written")
        target = merges.output_of(step, Path(out_dir))
        own = step_options(step, options)
        done = None if step.final else committed_result(step.recipe, target, own)
        if announce is not None:
            announce(step, target, done is not None)
        if done is not None:
            results.append(StepResult(step, done, reused=True))
            continue
        card = CardExtras(
            recipe=step.written,
            references={str(merges.intermediate_dir / name): name for name in step.needs},
        )
        result = run_merge(
            step.recipe, target, own, progress=progress, should_cancel=should_cancel, card=card
        )
        results.append(StepResult(step, result, reused=False))
    return results


def plan_multi_merge(
    merges: MultiMerge, out_dir: Path | None, options: MergeOptions | None = None
) -> dict[str, Any]:
    """Every merge's plan report, as far as it can be planned now.

    A merge that reads an intermediate not yet written cannot be planned from headers:
    its entry says which merges must run first, with ``plan: null``.
    """
    options = options or MergeOptions()
    entries = []
    ok = True
    for step in merges.steps:
        output = out_dir if step.final else merges.output_of(step, Path())
        missing = [
            name
            for name in step.needs
            if not (merges.intermediate_dir / name / "config.json").exists()
        ]
        report = None
        if not missing:
            plan, inputs = plan_merge(step.recipe, step_options(step, options))
            try:
                report = plan.report()
            finally:
                close_inputs(inputs)
            ok = ok and not plan.problems
        entries.append(
            {
                "document": step.index,
                "name": step.name,
                "final": step.final,
                "output": str(output) if output is not None else None,
                "reads": list(step.needs),
                "warnings": step.recipe.warnings(),
                "plan": report,
                "waits_for": missing,
            }
        )
    return {
        "ok": ok,
        "intermediate_dir": str(merges.intermediate_dir),
        "merges": entries,
        "warnings": merges.warnings(),
    }
