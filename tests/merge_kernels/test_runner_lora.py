"""A base + LoRA adapter as a recipe input: streamed, and equal to PEFT's merge_and_unload."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file

from merge_kernels.recipe import parse_recipe
from merge_kernels.runner import MergeOptions, close_inputs, plan_merge, run_merge
from tests.merge_kernels.checkpoints.tiny_models import make_lora_adapter, save_tiny_llama


def test_task_arithmetic_of_lora_inputs_matches_peft(tmp_path: Path) -> None:
    base_model = save_tiny_llama(tmp_path / "base", seed=0)
    merged_a = make_lora_adapter(
        base_model,
        tmp_path / "lora-a",
        seed=1,
        r=4,
        lora_alpha=8,
        target_modules=["q_proj", "v_proj"],
    )
    merged_b = make_lora_adapter(
        base_model,
        tmp_path / "lora-b",
        seed=2,
        r=2,
        lora_alpha=4,
        use_rslora=True,
        target_modules=["up_proj"],
    )
    document = {
        "merge_method": "task_arithmetic",
        "base_model": "base",
        "models": [
            {"model": "base+lora-a", "parameters": {"weight": 0.5}},
            {"model": {"base": "base", "adapter": "lora-b"}, "parameters": {"weight": 1.5}},
        ],
    }
    result = run_merge(
        parse_recipe(document, base_dir=tmp_path), tmp_path / "out", MergeOptions(base_dir=tmp_path)
    )
    written = load_file(result.out_dir / "model.safetensors")
    base = {k: v for k, v in base_model.state_dict().items()}
    for name, tensor in written.items():
        expected = (
            base[name] + 0.5 * (merged_a[name] - base[name]) + 1.5 * (merged_b[name] - base[name])
        )
        assert torch.allclose(tensor, expected, atol=1e-6), name
    changed = [n for n in written if not torch.equal(written[n], base[n])]
    assert any("q_proj" in n for n in changed) and any("up_proj" in n for n in changed)


def test_the_base_alone_as_base_plus_adapter_bakes_the_adapter_in(tmp_path: Path) -> None:
    base_model = save_tiny_llama(tmp_path / "base", seed=0)
    merged = make_lora_adapter(
        base_model, tmp_path / "lora", seed=3, r=4, lora_alpha=8, target_modules=["q_proj"]
    )
    for method, reference in (("task_arithmetic", "peft"), ("ties", "paper")):
        recipe = parse_recipe(
            {
                "merge_method": method,
                "base_model": "base+lora",
                "models": [{"model": "base+lora", "parameters": {"weight": 0.3}}],
                "parameters": {"normalize": True},
                "reference": reference,
            },
            base_dir=tmp_path,
        )
        options = MergeOptions(base_dir=tmp_path)
        plan, inputs = plan_merge(recipe, options)
        close_inputs(inputs)
        assert [item.role for item in plan.inputs] == ["base"]
        assert any("LoRA bake-in" in note for note in plan.report()["notes"])
        result = run_merge(recipe, tmp_path / f"out-{method}", options)
        written = load_file(result.out_dir / "model.safetensors")
        assert written.keys() == merged.keys()
        for name, tensor in written.items():
            assert torch.equal(tensor, merged[name]), name
