"""Search specs: dimensions found and named, values decoded, errors naming the field."""

from __future__ import annotations

from typing import Any

import pytest

from merge_kernels.errors import RecipeError
from merge_kernels.search.space import DimensionSpec, SearchSpace, parse_search_spec


def recipe(**parameters: Any) -> dict[str, Any]:
    return {
        "merge_method": "ties",
        "base_model": "./base",
        "models": [
            {"model": "./a", "parameters": {"weight": 1.0, "density": 0.5}},
            {"model": "./b", "parameters": {"weight": 1.0, "density": 0.5}},
        ],
        "parameters": {"lambda": 1.0, **parameters},
    }


def spec(document: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {
        "recipe": document,
        "strategy": "random",
        "budget": {"evaluations": 4},
        "evaluator": {"type": "held_out", "data": "valid.jsonl"},
        **extra,
    }


def test_dimensions_are_named_where_they_stand_and_shared_by_name() -> None:
    document = recipe()
    document["parameters"] = {"lambda": {"search": {"low": 0.5, "high": 2.0}}}
    document["models"][1]["parameters"]["density"] = [{"search": {"values": [0.2, 0.4]}}, 0.9]
    shared = {"search": {"low": 0.5, "high": 1.5, "name": "weight"}}
    for entry in document["models"]:
        entry["parameters"]["weight"] = shared
    space = SearchSpace(document)
    assert space.names == ["weight", "models[1].parameters.density[0]", "parameters.lambda"]
    assert [len(d.paths) for d in space.dimensions] == [2, 1, 1]
    made = space.instantiate(space.decode([0.0] * len(space.names)))
    dumped = made.model_dump(mode="json", exclude_none=True)
    assert dumped["parameters"]["lambda"] == 0.5
    assert [m["parameters"]["weight"] for m in dumped["models"]] == [0.5, 0.5]
    assert dumped["models"][1]["parameters"]["density"] == [0.2, 0.9]
    assert dumped["models"][0]["parameters"]["density"] == 0.5


@pytest.mark.parametrize(
    ("unit", "dimension", "expected"),
    [
        (0.5, {"low": 0.0, "high": 2.0}, 1.0),
        (0.5, {"low": 0.01, "high": 1.0, "log": True}, 0.1),
        (0.34, {"low": 0.0, "high": 1.0, "step": 0.25}, 0.25),
        (1.0, {"low": 0.0, "high": 1.0, "step": 0.3}, 0.9),
        (0.99, {"values": ["a", "b", "c"]}, "c"),
        (0.0, {"values": ["a", "b", "c"]}, "a"),
        (1.7, {"low": 0.0, "high": 2.0}, 2.0),
    ],
)
def test_unit_coordinates_decode_to_values(
    unit: float, dimension: dict[str, Any], expected: object
) -> None:
    value = DimensionSpec.model_validate(dimension).decode(unit)
    assert value == pytest.approx(expected) if isinstance(expected, float) else value == expected


@pytest.mark.parametrize(
    ("document", "field", "words"),
    [
        (spec(recipe()), "recipe", "no search dimension"),
        (
            spec(recipe(density={"search": {"low": 0.9, "high": 0.1}})),
            "recipe.parameters.density.search",
            "low must be below high",
        ),
        (
            spec(recipe(density={"search": {"low": 0.1}})),
            "recipe.parameters.density.search",
            "give low and high",
        ),
        (
            spec(recipe(density={"search": {"low": 0.1, "high": 2.0}})),
            "recipe.parameters.density",
            "at parameters.density=2.0",
        ),
        (
            spec(recipe(lambda_x={"search": {"low": 0.1, "high": 1.0}})),
            "recipe.parameters",
            "lambda_x",
        ),
        (
            spec(recipe(density={"search": {"low": 0.1, "high": 0.9, "lo": 1}})),
            "recipe.parameters.density.search.lo",
            "",
        ),
        (
            spec(recipe(density={"search": {"values": [0.1]}, "x": 1})),
            "recipe.parameters.density",
            "only `search`",
        ),
        (
            spec({**recipe(density={"search": {"values": [0.1, 0.5]}}), "seed": {"search": {}}}),
            "recipe.seed",
            "under parameters",
        ),
        (
            spec(recipe(density={"search": {"values": [0.1, 0.5]}}), strategy="annealing"),
            "strategy.name",
            "grid",
        ),
        (
            spec(recipe(density={"search": {"values": [0.1, 0.5]}}), budget={"evaluations": 0}),
            "budget.evaluations",
            "greater than or equal to 1",
        ),
        (
            {k: v for k, v in spec(recipe()).items() if k != "evaluator"},
            "evaluator",
            "Field required",
        ),
    ],
)
def test_spec_errors_name_the_field(document: dict[str, Any], field: str, words: str) -> None:
    with pytest.raises(RecipeError) as caught:
        parse_search_spec(document)
    assert caught.value.field.startswith(field), caught.value.message
    assert words in caught.value.message


def test_the_same_name_with_different_ranges_is_refused() -> None:
    document = recipe()
    document["models"][0]["parameters"]["density"] = {
        "search": {"low": 0.1, "high": 1.0, "name": "d"}
    }
    document["models"][1]["parameters"]["density"] = {
        "search": {"low": 0.2, "high": 1.0, "name": "d"}
    }
    with pytest.raises(RecipeError) as caught:
        SearchSpace(document)
    assert caught.value.field == "recipe.models[1].parameters.density.search"
    assert "twice" in caught.value.message
