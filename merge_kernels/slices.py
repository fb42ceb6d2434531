"""Layer stacking and multi-module recipes: mergekit's ``slices`` and ``modules``.

Follows mergekit 0.1.5 (``mergekit/config.py`` and ``MergePlanner.normalize_config`` in
``mergekit/plan.py``): a recipe is a set of modules (one, the whole model, for plain
``slices``), each a list of output slices; a slice merges, layer by layer, equally long
layer ranges of its sources. ``models`` inside a module means one slice over every layer of
each model, with the base model appended when it is not listed. A slice's base is its own
``base_model``, else the recipe's; parameters resolve from the source, then the slice, then
the module, then the recipe. As in mergekit, every input of a slice is a different model
and a method with a base needs that base among the slice's sources.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from merge_kernels.errors import RecipeError
from merge_kernels.parameter_settings import Parameters
from merge_kernels.suggestions import did_you_mean
from merge_kernels.tensor_parameters import ParameterScope

if TYPE_CHECKING:
    from merge_kernels.recipe import ModelReference, Recipe, SliceDefinition
    from merge_kernels.registry import MethodSpec

_SLICE_KEYS = {"sources", "parameters", "base_model"}


@dataclass(frozen=True)
class PlannedSource:
    """One source of a slice.

    Attributes:
        model: the model's reference.
        layer_range: ``(first, end)``, or None for every layer of the module (a ``models``
            entry, whose layer count only the checkpoint knows).
        parameters: the source's own parameters.
        field: where it is in the recipe, e.g. ``slices[1].sources[0]``.
    """

    model: ModelReference
    layer_range: tuple[int, int] | None
    parameters: Parameters | None
    field: str


@dataclass(frozen=True)
class PlannedSlice:
    """One output slice, with everything its tensors' merges need from the recipe.

    Attributes:
        field: where it is in the recipe, e.g. ``modules.vision_tower.slices[0]``.
        sources: its sources, in recipe order.
        base_model: the slice's ``base_model``, else the recipe's.
        parameters: the slice's parameters.
        module_parameters: the module's parameters (None outside ``modules``).
        module_field: ``modules.<name>``, or None outside ``modules``.
    """

    field: str
    sources: tuple[PlannedSource, ...]
    base_model: ModelReference | None
    parameters: Parameters | None
    module_parameters: Parameters | None = None
    module_field: str | None = None

    def base_position(self, spec: MethodSpec) -> int | None:
        """Which source is the base, for a method that merges task vectors (else None)."""
        if not spec.takes_base or self.base_model is None:
            return None
        return next(
            (i for i, s in enumerate(self.sources) if str(s.model) == str(self.base_model)), None
        )

    def merged(self, spec: MethodSpec) -> list[int]:
        """Positions of the sources merged besides the base."""
        base = self.base_position(spec)
        return [i for i in range(len(self.sources)) if i != base]

    def scope(self, spec: MethodSpec, recipe: Recipe) -> ParameterScope:
        """Where this slice's tensors take their parameters from, highest precedence first."""
        shared: list[tuple[str, Parameters | None]] = [
            (f"{self.field}.parameters", self.parameters)
        ]
        if self.module_field is not None:
            shared.append((f"{self.module_field}.parameters", self.module_parameters))
        shared.append(("parameters", recipe.parameters))
        models = tuple(
            (f"{self.sources[i].field}.parameters", self.sources[i].parameters)
            for i in self.merged(spec)
        )
        return ParameterScope(shared=tuple(shared), models=models)


# Module name → its slices; None names the whole model (plain ``slices``).
Structure = dict[str | None, list[PlannedSlice]]


def is_stacked(recipe: Recipe) -> bool:
    """Whether the recipe gives ``slices`` or ``modules`` (not plain ``models``)."""
    return bool(recipe.slices or recipe.modules)


def _slices(
    prefix: str,
    slices: Sequence[SliceDefinition],
    base: ModelReference | None,
    module_parameters: Parameters | None = None,
    module_field: str | None = None,
) -> list[PlannedSlice]:
    return [
        PlannedSlice(
            field=f"{prefix}[{i}]",
            sources=tuple(
                PlannedSource(s.model, s.layer_range, s.parameters, f"{prefix}[{i}].sources[{j}]")
                for j, s in enumerate(slice_.sources)
            ),
            base_model=slice_.base_model if slice_.base_model is not None else base,
            parameters=slice_.parameters,
            module_parameters=module_parameters,
            module_field=module_field,
        )
        for i, slice_ in enumerate(slices)
    ]


