"""The search spec: a recipe whose parameter values may be search dimensions.

A dimension stands where a number would in a recipe's ``parameters`` (the method's, a
model's, a slice source's, an entry of a gradient or of a filtered list)::

    parameters:
      lambda: {search: {low: 0.5, high: 2.0}}
      density: [{search: {low: 0.1, high: 1.0}}, 0.5]   # one layer group of a gradient

``{search: {low, high, log?, step?}}`` is a number between ``low`` and ``high`` (on a log
scale with ``log: true``, rounded to multiples of ``step`` above ``low`` with ``step``);
``{search: {values: [...]}}`` is one of the listed values. Each dimension is named by where
it stands (``models[1].parameters.density``, ``parameters.density[0]``), or by its own
``name``: every dimension given the same ``name`` takes one shared value.

Strategies (:mod:`merge_kernels.search.strategies`) propose points in the unit cube
``[0, 1]^d``; :meth:`SearchSpace.decode` turns one into parameter values and
:meth:`SearchSpace.instantiate` into a plain recipe. This is the search space of
mergekit-evolve's genome (weights and densities per model, optionally per layer group), with
any method parameter (TIES' ``lambda``, SLERP's ``t``) searchable too.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from merge_kernels.errors import RecipeError
from merge_kernels.recipe import Recipe, parse_recipe

PathPart = str | int
Value = float | int | str | bool
_STRICT = ConfigDict(frozen=True, extra="forbid")


class DimensionSpec(BaseModel):
    """One searched value: a range, or a list of values."""

    model_config = _STRICT

    low: float | None = Field(None, description="Smallest value of a range.")
    high: float | None = Field(None, description="Largest value of a range.")
    log: bool = Field(False, description="Search the range on a log scale (low > 0).")
    step: float | None = Field(None, gt=0, description="Round to low + k·step.")
    values: list[Value] | None = Field(None, min_length=1, description="The choices instead.")
    name: str | None = Field(None, min_length=1, description="Share one value under this name.")

    @model_validator(mode="after")
    def _one_form(self) -> DimensionSpec:
        if self.values is not None:
            if self.low is not None or self.high is not None or self.step is not None:
                raise ValueError("give either values or low/high (with log, step), not both")
            return self
        if self.low is None or self.high is None:
            raise ValueError("give low and high (a range), or values (a list)")
        if not (math.isfinite(self.low) and math.isfinite(self.high)) or self.low >= self.high:
            raise ValueError(f"low must be below high, got low={self.low}, high={self.high}")
        if self.log and self.low <= 0:
            raise ValueError("a log scale needs low > 0")
        return self

    def decode(self, unit: float) -> Value:
        """The value at ``unit`` ∈ [0, 1] (clipped)."""
        u = min(1.0, max(0.0, float(unit)))
        if self.values is not None:
            return self.values[min(len(self.values) - 1, int(u * len(self.values)))]
        assert self.low is not None and self.high is not None
        if self.log:
            value = math.exp(math.log(self.low) + u * (math.log(self.high) - math.log(self.low)))
        else:
            value = self.low + u * (self.high - self.low)
        if self.step is not None:
            steps = math.floor((self.high - self.low) / self.step + 1e-9)
            value = self.low + min(steps, max(0, round((value - self.low) / self.step))) * self.step
        return min(self.high, max(self.low, value))

    def levels(self, count: int) -> list[float]:
        """Unit coordinates of a grid over this dimension: each value of a list (at the
        middle of its cell), each step of a stepped range with at most ``count`` steps, else
        ``count`` evenly spaced points, both ends included."""
        if self.values is not None:
            return [(i + 0.5) / len(self.values) for i in range(len(self.values))]
        if self.step is not None and self.low is not None and self.high is not None:
            steps = math.floor((self.high - self.low) / self.step + 1e-9) + 1
            if steps <= count:
                return [min(1.0, i * self.step / (self.high - self.low)) for i in range(steps)]
        if count <= 1:
            return [0.5]
        return [i / (count - 1) for i in range(count)]

    @property
    def is_list(self) -> bool:
        return self.values is not None


@dataclass(frozen=True)
class Dimension:
    """A named dimension and every place in the recipe document it fills."""

    name: str
    spec: DimensionSpec
    paths: tuple[tuple[PathPart, ...], ...]


class StrategyConfig(BaseModel):
    """How points are proposed."""

    model_config = _STRICT

    name: Literal["grid", "random", "cmaes"] = Field(description="grid, random or cmaes.")
    sigma0: float = Field(0.3, gt=0, le=1, description="cmaes: initial step in the unit cube.")
    popsize: int | None = Field(None, ge=2, description="cmaes: points per generation.")


class Budget(BaseModel):
    """When the search stops (whichever comes first)."""

    model_config = _STRICT

    evaluations: int = Field(ge=1, le=100_000, description="Candidates scored at most.")
    seconds: float | None = Field(None, gt=0, description="Wall time at most (over resumes).")


class SearchSpec(BaseModel):
    """A search: a recipe with dimensions, a strategy, a budget and the evaluators."""

    model_config = _STRICT

    recipe: dict[str, Any] | str = Field(description="The recipe (mapping or YAML text).")
    strategy: StrategyConfig = Field(description="grid, random, cmaes, or {name, ...}.")
    budget: Budget
    seed: int = Field(0, ge=0, description="Seed of the strategy's random numbers.")
    evaluator: dict[str, Any] = Field(description="Scores candidates on the validation split.")
    test: dict[str, Any] | None = Field(
        None,
        description="Keys replacing the evaluator's to score the winner once on the test "
        "split, e.g. {data: test.jsonl}.",
    )
    memory_limit_bytes: int = Field(
        4 * 1024**3, ge=0, description="Keep candidates in memory when the working set fits."
    )

    @model_validator(mode="before")
    @classmethod
    def _strategy_name(cls, data: Any) -> Any:
        if isinstance(data, Mapping) and isinstance(data.get("strategy"), str):
            return {**data, "strategy": {"name": data["strategy"]}}
        return data

    def test_evaluator(self) -> dict[str, Any] | None:
        """The test split's evaluator section: the evaluator's with ``test``'s keys."""
        return None if self.test is None else {**self.evaluator, **self.test}

    def fingerprint(self) -> str:
        """A hash of the spec's meaning: a resumed search must be the same search (the
        memory limit changes where candidates are merged, not what they are)."""
        meaning = self.model_dump(mode="json", exclude={"memory_limit_bytes"})
        canonical = json.dumps(meaning, sort_keys=True, default=str)
        return hashlib.sha256(canonical.encode()).hexdigest()


