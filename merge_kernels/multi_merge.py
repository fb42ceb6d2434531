"""Multi-document recipe files: several merges, later ones reading earlier ones' outputs.

This is mergekit's ``mergekit-multimerge`` (``mergekit/scripts/multimerge.py``, 0.1.5): a
YAML file holds several documents, each a recipe with a ``name``; a document may use another
document's name as a model reference (``model: step-one``, or ``step-one+adapter``), and
then reads that merge's output. Here, as there:

- the merges run in dependency order, whatever their order in the file; a cycle is refused,
  naming the documents in it;
- each named merge is written to ``intermediate_dir/<name>``; the document without a name
  (at most one) is the final merge, written to the output folder. When every document has a
  name, the final merge is the one no other document reads (there must be exactly one);
- an intermediate output that an earlier run completed for the same recipe and inputs is
  kept and not merged again (mergekit's ``--lazy``, but checked against the recipe), and an
  interrupted one resumes after its last finished shard like any merge.

A reference that looks like a document name (a single path component, no ``/``) but is
neither a document's name nor an existing local folder is refused, naming the document and
the closest name: in a file of named merges it is almost always a typo. A single document
with a ``name`` is an ordinary recipe.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from merge_kernels.errors import RecipeError
from merge_kernels.recipe import Recipe, parse_recipe
from merge_kernels.suggestions import did_you_mean

_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.\-]{0,127}")
# Keys whose values are model references (in models, slices' sources, tokenizer settings).
_REFERENCE_KEYS = frozenset({"model", "base_model", "tokenizer_source", "source"})
# Values that hold no references, whatever their keys are called.
_OPAQUE_KEYS = frozenset({"parameters", "evaluator"})
_KEYWORDS = frozenset({"base", "union"})  # tokenizer sources that are not references


@dataclass(frozen=True)
class MergeStep:
    """One document of a multi-document file.

    Attributes:
        index: the document's position in the file.
        name: its ``name``; None for the final, unnamed merge.
        recipe: the validated recipe, other documents' names replaced by their outputs.
        needs: names of the documents whose outputs this one reads.
        final: whether this merge is written to the output folder.
        written: the recipe as the document wrote it (other documents named, not their
            folders): what the output's model card shows.
    """

    index: int
    name: str | None
    recipe: Recipe
    needs: tuple[str, ...]
    final: bool
    written: Recipe | None = None

    @property
    def label(self) -> str:
        """``documents[i] ('name')`` for messages."""
        return f"documents[{self.index}]" + (f" ({self.name!r})" if self.name else "")


@dataclass(frozen=True)
class MultiMerge:
    """Every merge of a multi-document file, in the order they must run.

    Attributes:
        steps: the merges, each after every merge it reads.
        intermediate_dir: where named (non-final) merges are written.
    """

    steps: tuple[MergeStep, ...]
    intermediate_dir: Path

    def output_of(self, step: MergeStep, out_dir: Path) -> Path:
        """Where ``step`` writes: ``out_dir`` for the final merge, else its intermediate."""
        if step.final:
            return out_dir
        assert step.name is not None
        return self.intermediate_dir / step.name

    def warnings(self) -> list[str]:
        """Every document's recipe warnings, each prefixed with its document."""
        return [f"{step.label}: {w}" for step in self.steps for w in step.recipe.warnings()]


def read_documents(text: str, source: str) -> list[Any]:
    """The YAML documents of ``text`` (empty ones dropped).

    Raises:
        RecipeError: invalid YAML.
    """
    try:
        return [doc for doc in yaml.safe_load_all(text) if doc is not None]
    except yaml.YAMLError as error:
        raise RecipeError("recipe", f"{source} is not valid YAML: {error}") from None


