"""Multi-document recipe requests (mergekit-multimerge's format) for one job.

A request holds several recipes, as several YAML documents or as JSON
``{"merges": [recipe, ...], "output": {...}}``; a recipe with a ``name`` may be another's
model (``model: step-one``, ``step-one+adapter``). The job's ``output`` options are given at
the top (JSON) or in the final document (the one without a name), never in another.

The service's first rule holds for every document: each local path must lie under the
allowed roots. Every model reference of every document that does not name a document is
checked here, before anything else reads the disk, and a refusal names its field
(``merges[1].models[0].model``). References to documents are the job's own intermediates,
never paths of the client's choosing.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from merge_kernels.checkpoints.confinement import PathOutsideRootsError
from merge_kernels.checkpoints.opening import resolve_local_path
from merge_kernels.checkpoints.reference import LocalRef, LoraRef, reference_from_value
from merge_kernels.errors import CheckpointNotFoundError, RecipeError, TureenError
from merge_kernels.multi_merge import MultiMerge
from merge_kernels.recipe import Recipe
from service.jobs.models import OutputOptions
from service.jobs.stages import MERGES_KEY, STAGES_SUFFIX, parse_stages
from service.settings import ServiceSettings

# Keys whose values are model references, and keys whose values hold none (as in
# merge_kernels.multi_merge, which substitutes the document names).
_REFERENCE_KEYS = frozenset({"model", "base_model", "tokenizer_source", "source"})
_OPAQUE_KEYS = frozenset({"parameters", "evaluator"})
_KEYWORDS = frozenset({"base", "union"})


@dataclass(frozen=True)
class MultiRecipeRequest:
    """A parsed multi-document merge or plan request.

    Attributes:
        merges: the validated merges, in the order they run (their intermediates point into
            a placeholder folder: the job's own is chosen when it runs).
        output: the output options (defaults when none were given).
        body_hash: sha256 of the canonical documents, for idempotency checks.
    """

    merges: MultiMerge
    output: OutputOptions
    body_hash: str


def split_documents(
    documents: Sequence[object], top_output: object
) -> tuple[list[dict[str, Any]], object, int | None]:
    """The documents without their ``output`` key, the output options, and the index of the
    document that gave them (None: given at the top, or not at all).

    Raises:
        RecipeError: a document is not a mapping, or output options are given twice.
    """
    recipes: list[dict[str, Any]] = []
    output, where = top_output, None
    for index, document in enumerate(documents):
        if not isinstance(document, dict):
            raise RecipeError(
                f"{MERGES_KEY}[{index}]",
                "each document must be a recipe: a mapping with merge_method, models, ...",
            )
        if "output" in document:
            if output is not None:
                raise RecipeError(
                    f"{MERGES_KEY}[{index}].output",
                    "give the job's output options once: in the final document (or, in "
                    "JSON, beside `merges`)",
                )
            output, where = document["output"], index
        recipes.append({key: value for key, value in document.items() if key != "output"})
    return recipes, output, where


def check_final_output(merges: MultiMerge, where: int | None) -> None:
    """Refuse output options given in a document that is not the final merge.

    Raises:
        RecipeError: naming ``merges[i].output``.
    """
    final = next(step for step in merges.steps if step.final)
    if where is not None and where != final.index:
        raise RecipeError(
            f"{MERGES_KEY}[{where}].output",
            f"output options belong to the final merge ({MERGES_KEY}[{final.index}]), the "
            "one whose output the job publishes; move them there",
        )


def document_names(documents: Sequence[Mapping[str, Any]]) -> set[str]:
    """The names documents give themselves (well-formed or not: they are checked later)."""
    return {name for document in documents if isinstance(name := document.get("name"), str)}


def _references(document: Mapping[str, Any], field: str) -> Iterator[tuple[str, Any]]:
    """``(field, value)`` for every model reference in ``document``, depth first."""
    # An explicit stack: a deep body must not make the walk overflow.
    stack: list[tuple[Any, str | None, str]] = [(document, None, field)]
    while stack:
        value, key, where = stack.pop()
        if key in _REFERENCE_KEYS and (isinstance(value, str) or _is_object_reference(value)):
            yield where, value
        elif isinstance(value, Mapping):
            for child_key, child in reversed(list(value.items())):
                if child_key not in _OPAQUE_KEYS:
                    stack.append((child, str(child_key), f"{where}.{child_key}"))
        elif isinstance(value, list):
            stack.extend(
                (child, key, f"{where}[{position}]")
                for position, child in reversed(list(enumerate(value)))
            )


def _is_object_reference(value: Any) -> bool:
    return isinstance(value, Mapping) and bool({"path", "repo", "base"} & set(value))


def _names_document(side: Any, names: set[str]) -> bool:
    if isinstance(side, Mapping) and set(side) == {"path"}:
        side = side["path"]
    return isinstance(side, str) and side.strip().partition("@")[0] in names


def _unchecked_sides(value: Any, names: set[str]) -> list[Any]:
    """The parts of a reference that are not a document's name (those are checked)."""
    if isinstance(value, str):
        if value.strip() in _KEYWORDS:
            return []
        base, plus, adapter = value.partition("+")
        if _names_document(base, names):
            return [adapter] if plus else []
        return [value]
    if _names_document(value, names):
        return []
    if isinstance(value, Mapping) and _names_document(value.get("base"), names):
        return [value["adapter"]] if "adapter" in value else []
    return [value]


def check_paths(documents: Sequence[Mapping[str, Any]], settings: ServiceSettings) -> None:
    """Refuse any local path of any document that leaves the allowed roots.

    Relative paths are relative to ``data_dir/inputs``; a path outside the roots is refused
    whether it exists or not, so a request cannot probe the server's disk. References that
    name neither a path nor a Hub repository are left to the recipe's validation, which
    explains them better (a misspelt document name, say).

    Raises:
        PathOutsideRootsError: a path outside the roots; ``details['field']`` names it.
        CheckpointNotFoundError: a path no file system can hold, naming its field.
    """
    names = document_names(documents)
    for index, document in enumerate(documents):
        for field, value in _references(document, f"{MERGES_KEY}[{index}]"):
            for side in _unchecked_sides(value, names):
                try:
                    _check_side(side, settings)
                except CheckpointNotFoundError as error:
                    if isinstance(error, PathOutsideRootsError) or (
                        error.details.get("reason") == "invalid_path"
                    ):
                        raise _in_field(error, field) from None
                except (RecipeError, TypeError, ValueError):
                    pass  # malformed: the recipe's validation names the problem


def _check_side(side: Any, settings: ServiceSettings) -> None:
    inputs, roots = settings.inputs_dir, settings.input_roots
    reference = reference_from_value(side, base_dir=inputs, allowed_roots=roots)
    # Object forms ({"path": ...}) are confined only when opened: confine them now.
    local = [reference] if isinstance(reference, LocalRef) else []
    if isinstance(reference, LoraRef):
        local = [part for part in (reference.base, reference.adapter) if isinstance(part, LocalRef)]
    for part in local:
        resolve_local_path(part.path, base_dir=inputs, allowed_roots=roots)


def _in_field(error: TureenError, field: str) -> TureenError:
    error.message = f"{field}: {error.message}"
    error.details["field"] = field
    error.args = (error.message,)
    return error


def parse_multi_request(
    documents: Sequence[object],
    top_output: object,
    settings: ServiceSettings,
    *,
    parse: Callable[[Mapping[str, Any]], Recipe],
    read_output: Callable[[object], OutputOptions],
) -> tuple[MultiMerge, OutputOptions, list[dict[str, Any]]]:
    """Check and parse the documents of a multi-document request.

    Args:
        documents: the decoded documents, in request order.
        top_output: the JSON body's ``output`` (None for YAML).
        settings: the service settings (inputs folder, allowed roots).
        parse: validates one document as the service does.
        read_output: validates output options.

    Returns:
        The merges, the output options and the documents without ``output`` (for hashing).

    Raises:
        RecipeError, CheckpointNotFoundError: naming the document and field.
    """
    recipes, output, where = split_documents(documents, top_output)
    try:
        options = read_output(output)
    except RecipeError as error:
        if where is None:
            raise
        message = error.message.removeprefix(f"{error.field}: ")
        raise RecipeError(f"{MERGES_KEY}[{where}].{error.field}", message) from None
    check_paths(recipes, settings)
    # A folder that is never created: the job's own intermediates folder is chosen when it
    # runs, and the job's record keeps document names, not this folder.
    placeholder = settings.outputs_dir / f".request-{uuid.uuid4().hex}{STAGES_SUFFIX}"
    merges = parse_stages(
        recipes, intermediate_dir=placeholder, base_dir=settings.inputs_dir, parse=parse
    )
    check_final_output(merges, where)
    return merges, options, recipes
