"""Resolving a recipe's parameters for one tensor.

For each parameter the first level that gives a value wins, as in mergekit: the model's own
``parameters``, then the slice's, then the recipe's, then the defaults of the recipe's
``reference``, then the method's own defaults. Gradients and filtered lists are evaluated
for the tensor's name and layer position first; a filtered list that matches nothing falls
through to the next level.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ValidationError

from merge_kernels.errors import RecipeError
from merge_kernels.methods.kernel import MethodParams, ModelParams
from merge_kernels.parameter_settings import (
    ConditionalSetting,
    Parameters,
    ParameterSetting,
    Scalar,
    evaluate_setting,
)
from merge_kernels.recipe import Recipe


@dataclass(frozen=True)
class TensorParameters:
    """The validated parameters of one tensor's merge.

    Attributes:
        method: the whole-tensor parameters.
        models: per-model parameters, aligned with ``Recipe.merged_models()``.
    """

    method: MethodParams
    models: tuple[ModelParams, ...]


@dataclass(frozen=True)
class ParameterScope:
    """Where one tensor's parameters come from, each level with its field, highest first.

    Attributes:
        shared: the levels every model shares (slice, module, recipe).
        models: per merged model, its own parameters (looked up before ``shared``).
    """

    shared: tuple[tuple[str, Parameters | None], ...]
    models: tuple[tuple[str, Parameters | None], ...]


def recipe_scope(recipe: Recipe) -> ParameterScope:
    """The scope of a ``models`` recipe: each model's, the single slice's, the recipe's."""
    return ParameterScope(
        shared=(
            ("slices[0].parameters", recipe.slice_parameters),
            ("parameters", recipe.parameters),
        ),
        models=tuple(
            (f"models[{index}].parameters", entry.parameters)
            for index, entry in recipe.merged_models()
        ),
    )


def _lookup(
    name: str, levels: list[tuple[str, Parameters | None]], tensor_name: str, t: float
) -> tuple[Any, str] | None:
    for field, params in levels:
        if params and name in params:
            value = evaluate_setting(params[name], tensor_name, t)
            if value is not None:
                return value, f"{field}.{name}"
    return None


def _validate(model: type[BaseModel], values: dict[str, Any], origins: dict[str, str]) -> Any:
    try:
        return model.model_validate(values)
    except ValidationError as error:
        first = error.errors()[0]
        name = str(first["loc"][0]) if first["loc"] else ""
        raise RecipeError(
            origins.get(name, f"parameters.{name}" if name else "parameters"),
            f"{first['msg']} (got {first.get('input')!r})",
        ) from None


def resolve_parameters(
    recipe: Recipe,
    tensor_name: str,
    t: float,
    scope: ParameterScope | None = None,
    model_tensor_names: tuple[str, ...] | None = None,
) -> TensorParameters:
    """The parameters for tensor ``tensor_name`` at layer position ``t``.

    ``scope`` defaults to the recipe's own (:func:`recipe_scope`). As in mergekit, filters
    of the per-model parameters match the name of the tensor that model is read from
    (``model_tensor_names``, which differs from the output name when layers are stacked).

    Raises:
        RecipeError: a value is invalid for this tensor (the field names where it came
            from) or the method's own check fails (e.g. weights summing to 0).
    """
    spec = recipe.method
    defaults = spec.defaults(recipe.reference)
    scope = scope or recipe_scope(recipe)
    shared = list(scope.shared)

    def values_for(
        names: set[str], levels: list[tuple[str, Parameters | None]], looked_up: str = tensor_name
    ) -> tuple[dict[str, Any], dict[str, str]]:
        values: dict[str, Any] = {}
        origins: dict[str, str] = {}
        for name in names:
            found = _lookup(name, levels, looked_up, t)
            if found is not None:
                values[name], origins[name] = found
            elif name in defaults:
                values[name] = defaults[name]
        return values, origins

    method_values, method_origins = values_for(spec.method_param_names(), shared)
    method = _validate(spec.params, method_values, method_origins)
    models = []
    for position, own in enumerate(scope.models):
        looked_up = model_tensor_names[position] if model_tensor_names else tensor_name
        values, origins = values_for(spec.model_param_names(), [own, *shared], looked_up)
        models.append(_validate(spec.model_params, values, origins))
    if not models:
        # The base alone (see Recipe.base_only): nothing is merged, so nothing to check.
        return TensorParameters(method=method, models=())
    try:
        spec.check(method, tuple(models))
    except ValueError as error:
        raise RecipeError("parameters", f"{error} (tensor {tensor_name})") from None
    return TensorParameters(method=method, models=tuple(models))


def _candidate_values(setting: ParameterSetting) -> list[Scalar]:
    """Every value a setting can produce at its extremes (gradients lie between entries)."""
    if not isinstance(setting, list):
        return [setting]
    values: list[Scalar] = []
    for entry in setting:
        if isinstance(entry, ConditionalSetting):
            values.extend(_candidate_values(entry.value))
        else:
            values.append(entry)
    return values


def check_parameter_values(recipe: Recipe) -> None:
    """Validate every value written in the recipe, wherever it is and whichever tensor it is for.

    Only values the method reads are checked: a parameter it does not use (accepted with a
    warning, see :mod:`merge_kernels.parameter_names`), one given per model that applies to
    the whole merge, and the parameters of a base that is not merged mean nothing here, so a
    value that suits another method or mergekit must not fail.

    Raises:
        RecipeError: naming the field of the first invalid value.
    """
    from merge_kernels.slices import all_slices, is_stacked, parameter_levels

    spec = recipe.method
    method_names = spec.method_param_names()
    model_names = spec.model_param_names()
    shared_names = method_names | model_names
    levels: list[tuple[str, Parameters | None, set[str]]] = [
        ("parameters", recipe.parameters, shared_names),
        ("slices[0].parameters", recipe.slice_parameters, shared_names),
    ]
    levels += [
        (f"models[{i}].parameters", e.parameters, model_names) for i, e in recipe.merged_models()
    ]
    scopes: list[ParameterScope | None] = [None]
    if is_stacked(recipe):
        levels = [(field, params, shared_names) for field, params in parameter_levels(recipe)]
        scopes = [slice_.scope(spec, recipe) for slice_ in all_slices(recipe)]
    for field, params, read in levels:
        for name, setting in (params or {}).items():
            if name not in read:
                continue
            model = spec.params if name in method_names else spec.model_params
            for value in _candidate_values(setting):
                _validate_one(model, name, value, f"{field}.{name}")
    for scope in scopes:
        for t in (0.0, 0.5, 1.0):
            resolve_parameters(recipe, "", t, scope)


def _validate_one(model: type[BaseModel], name: str, value: Scalar, field: str) -> None:
    try:
        model.model_validate({name: value})
    except ValidationError as error:
        for problem in error.errors():
            if problem["loc"] and problem["loc"][0] == name:
                raise RecipeError(field, f"{problem['msg']} (got {value!r})") from None
