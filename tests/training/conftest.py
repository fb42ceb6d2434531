"""Shared fixtures: one tiny pre-trained base and synthetic task data per test session."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from training.config import LoraTrainingConfig, parse_training_config
from training.tasks import TaskFiles, write_task
from training.tiny_base import TinyBaseSpec, build_tiny_base

BASE_SPEC = TinyBaseSpec(pretrain_steps=30, corpus_lines=1000)


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Llama base, briefly pre-trained (built once per session)."""
    folder = tmp_path_factory.mktemp("base") / "tiny-base"
    build_tiny_base(folder, BASE_SPEC)
    return folder


@pytest.fixture(scope="session")
def task_data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, TaskFiles]:
    """Train/held-out files for the ``add`` task and ``title`` preference pairs."""
    root = tmp_path_factory.mktemp("data")
    return {
        "add": write_task(root / "add", "add", train=128, heldout=32, seed=0),
        "title-pairs": write_task(
            root / "title-pairs", "title", train=64, heldout=32, seed=0, preferences=True
        ),
    }


def lora_config(base: Path, data: TaskFiles, out: Path, **training: Any) -> LoraTrainingConfig:
    """A small LoRA SFT config on the CPU; ``training`` overrides optimisation settings."""
    document = {
        "base_model": str(base),
        "output_dir": str(out),
        "device": "cpu",
        "data": {"train": str(data.train), "eval": str(data.heldout)},
        "lora": {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj", "up_proj"]},
        "training": {"max_steps": 30, "learning_rate": 1e-2, "batch_size": 16, **training},
    }
    config = parse_training_config(document, "lora")
    assert isinstance(config, LoraTrainingConfig)
    return config


def peft_merged_state(base: Path, adapter: Path) -> dict[str, torch.Tensor]:
    """The state dict of PEFT's ``merge_and_unload`` of ``adapter`` on ``base``."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    merged = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    return {name: tensor.detach().clone() for name, tensor in merged.state_dict().items()}


def tureen_merged_state(base: Path, adapter: Path, out: Path) -> dict[str, torch.Tensor]:
    """Tureen's streamed ``base+adapter``, through ``run_merge`` as a recipe input."""
    from safetensors.torch import load_file

    from merge_kernels.recipe import parse_recipe
    from merge_kernels.runner import MergeOptions, run_merge

    document = {
        "merge_method": "task_arithmetic",
        "base_model": str(base),
        "models": [{"model": f"{base}+{adapter}", "parameters": {"weight": 1.0}}],
        "dtype": "float32",
    }
    result = run_merge(parse_recipe(document, base_dir=out.parent), out, MergeOptions())
    return load_file(result.out_dir / "model.safetensors")


def adapter_tensors(folder: Path) -> dict[str, torch.Tensor]:
    """The tensors of an adapter folder's ``adapter_model.safetensors``."""
    from safetensors.torch import load_file

    return load_file(folder / "adapter_model.safetensors")