def structure_of(recipe: Recipe) -> Structure:
    """The recipe's modules and slices (one whole-model slice for a plain ``models`` recipe)."""
    base = recipe.base_model
    if recipe.modules:
        structure: Structure = {}
        for name, module in recipe.modules.items():
            field = f"modules.{name}"
            if module.slices:
                structure[name] = _slices(
                    f"{field}.slices", module.slices, base, module.parameters, field
                )
                continue
            entries = module.models or []
            sources = [
                PlannedSource(e.model, None, e.parameters, f"{field}.models[{j}]")
                for j, e in enumerate(entries)
            ]
            if base is not None and not any(str(e.model) == str(base) for e in entries):
                sources.append(PlannedSource(base, None, None, "base_model"))
            structure[name] = [
                PlannedSlice(
                    f"{field}.models", tuple(sources), base, None, module.parameters, field
                )
            ]
        return structure
    if recipe.slices:
        return {None: _slices("slices", recipe.slices, base)}
    # A single slice converted to ``models``: its range is checked against the model's layers.
    layer_range = recipe.layer_range
    converted = tuple(
        PlannedSource(
            e.model,
            layer_range,
            e.parameters,
            f"slices[0].sources[{j}]" if layer_range is not None else f"models[{j}]",
        )
        for j, e in enumerate(recipe.models or [])
    )
    field = "slices[0]" if layer_range is not None else "models"
    return {None: [PlannedSlice(field, converted, base, recipe.slice_parameters)]}


def all_slices(recipe: Recipe) -> list[PlannedSlice]:
    """Every slice of every module, in recipe order."""
    return [slice_ for slices in structure_of(recipe).values() for slice_ in slices]


def input_references(recipe: Recipe) -> list[tuple[str, int | None, ModelReference]]:
    """The checkpoints a merge opens, as ``(role, index in models, reference)``, in order.

    A ``models`` recipe opens the base (when the method has one), then the merged models.
    A stacked recipe opens the recipe's ``base_model`` first (its config is the output's),
    then every other model once, in the order the recipe names them.
    """
    if not is_stacked(recipe):
        named: list[tuple[str, int | None, ModelReference]] = []
        if recipe.method.takes_base and recipe.base_model is not None:
            named.append(("base", None, recipe.base_model))
        named += [("model", index, entry.model) for index, entry in recipe.merged_models()]
        return named
    seen: dict[str, tuple[str, int | None, ModelReference]] = {}
    if recipe.base_model is not None:
        seen[str(recipe.base_model)] = ("base", None, recipe.base_model)
    for slice_ in all_slices(recipe):
        for source in slice_.sources:
            seen.setdefault(str(source.model), ("model", None, source.model))
        if slice_.base_model is not None:
            seen.setdefault(str(slice_.base_model), ("model", None, slice_.base_model))
    return list(seen.values())


def check_slice_documents(field: str, slices: Any) -> None:
    """Check the shape of a ``slices`` list before it is parsed, naming the exact field.

    Raises:
        RecipeError: a slice or source is not a mapping, has unknown keys, or a
            ``layer_range`` is not ``[first, end]`` with ``0 <= first <= end``.
    """
    if not isinstance(slices, list):
        raise RecipeError(field, "give a list of slices, each with a list of sources")
    for i, slice_ in enumerate(slices):
        where = f"{field}[{i}]"
        if not isinstance(slice_, Mapping) or not isinstance(slice_.get("sources"), list):
            raise RecipeError(f"{where}.sources", "a slice needs a list of sources")
        unknown = set(slice_) - _SLICE_KEYS
        if unknown:
            raise RecipeError(
                where, f"unsupported keys {sorted(unknown)}; allowed: {sorted(_SLICE_KEYS)}"
            )
        if not slice_["sources"]:
            raise RecipeError(f"{where}.sources", "list at least one source")
        for j, source in enumerate(slice_["sources"]):
            if not isinstance(source, Mapping) or "model" not in source:
                raise RecipeError(
                    f"{where}.sources[{j}]", "a source is a mapping with model and layer_range"
                )
            layer_range = source.get("layer_range")
            if not (
                isinstance(layer_range, list | tuple)
                and len(layer_range) == 2
                and all(isinstance(v, int) and not isinstance(v, bool) for v in layer_range)
            ):
                raise RecipeError(
                    f"{where}.sources[{j}].layer_range", "give [first_layer, end_layer]"
                )
            first, end = layer_range
            if first < 0 or end < first:
                raise RecipeError(
                    f"{where}.sources[{j}].layer_range",
                    f"{list(layer_range)} is not a layer range: give [first, end] with "
                    "0 <= first <= end (end is excluded)",
                )


