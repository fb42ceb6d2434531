"""Multi-document recipes (mergekit-multimerge) as one job: its stages and their folders.

A multi-document request holds several recipes; later ones name earlier ones as inputs (see
:mod:`merge_kernels.multi_merge`, which parses and orders them). The service runs them as
one job: each named merge is a *stage* written to the job's private intermediates folder,
a hidden sibling of the output folder like the staging folder (``.{name}.tureen-stages``),
and only the final merge is published as the job's output. The intermediates are kept
while the job may resume and removed when it ends.

The job stores the documents as validated recipes (``{"merges": [...]}``, each a recipe
dump) with the references to other documents kept as their names, so that the record shows
no server folder and the worker parses them again against the folder of its own job.

Fields and messages name documents ``merges[i]``, as the request does.
"""

from __future__ import annotations

import re
import shutil
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from merge_kernels.errors import RecipeError, TureenError
from merge_kernels.multi_merge import MergeStep, MultiMerge, parse_multi_merge
from merge_kernels.recipe import Recipe
from service.jobs.models import JobStage

STAGES_SUFFIX = ".tureen-stages"
#: The key of a multi-document request (JSON) and of a multi-document job's recipe record.
MERGES_KEY = "merges"
_DOCUMENT = re.compile(r"\bdocuments\[(\d+)\]")


def intermediates_folder(output: Path) -> Path:
    """Where the intermediate merges of the job writing ``output`` live, one folder each."""
    output = Path(output)
    return output.parent / f".{output.name}{STAGES_SUFFIX}"


def discard_intermediates(output: Path) -> None:
    """Remove the intermediates of the job writing ``output`` (none for a single merge)."""
    shutil.rmtree(intermediates_folder(output), ignore_errors=True)


def is_multi_document(recipe: Mapping[str, Any]) -> bool:
    """Whether a job's recipe record holds several merges."""
    return MERGES_KEY in recipe and "merge_method" not in recipe


def _as_merges(text: str) -> str:
    return _DOCUMENT.sub(r"merges[\1]", text)


def parse_stages(
    documents: Sequence[Any],
    *,
    intermediate_dir: Path,
    base_dir: Path,
    parse: Callable[[Mapping[str, Any]], Recipe],
) -> MultiMerge:
    """Validate and order a multi-document request's merges.

    Args:
        documents: the recipes, in request order.
        intermediate_dir: where the named merges are written.
        base_dir: folder relative local references are relative to.
        parse: validates one document.

    Raises:
        RecipeError: as :func:`~merge_kernels.multi_merge.parse_multi_merge`, the field and
            message naming the document ``merges[i]``.
    """
    try:
        return parse_multi_merge(
            documents, intermediate_dir=intermediate_dir, base_dir=base_dir, parse=parse
        )
    except RecipeError as error:
        field = _as_merges(error.field)
        if not field.startswith(f"{MERGES_KEY}["):
            field = f"{MERGES_KEY}.{field}" if field != "recipe" else MERGES_KEY
        message = _as_merges(error.message.removeprefix(f"{error.field}: "))
        details = {key: value for key, value in error.details.items() if key != "field"}
        raise RecipeError(field, message, details=details) from None


def stage_label(step: MergeStep) -> str:
    """A stage as messages name it: its name, or ``merges[i]`` when it has none."""
    return step.name if step.name is not None else f"{MERGES_KEY}[{step.index}]"


def stage_records(merges: MultiMerge) -> list[JobStage]:
    """The job's stage records, all pending, in the order the merges run."""
    return [
        JobStage(index=step.index, name=step.name, final=step.final, reads=list(step.needs))
        for step in merges.steps
    ]


def stage_warnings(merges: MultiMerge) -> list[str]:
    """Every stage's recipe warnings, each prefixed with the stage's name."""
    return [f"{stage_label(step)}: {w}" for step in merges.steps for w in step.recipe.warnings()]


def recipe_record(merges: MultiMerge) -> dict[str, Any]:
    """The job's recipe record: every document as validated, in request order, with the
    references to other documents given back as their names (no server folder in it)."""
    prefix = f"{merges.intermediate_dir}/"
    by_index = sorted(merges.steps, key=lambda step: step.index)
    return {
        MERGES_KEY: [
            _unsubstitute(step.recipe.model_dump(mode="json"), prefix) for step in by_index
        ]
    }


def _unsubstitute(value: Any, prefix: str) -> Any:
    # parse_multi_merge made each document name `intermediate_dir/name`: undo that.
    if isinstance(value, dict):
        return {key: _unsubstitute(item, prefix) for key, item in value.items()}
    if isinstance(value, list):
        return [_unsubstitute(item, prefix) for item in value]
    if isinstance(value, str) and value.startswith(prefix):
        return value.removeprefix(prefix)
    return value


def in_stage(error: TureenError, step: MergeStep) -> TureenError:
    """``error`` (raised while running or checking ``step``) made to name the stage.

    The message starts with ``merges[i] ('name')``; ``details`` gain ``stage`` (the name,
    or ``merges[i]``) and a ``field`` of the recipe becomes the request's ``merges[i].field``.
    """
    where = f"{MERGES_KEY}[{step.index}]"
    label = where + (f" ({step.name!r})" if step.name else "")
    if not error.message.startswith(where):
        error.message = f"{label}: {error.message}"
    field = error.details.get("field")
    if isinstance(field, str) and not field.startswith(where):
        error.details["field"] = f"{where}.{field}"
        if isinstance(error, RecipeError):
            error.field = f"{where}.{field}"
    error.details["stage"] = stage_label(step)
    error.args = (error.message,)
    return error
