"""DELLA, Breadcrumbs, SCE, Model Stock and RAM through the streaming runner on checkpoints."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from merge_kernels.methods.kernel import TensorContext
from merge_kernels.recipe import parse_recipe
from merge_kernels.registry import get_method
from merge_kernels.runner import MergeOptions, run_merge
from merge_kernels.synthetic import LlamaShape, write_checkpoint
from merge_kernels.tensor_parameters import resolve_parameters

SHAPE = LlamaShape(hidden_size=16, intermediate_size=24, num_hidden_layers=1, vocab_size=40)
MODELS = [{"model": f"ft{i}"} for i in (1, 2, 3)]

RECIPES: dict[str, dict[str, Any]] = {
    "della": {"parameters": {"density": 0.5, "epsilon": 0.2}, "seed": 3},
    "della_linear": {"parameters": {"density": 0.4}, "reference": "mergekit"},
    "breadcrumbs": {"parameters": {"density": 0.5, "gamma": 0.05, "weight": 0.6}},
    "breadcrumbs_ties": {"parameters": {"density": 0.5}, "reference": "mergekit"},
    "sce": {"parameters": {"select_topk": 0.5}},
    "model_stock": {"parameters": {"filter_wise": True}},
    "ram": {"parameters": {"epsilon": 0.002}},
    "ramplus_tl": {"parameters": {"epsilon": 0.002, "r": 0.3}},
}


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("models")
    write_checkpoint(root / "base", SHAPE, seed=0)
    for index in (1, 2, 3):
        write_checkpoint(root / f"ft{index}", SHAPE, seed=index, base_seed=0, delta_scale=0.05)
    return root


def document(method: str) -> dict[str, Any]:
    return {"merge_method": method, "base_model": "base", "models": MODELS, **RECIPES[method]}


def in_memory(root: Path, method: str) -> dict[str, torch.Tensor]:
    recipe = parse_recipe(document(method))
    spec = recipe.method
    base = load_file(root / "base" / "model.safetensors")
    loaded = [load_file(root / f"ft{i}" / "model.safetensors") for i in (1, 2, 3)]
    out = {}
    for name, tensor in base.items():
        params = resolve_parameters(recipe, name, 0.0)
        out[name] = spec.merge_tensors(
            [m[name] for m in loaded],
            base=tensor,
            params=params.method.model_dump(by_alias=True),
            model_params=[p.model_dump(by_alias=True) for p in params.models],
            context=TensorContext(name=name, seed=recipe.seed, model_indices=(0, 1, 2)),
        )
    return out


@pytest.mark.parametrize("method", sorted(RECIPES))
def test_runner_output_equals_the_in_memory_merge(
    models: Path, tmp_path: Path, method: str
) -> None:
    options = MergeOptions(base_dir=models, chunk_elements=100)
    run_merge(parse_recipe(document(method)), tmp_path / "out", options)
    written = load_file(tmp_path / "out" / "model.safetensors")
    expected = in_memory(models, method)
    base = load_file(models / "base" / "model.safetensors")
    assert written.keys() == expected.keys()
    for name, tensor in expected.items():
        assert torch.equal(written[name], tensor), name
    # The merge did something to every weight matrix.
    assert not torch.equal(written["lm_head.weight"], base["lm_head.weight"])


def test_only_elementwise_ram_is_merged_in_chunks() -> None:
    for name in ("della", "della_linear", "breadcrumbs", "breadcrumbs_ties", "sce", "ramplus_tl"):
        spec = get_method(name)
        for reference in ("peft", "mergekit", "paper"):
            defaults = spec.defaults(reference)
            params = spec.params.model_validate(
                {k: v for k, v in defaults.items() if k in spec.method_param_names()}
            )
            assert not spec.chunkable(params)
            assert not spec.needs_trim_threshold(params)
    ram = get_method("ram")
    assert ram.chunkable(ram.params()) and ram.cache_blocking
    # One angle per row would allow row chunks, but not for a 1-d tensor (one row) and the
    # chunking rule does not see the shape: Model Stock is merged whole.
    stock = get_method("model_stock")
    assert not stock.chunkable(stock.params(filter_wise=True))
