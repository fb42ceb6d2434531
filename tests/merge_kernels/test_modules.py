"""``modules``: each module of a tiny two-module (Qwen2-VL layout) checkpoint merged by its own
definition, checked against the merge computed by hand from the inputs."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file

from merge_kernels.errors import RecipeError
from merge_kernels.recipe import parse_recipe
from merge_kernels.runner import MergeOptions, close_inputs, plan_merge
from merge_kernels.synthetic import LlamaShape, write_checkpoint
from tests.merge_kernels.stacking_helpers import config_of, tureen_merge

TEXT_LAYERS = 3
VISION_LAYERS = 2


def _vl_checkpoint(folder: Path, seed: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)

    def draw(*shape: int) -> torch.Tensor:
        return torch.randn(shape, generator=generator)

    tensors = {
        "model.embed_tokens.weight": draw(16, 8),
        "visual.patch_embed.proj.weight": draw(8, 4),
    }
    for i in range(TEXT_LAYERS):
        tensors[f"model.layers.{i}.mlp.up_proj.weight"] = draw(12, 8)
        tensors[f"model.layers.{i}.input_layernorm.weight"] = draw(8)
    for i in range(VISION_LAYERS):
        tensors[f"visual.blocks.{i}.attn.qkv.weight"] = draw(12, 4)
        tensors[f"visual.blocks.{i}.norm1.weight"] = draw(4)
    tensors["visual.merger.ln_q.weight"] = draw(4)
    tensors["visual.merger.mlp.0.weight"] = draw(8, 4)
    tensors["model.norm.weight"] = draw(8)
    tensors["lm_head.weight"] = draw(16, 8)
    folder.mkdir(parents=True)
    save_file(tensors, folder / "model.safetensors")
    config = {
        "architectures": ["Qwen2VLForConditionalGeneration"],
        "model_type": "qwen2_vl",
        "hidden_size": 8,
        "vocab_size": 16,
        "num_hidden_layers": TEXT_LAYERS,
        "layer_types": [f"kind{seed}.{i}" for i in range(TEXT_LAYERS)],
        "tie_word_embeddings": False,
        "vision_config": {"depth": VISION_LAYERS},
    }
    (folder / "config.json").write_text(json.dumps(config))
    return tensors


@pytest.fixture(scope="module")
def vl(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("modules")
    return {
        "a": (str(root / "a"), _vl_checkpoint(root / "a", 1)),
        "b": (str(root / "b"), _vl_checkpoint(root / "b", 2)),
    }


def _document(a: str, b: str, **modules: Any) -> dict[str, Any]:
    default = {
        "text_decoder": {
            "slices": [
                {"sources": [{"model": a, "layer_range": [0, 2]}]},
                {"sources": [{"model": b, "layer_range": [1, 3]}]},
            ]
        },
        "vision_tower": {
            "models": [
                {"model": a, "parameters": {"weight": 0.25}},
                {"model": b, "parameters": {"weight": 0.75}},
            ]
        },
        "multi_modal_projector": {"models": [{"model": b}]},
    }
    return {"merge_method": "linear", "modules": {**default, **modules}}


def test_each_module_is_merged_by_its_own_definition(vl: dict[str, Any], tmp_path: Path) -> None:
    (a, ta), (b, tb) = vl["a"], vl["b"]
    out = tureen_merge(_document(a, b), tmp_path / "out")
    expected = {
        # text: layers 0-1 of a, then 1-2 of b; embeddings from a, norm and head from b
        "model.embed_tokens.weight": ta["model.embed_tokens.weight"],
        "model.norm.weight": tb["model.norm.weight"],
        "lm_head.weight": tb["lm_head.weight"],
        # projector: b alone
        "visual.merger.ln_q.weight": tb["visual.merger.ln_q.weight"],
        "visual.merger.mlp.0.weight": tb["visual.merger.mlp.0.weight"],
    }
    for out_layer, (source, layer) in enumerate([(ta, 0), (ta, 1), (tb, 1), (tb, 2)]):
        for rest in ("mlp.up_proj.weight", "input_layernorm.weight"):
            expected[f"model.layers.{out_layer}.{rest}"] = source[f"model.layers.{layer}.{rest}"]
    vision = [n for n in ta if n.startswith("visual.") and not n.startswith("visual.merger.")]
    for name in vision:
        expected[name] = 0.25 * ta[name] + 0.75 * tb[name]
    assert sorted(out) == sorted(expected)
    for name, value in expected.items():
        torch.testing.assert_close(out[name], value, rtol=1e-6, atol=1e-6, msg=name)
    config = config_of(tmp_path / "out")
    assert config["num_hidden_layers"] == 4
    assert config["vision_config"]["depth"] == VISION_LAYERS
    assert config["layer_types"] == ["kind1.0", "kind1.1", "kind2.1", "kind2.2"]


def test_a_module_left_out_is_noted_and_not_written(vl: dict[str, Any], tmp_path: Path) -> None:
    (a, _), (b, _) = vl["a"], vl["b"]
    document = _document(a, b)
    del document["modules"]["multi_modal_projector"]
    plan, inputs = plan_merge(parse_recipe(document), MergeOptions())
    close_inputs(inputs)
    assert not plan.problems
    assert any("multi_modal_projector" in note for note in plan.notes)
    assert not any(t.name.startswith("visual.merger.") for t in plan.tensors)
    layer_map = plan.report()["layer_map"]
    assert layer_map["layers"] == {"text_decoder": 4, "vision_tower": VISION_LAYERS}


def test_plain_slices_on_a_multi_module_model_ask_for_modules(vl: dict[str, Any]) -> None:
    (a, _), _ = vl["a"], vl["b"]
    document = {
        "merge_method": "linear",
        "slices": [
            {"sources": [{"model": a, "layer_range": [0, 1]}]},
            {"sources": [{"model": a, "layer_range": [1, 2]}]},
        ],
    }
    with pytest.raises(RecipeError, match="vision_tower") as caught:
        plan_merge(parse_recipe(document), MergeOptions())
    assert caught.value.field == "slices"


def test_unknown_module_names_are_refused_with_a_suggestion(vl: dict[str, Any]) -> None:
    (a, _), (b, _) = vl["a"], vl["b"]
    document = _document(a, b, vision_towr={"models": [{"model": a}]})
    with pytest.raises(RecipeError, match="vision_tower") as caught:
        plan_merge(parse_recipe(document), MergeOptions())
    assert caught.value.field == "modules.vision_towr"


def test_a_single_module_model_has_only_the_default_module(tmp_path: Path) -> None:
    shape = LlamaShape(vocab_size=16, hidden_size=8, intermediate_size=8, num_attention_heads=2)
    llama = str(write_checkpoint(tmp_path / "llama", shape, seed=1))
    document = {
        "merge_method": "linear",
        "modules": {"text_decoder": {"models": [{"model": llama}]}},
    }
    with pytest.raises(RecipeError, match="its modules: default") as caught:
        plan_merge(parse_recipe(document), MergeOptions())
    assert caught.value.field == "modules.text_decoder"
    # mergekit's name for the one module of a single-module model plans like `models`
    document["modules"] = {"default": {"models": [{"model": llama}]}}
    plan, inputs = plan_merge(parse_recipe(document), MergeOptions())
    close_inputs(inputs)
    assert not plan.problems and len(plan.tensors) == len(shape.tensors())


def test_module_layer_range_errors_name_the_module(vl: dict[str, Any]) -> None:
    (a, _), (b, _) = vl["a"], vl["b"]
    document = _document(
        a, b, vision_tower={"slices": [{"sources": [{"model": a, "layer_range": [0, 3]}]}]}
    )
    plan, inputs = plan_merge(parse_recipe(document), MergeOptions())
    close_inputs(inputs)
    assert plan.problems == [
        f"modules.vision_tower.slices[0].sources[0].layer_range: [0, 3] is outside the layers "
        f"of {a}, which has {VISION_LAYERS} layers in module vision_tower: give a range "
        f"within [0, {VISION_LAYERS}]"
    ]
    with pytest.raises(RecipeError) as caught:
        parse_recipe({**document, "modules": {"text_decoder": {"models": [], "slices": []}}})
    assert caught.value.field.startswith("modules.text_decoder")
