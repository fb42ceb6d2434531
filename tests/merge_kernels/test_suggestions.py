"""Misspelled methods, parameters and recipe keys get a "did you mean" hint."""

from __future__ import annotations

import pytest

from merge_kernels.errors import RecipeError
from merge_kernels.recipe import parse_recipe
from merge_kernels.suggestions import did_you_mean


def _message(document: dict[str, object]) -> RecipeError:
    with pytest.raises(RecipeError) as error:
        parse_recipe(document)
    return error.value


def test_a_misspelled_method() -> None:
    error = _message({"merge_method": "tis", "models": [{"model": "a"}]})
    assert error.field == "merge_method"
    assert "did you mean 'ties'?" in error.message and "allowed: " in error.message


def test_a_misspelled_parameter() -> None:
    error = _message(
        {
            "merge_method": "ties",
            "base_model": "b",
            "models": [{"model": "a"}],
            "parameters": {"densty": 0.2},
        }
    )
    assert error.field == "parameters.densty"
    assert "did you mean 'density'?" in error.message


def test_a_misspelled_per_model_parameter() -> None:
    error = _message(
        {
            "merge_method": "ties",
            "base_model": "b",
            "models": [{"model": "a", "parameters": {"wieght": 1.0}}],
        }
    )
    assert error.field == "models[0].parameters.wieght"
    assert "did you mean 'weight'?" in error.message


def test_a_misspelled_top_level_key_is_named_before_the_missing_one() -> None:
    error = _message({"merge_methd": "ties", "models": [{"model": "a"}]})
    assert error.field == "merge_methd"
    assert error.message == "merge_methd: unknown key; did you mean 'merge_method'?"


def test_no_hint_for_a_word_like_nothing() -> None:
    assert did_you_mean("zzzz", ["ties", "linear"]) == ""
    error = _message({"merge_method": "zzzz", "models": [{"model": "a"}]})
    assert "did you mean" not in error.message