class SearchSpace:
    """A recipe template and its dimensions.

    Args:
        document: the recipe document holding ``{search: ...}`` values.
        base_dir: folder relative references in object form are relative to.
    """

    def __init__(self, document: Mapping[str, Any], base_dir: Path | None = None) -> None:
        self.template = copy.deepcopy(dict(document))
        self.base_dir = base_dir
        found: dict[str, tuple[DimensionSpec, list[tuple[PathPart, ...]]]] = {}
        _collect(self.template, (), False, found)
        if not found:
            raise RecipeError(
                "recipe",
                "the recipe has no search dimension; put {search: {low, high}} (or "
                "{search: {values: [...]}}) where a parameter's value goes",
            )
        self.dimensions = [Dimension(n, s, tuple(p)) for n, (s, p) in found.items()]
        # Refuse a space some corner of which is no valid recipe, before anything runs.
        for unit in (0.0, 1.0):
            self.instantiate(self.decode([unit] * len(self.dimensions)))

    @property
    def names(self) -> list[str]:
        """The dimensions' names, in order."""
        return [d.name for d in self.dimensions]

    def decode(self, unit: Sequence[float]) -> dict[str, Value]:
        """Parameter values by dimension name, from unit coordinates."""
        if len(unit) != len(self.dimensions):
            raise ValueError(f"expected {len(self.dimensions)} coordinates, got {len(unit)}")
        return {d.name: d.spec.decode(u) for d, u in zip(self.dimensions, unit, strict=True)}

    def document(self, point: Mapping[str, Value]) -> dict[str, Any]:
        """The recipe document with every dimension replaced by its value in ``point``."""
        document = copy.deepcopy(self.template)
        for dimension in self.dimensions:
            if dimension.name not in point:
                raise RecipeError("point", f"no value for {dimension.name}")
            for path in dimension.paths:
                _assign(document, path, point[dimension.name])
        return document

    def instantiate(self, point: Mapping[str, Value]) -> Recipe:
        """The plain recipe at ``point``; a recipe error names ``recipe.<field>``."""
        try:
            return parse_recipe(self.document(point), base_dir=self.base_dir)
        except RecipeError as error:
            where = ", ".join(f"{k}={v}" for k, v in point.items())
            message = error.message.removeprefix(f"{error.field}: ")
            details = {k: v for k, v in error.details.items() if k != "field"}
            raise RecipeError(
                f"recipe.{error.field}" if error.field != "recipe" else "recipe",
                f"{message} (at {where})",
                details=details,
            ) from None