def parse_multi_merge(
    documents: Sequence[Any],
    *,
    intermediate_dir: Path,
    base_dir: Path | None = None,
    parse: Callable[[Mapping[str, Any]], Recipe] | None = None,
) -> MultiMerge:
    """Validate the documents of a multi-document file and order their merges.

    Args:
        documents: the parsed documents, in file order (two or more).
        intermediate_dir: where named merges are written (made absolute here).
        base_dir: folder relative local references are relative to.
        parse: validates one document (default: :func:`parse_recipe` with ``base_dir``);
            the service passes its own, which confines local paths.

    Raises:
        RecipeError: a document is invalid (the field is prefixed with ``documents[i]``),
            names are missing, repeated or malformed, the merges form a cycle, or a
            reference names no document.
    """
    intermediate_dir = Path(os.path.abspath(intermediate_dir))
    names = _names(documents)
    validate = parse or (lambda document: parse_recipe(document, base_dir=base_dir))
    parsed: dict[int, tuple[Recipe, tuple[str, ...]]] = {}
    written: dict[int, Recipe] = {}
    for index, document in enumerate(documents):
        name = names[index]
        label = f"documents[{index}]" + (f" ({name!r})" if name else "")
        used: set[str] = set()
        targets = _Targets(names, intermediate_dir, base_dir, label, used)
        patched = _substitute(document, targets, None, f"documents[{index}]")
        try:
            recipe = validate(patched)
        except RecipeError as error:
            message = error.message.removeprefix(f"{error.field}: ")
            raise RecipeError(
                f"documents[{index}].{error.field}", f"{label}: {message}", details=error.details
            ) from None
        if recipe.method.needs_evaluation or recipe.evaluator is not None:
            raise RecipeError(
                f"documents[{index}].evaluator",
                f"{label}: evaluated merges (greedy_soup, evaluator) cannot be part of a "
                "multi-document file; run that merge from a file of its own",
            )
        parsed[index] = (recipe, tuple(sorted(used)))
        written[index] = parse_recipe(document) if used else recipe
    final = _final_index(names, parsed)
    order = _dependency_order(names, parsed)
    steps = tuple(
        MergeStep(
            index=index,
            name=names[index],
            recipe=parsed[index][0],
            needs=parsed[index][1],
            final=index == final,
            written=written[index],
        )
        for index in order
    )
    return MultiMerge(steps=steps, intermediate_dir=intermediate_dir)


def _names(documents: Sequence[Any]) -> dict[int, str | None]:
    if len(documents) < 2:
        raise RecipeError("recipe", "a multi-document file needs at least two documents")
    names: dict[int, str | None] = {}
    seen: dict[str, int] = {}
    unnamed: list[int] = []
    for index, document in enumerate(documents):
        if not isinstance(document, Mapping):
            raise RecipeError(f"documents[{index}]", "each document must be a recipe (a mapping)")
        name = document.get("name")
        if name is None:
            unnamed.append(index)
        elif not isinstance(name, str) or not _NAME.fullmatch(name):
            raise RecipeError(
                f"documents[{index}].name",
                f"{name!r} cannot name a merge: use letters, digits, '_', '-' and '.', "
                "starting with a letter, digit or '_' (it becomes a folder name)",
            )
        elif name in seen:
            raise RecipeError(
                f"documents[{index}].name",
                f"{name!r} is already the name of documents[{seen[name]}]; names must differ",
            )
        else:
            seen[name] = index
        names[index] = name
    if len(unnamed) > 1:
        listed = ", ".join(f"documents[{i}]" for i in unnamed)
        raise RecipeError(
            f"documents[{unnamed[1]}].name",
            f"{listed} have no name: only the final merge may go unnamed; name the others",
        )
    return names


@dataclass
class _Targets:
    names: Mapping[int, str | None]
    intermediate_dir: Path
    base_dir: Path | None
    label: str
    used: set[str]

    def known(self) -> set[str]:
        return {name for name in self.names.values() if name is not None}

    def replace_side(self, text: str, field: str) -> str:
        """``text`` (one side of a reference) with a document's name made its output path."""
        stripped = text.strip()
        name, at, _ = stripped.partition("@")
        if name in self.known():
            if at:
                raise RecipeError(
                    field,
                    f"{self.label}: {stripped!r}: the merge {name!r} of this file has no "
                    "revisions; refer to it as plain {name!r}",
                )
            self.used.add(name)
            return str(self.intermediate_dir / name)
        if name and "/" not in stripped and "\\" not in stripped and not self._exists(stripped):
            raise RecipeError(
                field,
                f"{self.label}: {stripped!r} is neither the name of a document in this file "
                f"(names: {', '.join(sorted(self.known())) or 'none'}) nor a local folder; "
                f"{did_you_mean(name, self.known())}a Hub model is named 'org/name'",
            )
        return text

    def _exists(self, text: str) -> bool:
        folder = self.base_dir if self.base_dir is not None else Path.cwd()
        return (folder / os.path.expanduser(text)).exists()


def _substitute(value: Any, targets: _Targets, key: str | None, field: str) -> Any:
    """``value`` with every model reference that names a document replaced by its output."""
    if isinstance(value, Mapping):
        if key in _REFERENCE_KEYS and ("path" in value or "base" in value):
            return _substitute_object(value, targets, field)
        return {
            k: (v if k in _OPAQUE_KEYS else _substitute(v, targets, str(k), f"{field}.{k}"))
            for k, v in value.items()
        }
    if isinstance(value, list):
        return [
            _substitute(item, targets, key, f"{field}[{position}]")
            for position, item in enumerate(value)
        ]
    if isinstance(value, str) and key in _REFERENCE_KEYS and value.strip() not in _KEYWORDS:
        base, plus, adapter = value.partition("+")
        return targets.replace_side(base, field) + plus + adapter
    return value


