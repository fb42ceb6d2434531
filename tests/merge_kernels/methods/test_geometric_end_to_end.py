"""The geometric and selection methods end to end: tureen's streaming runner against a whole
mergekit 0.1.5 merge of the same configuration, on tiny Llama checkpoints.

This checks what per-tensor parity cannot: which inputs each method gets (a base listed in
``models`` or appended, an optional base, a base that is one more input), per-model
parameters and gradients over layers, and the recipe rules on how many models each takes.
Gradients here are filtered to tensors inside the layers: outside them (final norm, LM
head) mergekit 0.1.5 evaluates gradients at t = 0, where tureen's layer positions put them
at 1.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from merge_kernels.errors import RecipeError
from merge_kernels.recipe import parse_recipe
from merge_kernels.runner import MergeOptions, close_inputs, open_inputs, plan_merge, run_merge
from merge_kernels.synthetic import LlamaShape, write_checkpoint

SHAPE = LlamaShape(hidden_size=32, intermediate_size=64, num_hidden_layers=2, vocab_size=96)
TOLERANCE = 1e-6


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("models")
    write_checkpoint(root / "base", SHAPE, seed=0)
    for index in (1, 2, 3):
        write_checkpoint(root / f"ft{index}", SHAPE, seed=index, base_seed=0, delta_scale=0.3)
    return root


def entry(name: str, **parameters: Any) -> dict[str, Any]:
    return {"model": name, "parameters": parameters} if parameters else {"model": name}


CONFIGS: dict[str, dict[str, Any]] = {
    "passthrough_base_alone": {
        "merge_method": "passthrough",
        "base_model": "base",
        "models": [entry("base", scale=0.5)],
    },
    "passthrough_one_model": {"merge_method": "passthrough", "models": [entry("ft1")]},
    "nuslerp_base_appended": {
        "merge_method": "nuslerp",
        "base_model": "base",
        "models": [entry("ft1", weight=1.0), entry("ft2", weight=3.0)],
    },
    "nuslerp_base_listed_rows": {
        "merge_method": "nuslerp",
        "base_model": "base",
        "parameters": {"nuslerp_flatten": False},
        "models": [
            entry("base"),
            entry("ft1", weight=[{"filter": "mlp", "value": [1.0, 2.0]}, {"value": 1.5}]),
            entry("ft2", weight=1.0),
        ],
    },
    "nuslerp_no_base_columns": {
        "merge_method": "nuslerp",
        "parameters": {"nuslerp_flatten": False, "nuslerp_row_wise": True},
        "models": [entry("ft1", weight=2.0), entry("ft2", weight=1.0)],
    },
    "karcher_base_is_an_input": {
        "merge_method": "karcher",
        "base_model": "base",
        "parameters": {"max_iter": 5},
        "models": [entry("ft1"), entry("ft2")],
    },
    "multislerp_base": {
        "merge_method": "multislerp",
        "base_model": "base",
        "models": [entry("ft1", weight=0.5), entry("ft2", weight=1.0), entry("ft3", weight=2.0)],
    },
    "multislerp_no_base": {
        "merge_method": "multislerp",
        "parameters": {"normalize_weights": False},
        "models": [entry("ft1", weight=0.25), entry("ft2", weight=0.75)],
    },
    "nearswap": {
        "merge_method": "nearswap",
        "base_model": "base",
        "parameters": {"t": [{"filter": "self_attn", "value": [0.001, 0.05]}, {"value": 0.01}]},
        "models": [entry("ft1")],
    },
    "arcee_fusion": {
        "merge_method": "arcee_fusion",
        "base_model": "base",
        "models": [entry("base"), entry("ft1")],
    },
}


def absolute(config: dict[str, Any], root: Path) -> dict[str, Any]:
    """``config`` with every model name as an absolute path (mergekit resolves no others)."""
    document = dict(config, dtype="float32")
    if "base_model" in document:
        document["base_model"] = str(root / document["base_model"])
    document["models"] = [dict(e, model=str(root / e["model"])) for e in config["models"]]
    return document


def mergekit_output(document: dict[str, Any], out: Path) -> dict[str, torch.Tensor]:
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge as mergekit_run
    from mergekit.options import MergeOptions as MergekitOptions

    mergekit_run(
        MergeConfiguration.model_validate(document),
        str(out),
        options=MergekitOptions(device="cpu", copy_tokenizer=False),
    )
    return load_file(out / "model.safetensors")


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_streaming_merge_matches_mergekit(models: Path, tmp_path: Path, name: str) -> None:
    document = absolute(CONFIGS[name], models)
    theirs = mergekit_output(document, tmp_path / "mergekit")
    run_merge(parse_recipe(document), tmp_path / "tureen")
    ours = load_file(tmp_path / "tureen" / "model.safetensors")
    assert ours.keys() == theirs.keys()
    for tensor, expected in theirs.items():
        got = ours[tensor]
        assert got.dtype == expected.dtype == torch.float32
        difference = torch.linalg.vector_norm((got - expected).double())
        assert float(difference) <= TOLERANCE * float(torch.linalg.vector_norm(expected.double()))


def test_row_chunks_of_row_wise_nuslerp_give_the_whole_tensor(models: Path, tmp_path: Path) -> None:
    document = absolute(CONFIGS["nuslerp_base_listed_rows"], models)
    chunked = MergeOptions(chunk_elements=200)
    for parameters, chunks in (({"nuslerp_flatten": False}, True), ({}, False)):
        plan, inputs = plan_merge(parse_recipe(dict(document, parameters=parameters)), chunked)
        close_inputs(inputs)
        assert any(t.rows_per_chunk is not None for t in plan.tensors) is chunks
    run_merge(parse_recipe(document), tmp_path / "whole")
    run_merge(parse_recipe(document), tmp_path / "rows", chunked)
    whole = load_file(tmp_path / "whole" / "model.safetensors")
    rows = load_file(tmp_path / "rows" / "model.safetensors")
    for name, tensor in whole.items():
        assert torch.equal(rows[name], tensor), name


@pytest.mark.parametrize(
    ("with_base", "roles"), [(True, ["base", "model", "model"]), (False, ["model", "model"])]
)
def test_an_optional_base_is_opened_as_the_base(
    models: Path, with_base: bool, roles: list[str]
) -> None:
    config = dict(CONFIGS["nuslerp_base_listed_rows"])
    if not with_base:
        config = {k: v for k, v in config.items() if k != "base_model"}
        config["models"] = config["models"][1:]
    recipe = parse_recipe(absolute(config, models))
    assert [index for index, _ in recipe.merged_models()] == ([1, 2] if with_base else [0, 1])
    inputs = open_inputs(recipe, MergeOptions())
    try:
        assert [item.role for item in inputs] == roles
    finally:
        close_inputs(inputs)


@pytest.mark.parametrize(
    ("config", "field", "message"),
    [
        (
            {"merge_method": "passthrough", "base_model": "b", "models": [entry("m")]},
            "models",
            "at most 1 models (base_model included)",
        ),
        (
            {"merge_method": "nuslerp", "base_model": "b", "models": [entry("b"), entry("m")]},
            "models",
            "at least 2 models besides the base",
        ),
        (
            {"merge_method": "nuslerp", "models": [entry(f"m{i}") for i in range(3)]},
            "models",
            "at most 2",
        ),
        ({"merge_method": "nearswap", "models": [entry("m")]}, "base_model", "needs base_model"),
        (
            {"merge_method": "arcee_fusion", "base_model": "b", "models": [entry("m"), entry("n")]},
            "models",
            "at most 1",
        ),
        (
            {"merge_method": "nearswap", "base_model": "b", "models": [entry("m")]},
            "parameters.t",
            "",
        ),
        (
            {
                "merge_method": "karcher",
                "strict": True,
                "models": [entry("m", weight=1.0)],
            },
            "models[0].parameters.weight",
            "karcher does not use 'weight'",
        ),
    ],
)
def test_inputs_and_parameters_are_checked_like_mergekit(
    config: dict[str, Any], field: str, message: str
) -> None:
    with pytest.raises(RecipeError) as caught:
        parse_recipe(config)
    assert caught.value.field == field
    assert message in caught.value.message