def _collect(
    node: Any,
    path: tuple[PathPart, ...],
    in_parameters: bool,
    found: dict[str, tuple[DimensionSpec, list[tuple[PathPart, ...]]]],
) -> None:
    if isinstance(node, Mapping) and "search" in node:
        field = _dotted(path)
        if len(node) != 1:
            extra = sorted(str(k) for k in node if k != "search")
            raise RecipeError(f"recipe.{field}", f"a search dimension holds only `search`: {extra}")
        if not in_parameters:
            raise RecipeError(
                f"recipe.{field}",
                "search dimensions go where a parameter's value goes (under parameters)",
            )
        if not isinstance(node["search"], Mapping):
            raise RecipeError(f"recipe.{field}.search", "give {low, high} or {values: [...]}")
        try:
            spec = DimensionSpec.model_validate(dict(node["search"]))
        except ValidationError as error:
            first = error.errors()[0]
            loc = ".".join(str(p) for p in first["loc"])
            where = f"recipe.{field}.search" + (f".{loc}" if loc else "")
            raise RecipeError(where, first["msg"].removeprefix("Value error, ")) from None
        name = spec.name or field
        if name in found:
            if found[name][0] != spec:
                raise RecipeError(
                    f"recipe.{field}.search",
                    f"the dimension {name!r} is given twice with different ranges",
                )
            found[name][1].append(path)
        else:
            found[name] = (spec, [path])
        return
    if isinstance(node, Mapping):
        for key, value in node.items():
            _collect(value, (*path, str(key)), in_parameters or key == "parameters", found)
    elif isinstance(node, list):
        for index, value in enumerate(node):
            _collect(value, (*path, index), in_parameters, found)


def _assign(document: Any, path: tuple[PathPart, ...], value: Value) -> None:
    target = document
    for part in path[:-1]:
        target = target[part]
    target[path[-1]] = value


def _dotted(path: Sequence[PathPart]) -> str:
    text = ""
    for part in path:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else part)
    return text


def parse_search_spec(document: Any, *, base_dir: Path | None = None) -> SearchSpec:
    """Validate a search spec document (parsed from YAML or JSON).

    Raises:
        RecipeError: the first problem, naming its field (``budget.evaluations``...).
    """
    if not isinstance(document, Mapping):
        raise RecipeError("spec", "a search spec is a mapping: recipe, strategy, budget, ...")
    try:
        spec = SearchSpec.model_validate(dict(document))
    except ValidationError as error:
        first = error.errors()[0]
        field = _dotted([p for p in first["loc"] if p not in ("dict[str,any]", "str")]) or "spec"
        problems = [f"{_dotted(e['loc'])}: {e['msg']}" for e in error.errors()]
        message = str(first["msg"]).removeprefix("Value error, ")
        raise RecipeError(field, message, details={"errors": problems}) from None
    search_space(spec, base_dir)  # the recipe and its dimensions are checked now
    return spec


def recipe_document(spec: SearchSpec) -> dict[str, Any]:
    """The spec's recipe as a mapping (parsed when given as YAML text)."""
    if isinstance(spec.recipe, dict):
        return spec.recipe
    try:
        loaded = yaml.safe_load(spec.recipe)
    except yaml.YAMLError as error:
        raise RecipeError("recipe", f"not valid YAML: {error}") from None
    if not isinstance(loaded, Mapping):
        raise RecipeError("recipe", "the recipe must be a mapping with merge_method, models, ...")
    return dict(loaded)


def search_space(spec: SearchSpec, base_dir: Path | None = None) -> SearchSpace:
    """The spec's recipe as a search space."""
    return SearchSpace(recipe_document(spec), base_dir)


def load_search_spec(path: Path) -> SearchSpec:
    """Read and validate a YAML (or JSON) search spec file (paths relative to its folder)."""
    try:
        document = yaml.safe_load(path.read_text())
    except OSError as error:
        raise RecipeError("spec", f"cannot read {path}: {error.strerror}") from None
    except yaml.YAMLError as error:
        raise RecipeError("spec", f"{path} is not valid YAML: {error}") from None
    return parse_search_spec(document, base_dir=path.resolve().parent)
