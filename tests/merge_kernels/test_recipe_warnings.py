"""Lenient where mergekit is, strict where it protects: warnings, ``strict``, typos, the base."""

from __future__ import annotations

from typing import Any

import pytest

from merge_kernels.errors import RecipeError
from merge_kernels.parameter_names import MERGEKIT_PARAMETERS, known_parameter_names
from merge_kernels.recipe import parse_recipe
from merge_kernels.registry import methods
from merge_kernels.tensor_parameters import resolve_parameters


def ties(**overrides: Any) -> dict[str, Any]:
    document: dict[str, Any] = {
        "merge_method": "ties",
        "base_model": "org/base",
        "models": [
            {"model": "org/a", "parameters": {"density": 0.2, "weight": 1.0}},
            {"model": "org/b", "parameters": {"density": 0.3, "weight": 0.5}},
        ],
    }
    document.update(overrides)
    return document


def linear(**overrides: Any) -> dict[str, Any]:
    document: dict[str, Any] = {
        "merge_method": "linear",
        "models": [{"model": "org/a"}, {"model": "org/b"}],
    }
    document.update(overrides)
    return document


@pytest.mark.parametrize(
    ("document", "field"),
    [
        (linear(parameters={"density": 0.5}), "parameters.density"),
        (
            {**ties(), "merge_method": "task_arithmetic", "parameters": {"int8_mask": True}},
            "parameters.int8_mask",
        ),
        (
            linear(models=[{"model": "org/a", "parameters": {"gamma": 0.1}}]),
            "models[0].parameters.gamma",
        ),
        (
            ties(models=[{"model": "org/a", "parameters": {"density": 0.2, "lambda": 2.0}}]),
            "models[0].parameters.lambda",
        ),
        (
            ties(models=[{"model": "org/base", "parameters": {"weight": 3}}, *ties()["models"]]),
            "models[0].parameters",
        ),
        (ties(models=[{"model": "org/a"}]), "parameters.density"),
    ],
)
def test_what_mergekit_ignores_is_a_warning_and_an_error_when_strict(
    document: dict[str, Any], field: str
) -> None:
    recipe = parse_recipe(document)
    assert [w for w in recipe.warnings() if w.startswith(f"{field}:")], recipe.warnings()
    with pytest.raises(RecipeError) as caught:
        parse_recipe({**document, "strict": True})
    assert caught.value.field == field
    assert "strict: true" in caught.value.message


def test_a_clean_recipe_has_no_warnings() -> None:
    assert parse_recipe(ties()).warnings() == []
    assert parse_recipe(ties(strict=True)).warnings() == []


@pytest.mark.parametrize(
    ("document", "field", "suggestion"),
    [
        (ties(parameters={"densty": 0.2}), "parameters.densty", "density"),
        (linear(parameters={"lamda": 0.5}), "parameters.lamda", "lambda"),
        (
            linear(models=[{"model": "org/a", "parameters": {"wieght": 1}}]),
            "models[0].parameters.wieght",
            "weight",
        ),
        (
            ties(models=[{"model": "org/base", "parameters": {"desnity": 0.1}}, {"model": "a"}]),
            "models[0].parameters.desnity",
            "density",
        ),
    ],
)
def test_a_name_no_method_knows_stays_an_error_with_a_suggestion(
    document: dict[str, Any], field: str, suggestion: str
) -> None:
    with pytest.raises(RecipeError) as caught:
        parse_recipe(document)
    assert caught.value.field == field
    assert f"did you mean {suggestion!r}" in caught.value.message


def test_unknown_methods_still_suggest_the_closest() -> None:
    with pytest.raises(RecipeError, match="did you mean 'ties'"):
        parse_recipe(ties(merge_method="tie"))


def test_known_names_come_from_the_registry_and_mergekit() -> None:
    known = known_parameter_names()
    assert known >= MERGEKIT_PARAMETERS
    for spec in methods():
        assert spec.method_param_names() | spec.model_param_names() <= known


def test_unused_values_are_not_validated_by_the_method() -> None:
    # density 0 is meaningless for linear (and out of range for TIES): ignored, not refused.
    recipe = parse_recipe(linear(parameters={"density": 0.0, "t": "anything"}))
    assert len(recipe.warnings()) == 2
    # the base's own parameters are not read either
    parse_recipe(
        ties(models=[{"model": "org/base", "parameters": {"density": 7}}, *ties()["models"]])
    )


def test_missing_density_is_assumed_one_and_said_so() -> None:
    recipe = parse_recipe(
        ties(
            models=[
                {"model": "org/a", "parameters": {"weight": 1.0}},
                {"model": "org/b", "parameters": {"density": 0.5}},
                {"model": "org/c"},
            ]
        )
    )
    (warning,) = recipe.warnings()
    assert "models[0], models[2]" in warning and "assumed 1" in warning
    for reference in ("peft", "mergekit", "paper"):
        for method in ("ties", "dare_ties", "dare_linear"):
            found = parse_recipe(
                ties(merge_method=method, reference=reference, models=[{"model": "org/a"}])
            )
            assert any("assumed 1" in w for w in found.warnings()), (method, reference)
    # a top-level density covers every model
    assert (
        parse_recipe(ties(models=[{"model": "org/a"}], parameters={"density": 0.4})).warnings()
        == []
    )


def test_a_listed_base_is_not_merged_however_spelled(tmp_path: Any) -> None:
    for spelling in ("org/base", {"repo": "org/base"}):
        recipe = parse_recipe(ties(models=[{"model": spelling}, *ties()["models"]]))
        assert [i for i, _ in recipe.merged_models()] == [1, 2]
    (tmp_path / "base").mkdir()
    for spelling in ("./base", "base/", str(tmp_path / "base"), {"path": "base"}):
        recipe = parse_recipe(
            ties(base_model="base", models=[{"model": spelling}, *ties()["models"]]),
            base_dir=tmp_path,
        )
        assert [i for i, _ in recipe.merged_models()] == [1, 2], spelling
    # linear merges the base like any input: listed under another spelling, not appended
    recipe = parse_recipe(
        linear(base_model="base", models=[{"model": "./base"}]), base_dir=tmp_path
    )
    assert [i for i, _ in recipe.merged_models()] == [0]


def test_the_base_alone_is_accepted_for_task_vector_methods_only() -> None:
    for method in ("task_arithmetic", "ties", "dare_linear", "dare_ties"):
        recipe = parse_recipe(
            {
                "merge_method": method,
                "base_model": "org/base+org/adapter",
                "models": [{"model": "org/base+org/adapter"}],
                "parameters": {"normalize": True},
            }
        )
        assert recipe.base_only() and recipe.merged_models() == []
        assert resolve_parameters(recipe, "w", 0.5).models == ()
    with pytest.raises(RecipeError, match="exactly two models"):
        parse_recipe(
            {
                "merge_method": "slerp",
                "base_model": "org/base",
                "models": [{"model": "org/base"}],
                "parameters": {"t": 0.5},
            }
        )


def test_name_and_strict_do_not_change_the_fingerprint() -> None:
    plain = parse_recipe(ties())
    assert plain.fingerprint() == parse_recipe(ties(name="step-one", strict=True)).fingerprint()
    assert parse_recipe(ties(name="step-one")).name == "step-one"
    # warnings are not part of it either
    noisy = parse_recipe(ties(parameters={"rescale": True}))
    assert noisy.warnings() and noisy.fingerprint() != plain.fingerprint()
