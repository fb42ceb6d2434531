"""Configs mergekit 0.1.5 accepts, merged by tureen and by mergekit itself, compared.

Each document carries something mergekit tolerates: parameters the method ignores, the base
listed among the models (with and without parameters of its own), ``density`` left unset.
tureen accepts them with warnings and must write what mergekit writes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from merge_kernels.recipe import parse_recipe
from merge_kernels.runner import MergeOptions, run_merge
from merge_kernels.synthetic import LlamaShape, write_checkpoint

mergekit_config = pytest.importorskip("mergekit.config")
mergekit_merge = pytest.importorskip("mergekit.merge")
mergekit_options = pytest.importorskip("mergekit.options")

SHAPE = LlamaShape(
    vocab_size=32,
    hidden_size=16,
    intermediate_size=24,
    num_hidden_layers=2,
    num_attention_heads=2,
    num_key_value_heads=1,
)


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("models")
    write_checkpoint(root / "base", SHAPE, seed=0)
    write_checkpoint(root / "a", SHAPE, seed=1, base_seed=0, delta_scale=0.5)
    write_checkpoint(root / "b", SHAPE, seed=2, base_seed=0, delta_scale=0.5)
    return root


def _documents(root: Path) -> dict[str, dict[str, Any]]:
    base, a, b = (str(root / name) for name in ("base", "a", "b"))
    return {
        "task_arithmetic, base listed with a weight, unused density and int8_mask": {
            "merge_method": "task_arithmetic",
            "base_model": base,
            "models": [
                {"model": base, "parameters": {"weight": 5.0}},
                {"model": a, "parameters": {"weight": 1.0, "density": 0.3}},
                {"model": b, "parameters": {"weight": 0.5}},
            ],
            "parameters": {"int8_mask": True, "lambda": 0.8},
        },
        "ties without density, base listed with parameters": {
            "merge_method": "ties",
            "base_model": base,
            "models": [
                {"model": base, "parameters": {"weight": 2.0, "density": 0.1}},
                {"model": a, "parameters": {"weight": 1.0}},
                {"model": b, "parameters": {"weight": 0.5}},
            ],
            "parameters": {"normalize": True, "int8_mask": True},
        },
        "ties with density, base listed bare": {
            "merge_method": "ties",
            "base_model": base,
            "models": [
                {"model": base},
                {"model": a, "parameters": {"weight": 1.0, "density": 0.5}},
                {"model": b, "parameters": {"weight": 0.7, "density": 0.3}},
            ],
        },
        "dare_linear without density (nothing dropped)": {
            "merge_method": "dare_linear",
            "base_model": base,
            "models": [
                {"model": base, "parameters": {"weight": 3.0}},
                {"model": a, "parameters": {"weight": 1.0}},
                {"model": b, "parameters": {"weight": 0.5}},
            ],
        },
        "linear, base listed: an input with its weight; density ignored": {
            "merge_method": "linear",
            "base_model": base,
            "models": [
                {"model": base, "parameters": {"weight": 2.0}},
                {"model": a, "parameters": {"weight": 1.0, "density": 0.4}},
            ],
        },
        "linear, base not listed: appended as an input": {
            "merge_method": "linear",
            "base_model": base,
            "models": [{"model": a}, {"model": b}],
            "parameters": {"weight": 1.0},
        },
        "slerp, base listed, a weight slerp ignores": {
            "merge_method": "slerp",
            "base_model": base,
            "models": [{"model": base}, {"model": a, "parameters": {"weight": 0.2}}],
            "parameters": {"t": 0.3},
        },
    }


CASES = list(_documents(Path("/")))


def _mergekit(document: dict[str, Any], out: Path) -> dict[str, torch.Tensor]:
    config = mergekit_config.MergeConfiguration.model_validate({**document, "dtype": "float32"})
    mergekit_merge.run_merge(config, str(out), mergekit_options.MergeOptions(copy_tokenizer=False))
    return load_file(out / "model.safetensors")


@pytest.mark.parametrize("case", CASES)
def test_tureen_writes_what_mergekit_writes(models: Path, tmp_path: Path, case: str) -> None:
    document = _documents(models)[case]
    recipe = parse_recipe({**document, "reference": "mergekit"})
    ours = load_file(
        run_merge(recipe, tmp_path / "tureen", MergeOptions()).out_dir / "model.safetensors"
    )
    theirs = _mergekit(document, tmp_path / "mergekit")
    assert ours.keys() == theirs.keys()
    for name, tensor in theirs.items():
        assert torch.allclose(ours[name], tensor, rtol=1e-5, atol=1e-6), name


def test_the_base_spelled_differently_is_still_the_base(models: Path, tmp_path: Path) -> None:
    # mergekit compares the spellings as written (and would merge "./base" as one more
    # input); tureen recognizes one checkpoint however its path is written.
    document = _documents(models)["ties with density, base listed bare"]
    respelled = {
        **document,
        "models": [
            {"model": "./base/", "parameters": {"weight": 9.0}},
            *document["models"][1:],
        ],
    }
    recipe = parse_recipe({**respelled, "reference": "mergekit"}, base_dir=models)
    assert [index for index, _ in recipe.merged_models()] == [1, 2]
    assert any("models[0] is the base_model" in warning for warning in recipe.warnings())
    ours = load_file(
        run_merge(recipe, tmp_path / "tureen", MergeOptions(base_dir=models)).out_dir
        / "model.safetensors"
    )
    theirs = _mergekit(document, tmp_path / "mergekit")
    for name, tensor in theirs.items():
        assert torch.allclose(ours[name], tensor, rtol=1e-5, atol=1e-6), name
