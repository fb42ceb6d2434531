"""The recipe document: mergekit compatibility, strict validation, parameter resolution."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from merge_kernels.errors import RecipeError
from merge_kernels.methods.task_arithmetic import SparseModelParams, TiesParams
from merge_kernels.recipe import load_recipe, parse_recipe
from merge_kernels.tensor_parameters import resolve_parameters

MERGEKIT_TIES = """
models:
  - model: psmathur/orca_mini_v3_13b
    parameters:
      density: [1, 0.7, 0.1] # density gradient
      weight: 1.0
  - model: garage-bAInd/Platypus2-13B
    parameters:
      density: 0.5
      weight: [0, 0.3, 0.7, 1] # weight gradient
  - model: WizardLM/WizardMath-13B-V1.0
    parameters:
      density: 0.33
      weight:
        - filter: mlp
          value: 0.5
        - value: 0
merge_method: ties
base_model: TheBloke/Llama-2-13B-fp16
parameters:
  normalize: true
  int8_mask: true
dtype: float16
"""

MERGEKIT_SLERP = """
slices:
  - sources:
      - model: OpenPipe/mistral-ft-optimized-1218
        layer_range: [0, 32]
      - model: mlabonne/NeuralHermes-2.5-Mistral-7B
        layer_range: [0, 32]
merge_method: slerp
base_model: OpenPipe/mistral-ft-optimized-1218
parameters:
  t:
    - filter: self_attn
      value: [0, 0.5, 0.3, 0.7, 1]
    - filter: mlp
      value: [1, 0.5, 0.7, 0.3, 0]
    - value: 0.5
