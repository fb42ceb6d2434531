"""QLoRA: a 4-bit NF4 base through bitsandbytes, on CUDA only."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from tests.training.conftest import peft_merged_state
from training.config import cuda_available, parse_training_config
from training.sft import train_lora
from training.tasks import TaskFiles


@pytest.mark.gpu
@pytest.mark.skipif(
    importlib.util.find_spec("bitsandbytes") is None, reason="needs the qlora extra"
)
@pytest.mark.skipif(not cuda_available(), reason="QLoRA needs CUDA")
def test_qlora_trains_an_adapter_on_a_4bit_base(
    tiny_base: Path, task_data: dict[str, TaskFiles], tmp_path: Path
) -> None:
    data = task_data["add"]
    config = parse_training_config(
        {
            "base_model": str(tiny_base),
            "output_dir": str(tmp_path / "qlora"),
            "device": "cuda",
            "data": {"train": str(data.train), "eval": str(data.heldout)},
            "lora": {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj", "up_proj"]},
            "training": {"max_steps": 20, "learning_rate": 1e-2, "batch_size": 16},
            "quantization": {"quant_type": "nf4", "compute_dtype": "bfloat16"},
        },
        "lora",
    )
    report = train_lora(config)  # type: ignore[arg-type]
    assert report["held_out"]["after"]["loss"] < report["held_out"]["before"]["loss"]
    merged = peft_merged_state(tiny_base, tmp_path / "qlora")  # onto the full-precision base
    assert any("q_proj" in name for name in merged)