def check_structure(recipe: Recipe, spec: MethodSpec) -> None:
    """Check each slice's inputs and parameter names, as mergekit checks each slice.

    Raises:
        RecipeError: naming the slice's field: sources of different lengths, a model listed
            twice, a missing base, too many or too few models, an unknown parameter.
    """
    if spec.needs_evaluation:
        raise RecipeError(
            "merge_method",
            f"{spec.name} evaluates whole models as candidates; it takes `models`, not "
            "`slices` or `modules`",
        )
    if recipe.evaluator is not None:
        raise RecipeError(
            "evaluator",
            "scoring each input beside the merge needs whole input models; it is not "
            "available with `slices` or `modules` (score the output separately)",
        )
    if recipe.modules:
        for name, module in recipe.modules.items():
            if module.slices:
                check_slice_documents(
                    f"modules.{name}.slices", [s.model_dump() for s in module.slices]
                )
    _check_names(recipe.parameters, "parameters", spec, per_model=False)
    for name, module in (recipe.modules or {}).items():
        _check_names(module.parameters, f"modules.{name}.parameters", spec, per_model=False)
    for slice_ in all_slices(recipe):
        _check_slice(slice_, spec)


def _check_slice(slice_: PlannedSlice, spec: MethodSpec) -> None:
    where = slice_.field
    lengths = {
        s.layer_range[1] - s.layer_range[0] for s in slice_.sources if s.layer_range is not None
    }
    if len(lengths) > 1:
        listed = ", ".join(f"{s.model} {list(s.layer_range or ())}" for s in slice_.sources)
        raise RecipeError(
            f"{where}.sources",
            f"every source of a slice must have as many layers (got {listed}): their layers "
            "are merged one to one",
        )
    names = [str(s.model) for s in slice_.sources]
    for j, name in enumerate(names):
        if name in names[:j]:
            raise RecipeError(
                f"{slice_.sources[j].field}.model",
                f"{name} is already a source of this slice; a slice merges different models "
                "(stack its layers in another slice instead)",
            )
    if spec.needs_base:
        if slice_.base_model is None:
            raise RecipeError(
                "base_model",
                f"{spec.name} merges task vectors (model − base), so {where} needs a base "
                "model: give base_model (for the recipe or the slice)",
            )
        if slice_.base_position(spec) is None:
            raise RecipeError(
                f"{where}.sources",
                f"the base model {slice_.base_model} must be one of the slice's sources, with a "
                "layer range as long as the others' (mergekit requires this too)",
            )
    count = len(slice_.merged(spec))
    if spec.name == "slerp" and count != 1:
        raise RecipeError(
            f"{where}.sources",
            f"slerp interpolates exactly two models: the base and one other; got the base "
            f"and {count} others",
        )
    if count < spec.min_models:
        raise RecipeError(
            f"{where}.sources",
            f"{spec.name} needs at least {spec.min_models} models besides the base",
        )
    if spec.max_models is not None and count > spec.max_models:
        raise RecipeError(
            f"{where}.sources",
            f"{spec.name} takes at most {spec.max_models} models besides the base",
        )
    _check_names(slice_.parameters, f"{where}.parameters", spec, per_model=False)
    for source in slice_.sources:
        _check_names(source.parameters, f"{source.field}.parameters", spec, per_model=True)


def _check_names(
    params: Parameters | None, field: str, spec: MethodSpec, *, per_model: bool
) -> None:
    method_names = spec.method_param_names()
    model_names = spec.model_param_names()
    allowed = model_names if per_model else method_names | model_names
    for name in params or {}:
        if per_model and name in method_names:
            raise RecipeError(
                f"{field}.{name}",
                f"{name} applies to the whole tensor; move it to the slice's or the top-level "
                "parameters",
            )
        if name not in allowed:
            listed = ", ".join(sorted(allowed)) or "none"
            raise RecipeError(
                f"{field}.{name}",
                f"unknown {'per-model ' if per_model else ''}parameter for {spec.name}; "
                f"{did_you_mean(name, allowed)}allowed: {listed}",
            )


def parameter_levels(recipe: Recipe) -> list[tuple[str, Parameters | None]]:
    """Every parameter mapping written in a stacked recipe, with its field."""
    levels: list[tuple[str, Parameters | None]] = [("parameters", recipe.parameters)]
    for name, module in (recipe.modules or {}).items():
        levels.append((f"modules.{name}.parameters", module.parameters))
    for slice_ in all_slices(recipe):
        levels.append((f"{slice_.field}.parameters", slice_.parameters))
        levels += [(f"{s.field}.parameters", s.parameters) for s in slice_.sources]
    return levels