dtype: bfloat16
"""


def recipe(**overrides: Any) -> dict[str, Any]:
    document: dict[str, Any] = {
        "merge_method": "ties",
        "base_model": "org/base",
        "models": [
            {"model": "org/a", "parameters": {"density": 0.2, "weight": 1.0}},
            {"model": "org/b", "parameters": {"density": 0.2, "weight": 0.5}},
        ],
    }
    document.update(overrides)
    return document


def field_of(document: dict[str, Any]) -> str:
    with pytest.raises(RecipeError) as caught:
        parse_recipe(document)
    return caught.value.field


def test_mergekit_ties_config_is_accepted_unchanged(tmp_path: Path) -> None:
    path = tmp_path / "ties.yml"
    path.write_text(MERGEKIT_TIES)
    parsed = load_recipe(path)
    assert parsed.merge_method == "ties"
    assert [str(m.model) for _, m in parsed.merged_models()] == [
        "psmathur/orca_mini_v3_13b",
        "garage-bAInd/Platypus2-13B",
        "WizardLM/WizardMath-13B-V1.0",
    ]
    assert parsed.output_dtype() == "float16"


def test_mergekit_gradients_and_filters_resolve_per_tensor() -> None:
    parsed = parse_recipe(yaml.safe_load(MERGEKIT_TIES))
    first = resolve_parameters(parsed, "model.layers.0.mlp.up_proj.weight", 0.0)
    last = resolve_parameters(parsed, "model.layers.39.self_attn.q_proj.weight", 1.0)
    middle = resolve_parameters(parsed, "model.layers.20.self_attn.q_proj.weight", 0.5)
    densities = [
        [p.density for p in r.models if isinstance(p, SparseModelParams)]
        for r in (first, middle, last)
    ]
    assert densities[0] == [1.0, 0.5, 0.33]
    assert densities[1] == pytest.approx([0.7, 0.5, 0.33])
    assert densities[2] == pytest.approx([0.1, 0.5, 0.33])
    weights = [
        [p.weight for p in r.models if isinstance(p, SparseModelParams)]
        for r in (first, middle, last)
    ]
    # model 1: gradient [0, .3, .7, 1]; model 2: 0.5 on mlp tensors, else 0
    assert weights[0] == pytest.approx([1.0, 0.0, 0.5])
    assert weights[1] == pytest.approx([1.0, 0.5, 0.0])
    assert weights[2] == pytest.approx([1.0, 1.0, 0.0])
    assert isinstance(first.method, TiesParams) and first.method.int8_mask


def test_mergekit_single_slice_slerp_is_accepted() -> None:
    parsed = parse_recipe(yaml.safe_load(MERGEKIT_SLERP))
    assert parsed.layer_range == (0, 32)
    assert len(parsed.merged_models()) == 1
    attention = resolve_parameters(parsed, "model.layers.8.self_attn.o_proj.weight", 0.25)
    mlp = resolve_parameters(parsed, "model.layers.8.mlp.down_proj.weight", 0.25)
    norm = resolve_parameters(parsed, "model.norm.weight", 1.0)
    assert attention.method.t == pytest.approx(0.5)  # type: ignore[attr-defined]
    assert mlp.method.t == pytest.approx(0.5)  # type: ignore[attr-defined]
    assert norm.method.t == pytest.approx(0.5)  # type: ignore[attr-defined]
    early = resolve_parameters(parsed, "model.layers.2.self_attn.o_proj.weight", 0.1)
    assert early.method.t == pytest.approx(0.2)  # type: ignore[attr-defined]


def test_model_parameters_take_precedence_over_recipe_parameters() -> None:
    parsed = parse_recipe(
        recipe(
            parameters={"density": 0.9, "weight": 2.0},
            models=[{"model": "org/a", "parameters": {"density": 0.1}}, {"model": "org/b"}],
        )
    )
    resolved = resolve_parameters(parsed, "w", 0.0)
    assert [(p.density, p.weight) for p in resolved.models] == [(0.1, 2.0), (0.9, 2.0)]  # type: ignore[attr-defined]


def test_a_filter_that_matches_nothing_falls_through_to_the_next_level() -> None:
    parsed = parse_recipe(
        recipe(
            parameters={"density": 0.4},
            models=[
                {"model": "org/a", "parameters": {"density": [{"filter": "mlp", "value": 0.1}]}},
                {"model": "org/b", "parameters": {"density": 0.3}},
            ],
        )
    )
    mlp = resolve_parameters(parsed, "layers.0.mlp.w", 0.0)
    attn = resolve_parameters(parsed, "layers.0.attn.w", 0.0)
    assert mlp.models[0].density == 0.1  # type: ignore[attr-defined]
    assert attn.models[0].density == 0.4  # type: ignore[attr-defined]


def test_reference_sets_every_default_at_once() -> None:
    peft = resolve_parameters(parse_recipe(recipe()), "w", 0.0).method
    mergekit = resolve_parameters(parse_recipe(recipe(reference="mergekit")), "w", 0.0).method
    paper = resolve_parameters(parse_recipe(recipe(reference="paper")), "w", 0.0).method
    assert (
        isinstance(peft, TiesParams)
        and isinstance(mergekit, TiesParams)
        and isinstance(paper, TiesParams)
    )
    assert (peft.weighted_election, peft.divisor, peft.trim_scope) == (False, "count", "tensor")
    assert (mergekit.weighted_election, mergekit.divisor) == (True, "weight_sum")
    assert (paper.trim_ties, paper.trim_scope, paper.zero_sign) == (
        "threshold",
        "model",
        "majority",
    )
    explicit = parse_recipe(recipe(reference="mergekit", parameters={"divisor": "count"}))
    assert resolve_parameters(explicit, "w", 0.0).method.divisor == "count"  # type: ignore[attr-defined]


def test_base_listed_among_models_is_not_merged_with_itself() -> None:
    parsed = parse_recipe(recipe(models=[{"model": "org/base"}, *recipe()["models"]]))
    assert [str(m.model) for _, m in parsed.merged_models()] == ["org/a", "org/b"]


def test_linear_includes_the_base_as_an_input_like_mergekit() -> None:
    parsed = parse_recipe(
        {"merge_method": "linear", "base_model": "org/base", "models": [{"model": "org/a"}]}
    )
    assert [str(m.model) for _, m in parsed.merged_models()] == ["org/a", "org/base"]


@pytest.mark.parametrize(
    ("document", "field"),
    [
        (recipe(unknown_key=1), "unknown_key"),
        (recipe(merge_method="magic"), "merge_method"),
        (recipe(base_model=None), "base_model"),
        (
            recipe(models=[{"model": "org/a", "parameters": {"density": 0.0}}]),
            "models[0].parameters.density",
        ),
        (
            recipe(models=[{"model": "org/a", "parameters": {"density": 1.5}}]),
            "models[0].parameters.density",
        ),
        (recipe(parameters={"density": -0.1}), "parameters.density"),
        (recipe(parameters={"densty": 0.1}), "parameters.densty"),
        (
            recipe(
                models=[{"model": "org/a", "parameters": {"density": 0.1, "normalize": True}}],
                strict=True,
            ),
            "models[0].parameters.normalize",
        ),
        (recipe(majority_sign_method="total", strict=True), "majority_sign_method"),
        (recipe(parameters={"majority_sign_method": "mass"}), "parameters.majority_sign_method"),
        (recipe(reference="numpy"), "reference"),
        (recipe(dtype="float8"), "dtype"),
        (recipe(models=[]), "models"),
        (
            recipe(models=[{"model": "org/a", "parameters": {"density": 0.5}, "extra": 1}]),
            "models[0].extra",
        ),
        (
            {
                "merge_method": "linear",
                "models": [
                    {"model": "a", "parameters": {"weight": 1}},
                    {"model": "b", "parameters": {"weight": -1}},
                ],
            },
            "parameters",
        ),
        (
            {
                "merge_method": "slerp",
                "base_model": "a",
                "models": [{"model": "b"}, {"model": "c"}],
                "parameters": {"t": 0.5},
            },
            "models",
        ),
        ({"merge_method": "slerp", "base_model": "a", "models": [{"model": "b"}]}, "parameters.t"),
        (
            {
                "merge_method": "slerp",
                "base_model": "a",
                "parameters": {"t": 0.5},
                "slices": [
                    {
                        "sources": [
                            {"model": "a", "layer_range": [0, 16]},
                            {"model": "b", "layer_range": [0, 16]},
                        ]
                    },
                    {
                        "sources": [
                            {"model": "a", "layer_range": [16, 32]},
                            {"model": "b", "layer_range": [16, 30]},
                        ]
                    },
                ],
            },
            "slices[1].sources",
        ),
    ],
)
def test_invalid_recipes_name_the_field(document: dict[str, Any], field: str) -> None:
    assert field_of(document) == field


def test_error_messages_say_what_is_allowed() -> None:
    with pytest.raises(RecipeError, match=r"allowed: .*dare_ties.*linear.*slerp.*ties"):
        parse_recipe(recipe(merge_method="magic"))
    with pytest.raises(RecipeError, match="needs base_model"):
        parse_recipe(recipe(base_model=None))
    with pytest.raises(RecipeError, match="exactly two models"):
        parse_recipe(
            {
                "merge_method": "slerp",
                "base_model": "a",
                "models": [{"model": "b"}, {"model": "c"}],
                "parameters": {"t": 0.5},
            }
        )
    with pytest.raises(RecipeError, match="sum to 0"):
        parse_recipe(
            {
                "merge_method": "linear",
                "models": [
                    {"model": "a", "parameters": {"weight": 2}},
                    {"model": "b", "parameters": {"weight": -2}},
                ],
            }
        )


def test_fingerprint_ignores_formatting_but_not_meaning() -> None:
    a = parse_recipe(recipe())
    b = parse_recipe(yaml.safe_load(yaml.safe_dump(recipe())))
    c = parse_recipe(recipe(seed=1))
    assert a.fingerprint() == b.fingerprint() != c.fingerprint()


def test_yaml_round_trip() -> None:
    parsed = parse_recipe(yaml.safe_load(MERGEKIT_TIES))
    again = parse_recipe(yaml.safe_load(parsed.to_yaml()))
    assert again.fingerprint() == parsed.fingerprint()


@pytest.mark.parametrize(
    ("sources", "field"),
    [
        (["not-a-mapping"], "slices[0].sources[0]"),
        ([{"model": "a"}], "slices[0].sources[0].layer_range"),
        ([{"model": "a", "layer_range": [0, "x"]}], "slices[0].sources[0].layer_range"),
    ],
)
def test_malformed_slices_name_the_field(sources: list[Any], field: str) -> None:
    document = {"merge_method": "linear", "slices": [{"sources": sources}]}
    assert field_of(document) == field