def _substitute_object(value: Mapping[str, Any], targets: _Targets, field: str) -> Any:
    # An object naming a document becomes the string form: objects are resolved as the
    # recipe is validated, before the intermediate they name exists; strings when opened.
    path = value.get("path")
    if isinstance(path, str) and set(value) == {"path"}:
        replaced = targets.replace_side(path, field)
        return replaced if replaced != path else dict(value)
    base, adapter = value.get("base"), value.get("adapter")
    if isinstance(base, Mapping) and set(base) == {"path"} and isinstance(base["path"], str):
        base = base["path"]
    if isinstance(base, str) and set(value) == {"base", "adapter"}:
        replaced = targets.replace_side(base, f"{field}.base")
        if replaced != base:
            return f"{replaced}+{_string_form(adapter, f'{field}.adapter')}"
    return dict(value)


def _string_form(side: Any, field: str) -> str:
    if isinstance(side, str):
        return side
    if isinstance(side, Mapping) and set(side) == {"path"}:
        return str(side["path"])
    if isinstance(side, Mapping) and "repo" in side and set(side) <= {"repo", "revision"}:
        revision = side.get("revision")
        return str(side["repo"]) + (f"@{revision}" if revision else "")
    raise RecipeError(field, "give the adapter as a path, 'org/name[@rev]' or {path: ...}")


def _final_index(
    names: Mapping[int, str | None], parsed: Mapping[int, tuple[Recipe, tuple[str, ...]]]
) -> int:
    unnamed = [index for index, name in names.items() if name is None]
    if unnamed:
        return unnamed[0]
    read = {name for _, needs in parsed.values() for name in needs}
    leaves = [index for index, name in names.items() if name not in read]
    if len(leaves) != 1:
        listed = ", ".join(f"documents[{i}] ({names[i]!r})" for i in leaves) or "none"
        raise RecipeError(
            "name",
            f"the final merge is the document without a name, or else the one no other "
            f"document reads; here that is {listed}: leave the name out of the final merge",
        )
    return leaves[0]


def _dependency_order(
    names: Mapping[int, str | None], parsed: Mapping[int, tuple[Recipe, tuple[str, ...]]]
) -> list[int]:
    index_of = {name: index for index, name in names.items() if name is not None}
    order: list[int] = []
    state: dict[int, str] = {}  # "visiting" or "done"

    def visit(index: int, path: list[int]) -> None:
        if state.get(index) == "done":
            return
        if state.get(index) == "visiting":
            cycle = [*path[path.index(index) :], index]
            shown = " -> ".join(repr(names[i]) for i in cycle)
            raise RecipeError(
                f"documents[{index}].name",
                f"the merges {shown} read each other's outputs: a cycle; no order can run them",
            )
        state[index] = "visiting"
        for needed in parsed[index][1]:
            visit(index_of[needed], [*path, index])
        state[index] = "done"
        order.append(index)

    for index in sorted(parsed):
        visit(index, [])
    return order


def default_intermediate_dir(recipe_file: Path) -> Path:
    """Where a file's intermediate merges go unless told: ``<file stem>-intermediates``
    beside the file, so that planning and merging the same file find the same ones."""
    path = Path(os.path.abspath(recipe_file))
    return path.with_name(f"{path.stem}-intermediates")


def load_merge_file(path: Path, *, intermediate_dir: Path | None = None) -> Recipe | MultiMerge:
    """Read a recipe file: one document is a recipe, several a :class:`MultiMerge`.

    Args:
        path: the YAML (or JSON) file.
        intermediate_dir: where named merges go (default: :func:`default_intermediate_dir`).

    Raises:
        RecipeError: unreadable file, invalid YAML, or an invalid document.
    """
    try:
        text = path.read_text()
    except OSError as error:
        raise RecipeError("recipe", f"cannot read {path}: {error.strerror}") from None
    documents = read_documents(text, str(path))
    base_dir = path.resolve().parent
    if len(documents) <= 1:
        document = documents[0] if documents else None
        if not isinstance(document, Mapping):
            raise RecipeError(
                "recipe", f"{path} must hold a mapping with merge_method, models, ..."
            )
        return parse_recipe(document, base_dir=base_dir)
    return parse_multi_merge(
        documents,
        intermediate_dir=intermediate_dir or default_intermediate_dir(path),
        base_dir=base_dir,
    )
