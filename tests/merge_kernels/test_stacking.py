"""Layer stacking (``slices``) against mergekit 0.1.5 itself, on tiny checkpoints."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from merge_kernels.errors import RecipeError
from merge_kernels.recipe import parse_recipe
from merge_kernels.runner import MergeOptions, close_inputs, plan_merge
from merge_kernels.synthetic import LlamaShape, write_checkpoint
from tests.merge_kernels.stacking_helpers import (
    assert_same_tensors,
    config_of,
    mergekit_merge,
    tureen_merge,
)

SHAPE = LlamaShape(
    vocab_size=32,
    hidden_size=16,
    intermediate_size=24,
    num_hidden_layers=4,
    num_attention_heads=2,
    num_key_value_heads=1,
)


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("stacking")
    three = LlamaShape(**{**SHAPE.__dict__, "num_hidden_layers": 3})
    return {
        "a": str(write_checkpoint(root / "a", SHAPE, seed=1)),
        "b": str(write_checkpoint(root / "b", SHAPE, seed=2, base_seed=1, delta_scale=0.3)),
        "c": str(write_checkpoint(root / "c", three, seed=3)),
    }


def _both(document: dict[str, Any], tmp_path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    ours = tureen_merge(document, tmp_path / "tureen")
    theirs = mergekit_merge(document, tmp_path / "mergekit")
    assert_same_tensors(ours, theirs)
    return config_of(tmp_path / "tureen"), config_of(tmp_path / "mergekit")


def test_frankenmerge_of_one_model_matches_mergekit(models: dict[str, str], tmp_path: Path) -> None:
    document = {
        "merge_method": "passthrough",
        "dtype": "float32",
        "slices": [
            {"sources": [{"model": models["a"], "layer_range": [0, 2]}]},
            {"sources": [{"model": models["a"], "layer_range": [1, 3]}]},
        ],
    }
    ours, theirs = _both(document, tmp_path)
    assert ours["num_hidden_layers"] == theirs["num_hidden_layers"] == 4


def test_frankenmerge_of_two_models_of_different_depths_matches_mergekit(
    models: dict[str, str], tmp_path: Path
) -> None:
    document = {
        "merge_method": "passthrough",
        "dtype": "float32",
        "slices": [
            {"sources": [{"model": models["a"], "layer_range": [0, 3]}]},
            {"sources": [{"model": models["c"], "layer_range": [1, 3]}]},
            {"sources": [{"model": models["a"], "layer_range": [3, 4]}]},
        ],
    }
    ours, theirs = _both(document, tmp_path)
    assert ours["num_hidden_layers"] == theirs["num_hidden_layers"] == 6


def test_single_source_linear_slices_match_mergekit_passthrough(
    models: dict[str, str], tmp_path: Path
) -> None:
    slices = [
        {"sources": [{"model": models["c"], "layer_range": [0, 2]}]},
        {"sources": [{"model": models["b"], "layer_range": [2, 4]}]},
    ]
    ours = tureen_merge({"merge_method": "linear", "slices": slices}, tmp_path / "tureen")
    theirs = mergekit_merge(
        {"merge_method": "passthrough", "slices": slices, "dtype": "float32"}, tmp_path / "mk"
    )
    assert_same_tensors(ours, theirs)
    # embeddings from the first slice's model, the final norm and head from the last one's
    assert config_of(tmp_path / "tureen")["num_hidden_layers"] == 4


def test_slerp_slices_with_gradients_match_mergekit(models: dict[str, str], tmp_path: Path) -> None:
    document = {
        "merge_method": "slerp",
        "base_model": models["a"],
        "dtype": "float32",
        "parameters": {"t": [{"filter": "self_attn", "value": [0, 0.5, 1]}, {"value": [0.8, 0.2]}]},
        "slices": [
            {
                "sources": [
                    {"model": models["a"], "layer_range": [0, 3]},
                    {"model": models["b"], "layer_range": [0, 3]},
                ]
            },
            {
                "sources": [
                    {"model": models["b"], "layer_range": [1, 4]},
                    {"model": models["a"], "layer_range": [1, 4]},
                ],
                "parameters": {"t": [{"filter": "mlp", "value": [1, 0]}]},
            },
            {
                "base_model": models["b"],
                "sources": [
                    {"model": models["a"], "layer_range": [2, 4]},
                    {"model": models["b"], "layer_range": [2, 4]},
                ],
                "parameters": {"t": 0.3},
            },
        ],
    }
    ours, theirs = _both(document, tmp_path)
    assert ours["num_hidden_layers"] == theirs["num_hidden_layers"] == 8


def test_linear_slices_with_per_source_weights_match_mergekit(
    models: dict[str, str], tmp_path: Path
) -> None:
    document = {
        "merge_method": "linear",
        "dtype": "float32",
        "slices": [
            {
                "sources": [
                    {"model": models["a"], "layer_range": [0, 2], "parameters": {"weight": 0.7}},
                    {
                        "model": models["b"],
                        "layer_range": [2, 4],
                        "parameters": {"weight": [0.1, 0.9]},
                    },
                ]
            },
            {
                "sources": [
                    {"model": models["c"], "layer_range": [2, 3], "parameters": {"weight": 1}}
                ]
            },
        ],
    }
    ours, theirs = _both(document, tmp_path)
    assert ours["num_hidden_layers"] == theirs["num_hidden_layers"] == 3


def test_plan_shows_the_layer_map_before_reading_data(
    models: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from merge_kernels.checkpoints.base import Checkpoint

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("the plan read tensor data")

    monkeypatch.setattr(Checkpoint, "read", refuse)
    document = {
        "merge_method": "linear",
        "base_model": models["a"],
        "slices": [
            {"sources": [{"model": models["c"], "layer_range": [0, 1]}]},
            {
                "sources": [
                    {"model": models["a"], "layer_range": [2, 4]},
                    {"model": models["b"], "layer_range": [1, 3], "parameters": {"weight": 2}},
                ]
            },
        ],
    }
    plan, inputs = plan_merge(parse_recipe(document), MergeOptions())
    close_inputs(inputs)
    assert not plan.problems
    report = plan.report()["layer_map"]
    assert report["layers"] == {"model": 3}
    rows = [
        (row["layer"], row["slice"], [(s["model"], s["layer"]) for s in row["sources"]], row["t"])
        for row in report["output_layers"]
    ]
    assert rows == [
        (0, "slices[0]", [(models["c"], 0)], 1.0),
        (1, "slices[1]", [(models["a"], 2), (models["b"], 1)], 0.0),
        (2, "slices[1]", [(models["a"], 3), (models["b"], 2)], 1.0),
    ]
    assert report["outside_layers"][0]["before_layers"]["models"] == [models["c"]]
    assert report["outside_layers"][0]["after_layers"]["models"] == [models["a"], models["b"]]
    by_name = {t.name: t for t in plan.tensors}
    layer = by_name["model.layers.2.mlp.up_proj.weight"]
    assert layer.sources == (
        "model.layers.3.mlp.up_proj.weight",
        "model.layers.2.mlp.up_proj.weight",
    )
    assert [plan.inputs[i].checkpoint.display_name for i in layer.inputs] == [
        models["a"],
        models["b"],
    ]
    assert layer.params is not None
    assert [p.weight for p in layer.params.models] == [1.0, 2.0]  # type: ignore[attr-defined]
    assert plan.config_updates == {"num_hidden_layers": 3}


def _problems(document: dict[str, Any]) -> list[str]:
    plan, inputs = plan_merge(parse_recipe(document), MergeOptions())
    close_inputs(inputs)
    return plan.problems


def test_layer_range_outside_the_model_names_the_field_and_the_count(
    models: dict[str, str],
) -> None:
    problems = _problems(
        {
            "merge_method": "linear",
            "slices": [
                {"sources": [{"model": models["a"], "layer_range": [0, 2]}]},
                {"sources": [{"model": models["c"], "layer_range": [1, 4]}]},
            ],
        }
    )
    assert len(problems) == 1
    assert problems[0].startswith("slices[1].sources[0].layer_range: [1, 4]")
    assert "has 3 layers" in problems[0]
    # One slice whose sources share a partial range is stacked (truncation), not refused.
    assert not _problems(
        {
            "merge_method": "linear",
            "slices": [{"sources": [{"model": models["a"], "layer_range": [0, 2]}]}],
        }
    )


@pytest.mark.parametrize(
    ("document", "field"),
    [
        (
            {
                "merge_method": "linear",
                "models": [{"model": "a"}],
                "slices": [{"sources": [{"model": "a", "layer_range": [0, 1]}]}],
            },
            "slices",
        ),
        (
            {
                "merge_method": "linear",
                "slices": [{"sources": [{"model": "a", "layer_range": [0, 1]}]}],
                "modules": {"text_decoder": {"models": [{"model": "a"}]}},
            },
            "modules",
        ),
        (
            {
                "merge_method": "linear",
                "slices": [
                    {"sources": [{"model": "a", "layer_range": [0, 1]}]},
                    {"sources": [{"model": "a", "layer_range": [3, 1]}]},
                ],
            },
            "slices[1].sources[0].layer_range",
        ),
        (
            {
                "merge_method": "linear",
                "slices": [
                    {"sources": [{"model": "a", "layer_range": [0, 1]}]},
                    {
                        "sources": [
                            {"model": "a", "layer_range": [0, 2]},
                            {"model": "a", "layer_range": [2, 4]},
                        ]
                    },
                ],
            },
            "slices[1].sources[1].model",
        ),
        (
            {
                "merge_method": "ties",
                "base_model": "base",
                "slices": [
                    {"sources": [{"model": "a", "layer_range": [0, 1]}]},
                    {"sources": [{"model": "b", "layer_range": [1, 2]}]},
                ],
            },
            "slices[0].sources",
        ),
        (
            {
                "merge_method": "linear",
                "slices": [
                    {"sources": [{"model": "a", "layer_range": [0, 1]}]},
                    {
                        "sources": [{"model": "b", "layer_range": [1, 2]}],
                        "parameters": {"wieght": 1},
                    },
                ],
            },
            "slices[1].parameters.wieght",
        ),
        (
            {
                "merge_method": "ties",
                "base_model": "a",
                "slices": [
                    {
                        "sources": [
                            {"model": "a", "layer_range": [0, 1]},
                            {"model": "b", "layer_range": [0, 1]},
                        ]
                    },
                    {
                        "sources": [
                            {"model": "a", "layer_range": [1, 2]},
                            {
                                "model": "b",
                                "layer_range": [1, 2],
                                "parameters": {"lambda": 1},
                            },
                        ],
                    },
                ],
            },
            "slices[1].sources[1].parameters.lambda",
        ),
        (
            {
                "merge_method": "linear",
                "slices": [
                    {"sources": [{"model": "a", "layer_range": [0, 1]}]},
                    {"sources": [{"model": "b", "layer_range": [1, 2]}], "residual": 1},
                ],
            },
            "slices[1]",
        ),
        (
            {
                "merge_method": "linear",
                "evaluator": {},
                "slices": [
                    {"sources": [{"model": "a", "layer_range": [0, 1]}]},
                    {"sources": [{"model": "b", "layer_range": [1, 2]}]},
                ],
            },
            "evaluator",
        ),
    ],
)
def test_invalid_stacking_recipes_name_the_field(document: dict[str, Any], field: str) -> None:
    with pytest.raises(RecipeError) as caught:
        parse_recipe(document)
    assert caught.value.field == field


def test_model_wide_trim_is_refused_across_slices(models: dict[str, str]) -> None:
    document = {
        "merge_method": "ties",
        "base_model": models["a"],
        "parameters": {"density": 0.5, "trim_scope": "model"},
        "slices": [
            {
                "sources": [
                    {"model": models["a"], "layer_range": [0, 2]},
                    {"model": models["b"], "layer_range": [0, 2]},
                ]
            },
            {
                "sources": [
                    {"model": models["a"], "layer_range": [0, 2]},
                    {"model": models["b"], "layer_range": [0, 2]},
                ]
            },
        ],
    }
    with pytest.raises(RecipeError) as caught:
        plan_merge(parse_recipe(document), MergeOptions())
    assert caught.value.field == "parameters.trim_scope"
