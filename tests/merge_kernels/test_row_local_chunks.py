"""Methods that work row by row (ranks or angles within a row) merge large tensors of two or
more axes in row chunks, bit-identical to merging them whole; 1-D tensors stay whole."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from merge_kernels.recipe import parse_recipe
from merge_kernels.runner import MergeOptions, close_inputs, plan_merge, run_merge
from merge_kernels.synthetic import LlamaShape, write_checkpoint

SHAPE = LlamaShape(hidden_size=32, intermediate_size=64, num_hidden_layers=2, vocab_size=96)
MODELS = [{"model": "ft1"}, {"model": "ft2"}]


def _with(model: dict[str, Any], **parameters: float) -> dict[str, Any]:
    return {"model": model["model"], "parameters": parameters}


RECIPES: dict[str, dict[str, Any]] = {
    "della": {
        "merge_method": "della",
        "base_model": "base",
        "models": [_with(m, density=0.5, epsilon=0.2) for m in MODELS],
    },
    "della_linear": {
        "merge_method": "della_linear",
        "base_model": "base",
        "models": [_with(m, density=0.4, epsilon=0.1) for m in MODELS],
    },
    "model_stock_filter_wise": {
        "merge_method": "model_stock",
        "base_model": "base",
        "models": MODELS,
        "parameters": {"filter_wise": True},
    },
    "nuslerp": {
        "merge_method": "nuslerp",
        "parameters": {"nuslerp_flatten": False},  # one slerp per row
        "models": [_with(MODELS[0], weight=0.3), _with(MODELS[1], weight=0.7)],
    },
}  # fmt: skip


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("row-local")
    write_checkpoint(root / "base", SHAPE, seed=0)
    for index in (1, 2):
        write_checkpoint(root / f"ft{index}", SHAPE, seed=index, base_seed=0, delta_scale=0.05)
    return root


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_row_chunks_give_the_whole_tensors_bits(models: Path, tmp_path: Path, name: str) -> None:
    recipe = parse_recipe(RECIPES[name])
    chunked = MergeOptions(base_dir=models, chunk_elements=200)
    plan, inputs = plan_merge(recipe, chunked)
    close_inputs(inputs)
    rows = {t.name: t.rows_per_chunk for t in plan.tensors}
    assert any(r is not None for n, r in rows.items() if n.endswith("mlp.up_proj.weight"))
    assert all(r is None for n, r in rows.items() if n.endswith("norm.weight"))  # 1-D
    run_merge(recipe, tmp_path / "chunked", chunked)
    run_merge(recipe, tmp_path / "whole", MergeOptions(base_dir=models))
    got = load_file(tmp_path / "chunked" / "model.safetensors")
    expected = load_file(tmp_path / "whole" / "model.safetensors")
    assert got.keys() == expected.keys()
    for key in expected:
        assert torch.equal(got[key], expected[key]), key


def test_a_whole_tensor_rescale_keeps_della_whole(models: Path) -> None:
    document = RECIPES["della"] | {"parameters": {"rescale_method": "l1"}}
    plan, inputs = plan_merge(
        parse_recipe(document), MergeOptions(base_dir=models, chunk_elements=200)
    )
    close_inputs(inputs)
    assert all(t.rows_per_chunk is None for t in plan.tensors)
