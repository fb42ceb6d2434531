"""Parameter values are finite numbers: NaN, infinities and booleans are refused by field.

Every numeric parameter of every registered method is tried with every way a document can
spell a non-finite number (JSON's ``NaN``/``Infinity``/``1e999``, YAML's ``.nan``/``.inf``),
as a scalar, inside a gradient and inside a filtered list.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, get_args

import pytest
import yaml

from merge_kernels.errors import RecipeError
from merge_kernels.recipe import load_recipe, parse_recipe
from merge_kernels.registry import MethodSpec, methods

_PLACEHOLDER = "__VALUE__"
JSON_SPELLINGS = ("NaN", "Infinity", "-Infinity", "1e999", "-1e999")
YAML_SPELLINGS = (".nan", ".inf", "-.inf", ".NaN", "+.inf")
STRING_SPELLINGS = ("nan", "inf", "-Infinity", "1e999")


def _numeric(annotation: Any) -> bool:
    kinds = {annotation, *get_args(annotation)}
    return bool(kinds & {float, int})


def _numeric_parameters() -> list[tuple[str, str, bool]]:
    """(method, parameter as written, whether it is per-model) for every numeric field."""
    found = []
    for spec in methods():
        for model, per_model in ((spec.params, False), (spec.model_params, True)):
            for name, info in model.model_fields.items():
                if _numeric(info.annotation):
                    found.append((spec.name, info.alias or name, per_model))
    return found


NUMERIC = _numeric_parameters()


def _recipe(spec: MethodSpec, name: str, per_model: bool, value: Any) -> dict[str, Any]:
    count = spec.min_models if spec.max_models is None else spec.max_models
    document: dict[str, Any] = {
        "merge_method": spec.name,
        "models": [{"model": f"/models/ft{i}"} for i in range(max(1, count))],
        "parameters": {"t": 0.5} if spec.name == "slerp" else {},
    }
    if spec.needs_base:
        document["base_model"] = "/models/base"
    if per_model:
        document["models"][0]["parameters"] = {name: value}
    else:
        document["parameters"][name] = value
    return document


def _field(name: str, per_model: bool) -> str:
    return f"models[0].parameters.{name}" if per_model else f"parameters.{name}"


FORMS = {
    "scalar": _PLACEHOLDER,
    "gradient": [0.5, _PLACEHOLDER],
    "filtered": [{"filter": "mlp", "value": _PLACEHOLDER}, {"value": 0.5}],
    "filtered_gradient": [{"filter": "mlp", "value": [0.5, _PLACEHOLDER]}],
}


def test_every_numeric_parameter_is_covered() -> None:
    names = {name for _, name, _ in NUMERIC}
    assert {"weight", "density", "lambda", "t", "dot_threshold", "eps"} <= names


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("spelling", JSON_SPELLINGS)
@pytest.mark.parametrize(("method", "name", "per_model"), NUMERIC)
def test_json_non_finite_numbers_are_refused_naming_the_field(
    method: str, name: str, per_model: bool, spelling: str, form: str
) -> None:
    spec = next(s for s in methods() if s.name == method)
    text = json.dumps(_recipe(spec, name, per_model, FORMS[form]))
    document = json.loads(text.replace(f'"{_PLACEHOLDER}"', spelling))
    with pytest.raises(RecipeError) as caught:
        parse_recipe(document)
    assert caught.value.field == _field(name, per_model)
    assert "finite number" in caught.value.message


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("spelling", YAML_SPELLINGS)
@pytest.mark.parametrize(("method", "name", "per_model"), NUMERIC)
def test_yaml_non_finite_numbers_are_refused_naming_the_field(
    tmp_path: Path, method: str, name: str, per_model: bool, spelling: str, form: str
) -> None:
    spec = next(s for s in methods() if s.name == method)
    text = yaml.safe_dump(_recipe(spec, name, per_model, FORMS[form]))
    path = tmp_path / "recipe.yaml"
    path.write_text(text.replace(_PLACEHOLDER, spelling))
    with pytest.raises(RecipeError) as caught:
        load_recipe(path)
    assert caught.value.field == _field(name, per_model)
    assert "finite number" in caught.value.message


@pytest.mark.parametrize("spelling", STRING_SPELLINGS)
@pytest.mark.parametrize(("method", "name", "per_model"), NUMERIC)
def test_non_finite_strings_are_refused(
    method: str, name: str, per_model: bool, spelling: str
) -> None:
    spec = next(s for s in methods() if s.name == method)
    with pytest.raises(RecipeError) as caught:
        parse_recipe(_recipe(spec, name, per_model, spelling))
    assert caught.value.field == _field(name, per_model)


@pytest.mark.parametrize("value", [True, False, [1, True]])
@pytest.mark.parametrize(("method", "name", "per_model"), NUMERIC)
def test_booleans_are_not_numbers(method: str, name: str, per_model: bool, value: Any) -> None:
    spec = next(s for s in methods() if s.name == method)
    with pytest.raises(RecipeError) as caught:
        parse_recipe(_recipe(spec, name, per_model, value))
    assert caught.value.field == _field(name, per_model)
    assert "not the boolean" in caught.value.message


@pytest.mark.parametrize("value", [[], [{"filter": "mlp", "value": []}]])
def test_an_empty_list_is_not_a_value(value: Any) -> None:
    spec = next(s for s in methods() if s.name == "ties")
    with pytest.raises(RecipeError) as caught:
        parse_recipe(_recipe(spec, "weight", True, value))
    assert caught.value.field == "models[0].parameters.weight"
    assert "empty list" in caught.value.message


@pytest.mark.parametrize("value", [None, {"weight": 1}, [{"filter": "mlp"}]])
def test_a_value_of_no_form_says_which_forms_exist(value: Any) -> None:
    spec = next(s for s in methods() if s.name == "ties")
    with pytest.raises(RecipeError) as caught:
        parse_recipe(_recipe(spec, "lambda", False, value))
    assert caught.value.field == "parameters.lambda"
    assert "valid boolean" not in caught.value.message
    assert "gradient" in caught.value.message


def test_a_boolean_gradient_is_stepped_not_interpolated() -> None:
    spec = next(s for s in methods() if s.name == "linear")
    recipe = parse_recipe(_recipe(spec, "normalize", False, [True, False]))
    assert recipe.parameters == {"normalize": [True, False]}


def test_large_finite_values_are_still_parameters() -> None:
    spec = next(s for s in methods() if s.name == "task_arithmetic")
    recipe = parse_recipe(_recipe(spec, "weight", True, 1e300))
    assert recipe.models is not None and recipe.models[0].parameters == {"weight": 1e300}
