"""Training configs: typed fields, errors that name the field, paths, PEFT mapping, QLoRA."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from training.config import (
    DpoTrainingConfig,
    LoraTrainingConfig,
    cuda_available,
    load_training_config,
    parse_training_config,
)
from training.errors import TrainingConfigError

MINIMAL: dict[str, Any] = {
    "base_model": "base",
    "output_dir": "out",
    "data": {"train": "train.jsonl"},
}


def test_defaults_and_relative_paths(tmp_path: Path) -> None:
    config = parse_training_config(MINIMAL, "lora", base_dir=tmp_path)
    assert isinstance(config, LoraTrainingConfig)
    assert config.base_model == tmp_path / "base" and config.output_dir == tmp_path / "out"
    assert config.data.train == tmp_path / "train.jsonl" and config.data.eval is None
    assert config.lora.r == 8 and config.training.seed == 0
    dpo = parse_training_config({**MINIMAL, "dpo": {"beta": 0.3}}, "dpo")
    assert isinstance(dpo, DpoTrainingConfig) and dpo.dpo.beta == 0.3
    assert dpo.dpo.loss_type == "sigmoid"


def test_lora_settings_map_onto_peft() -> None:
    config = parse_training_config(
        {
            **MINIMAL,
            "lora": {
                "r": 4,
                "alpha": 32,
                "dropout": 0.05,
                "target_modules": ["q_proj"],
                "use_rslora": True,
            },
        },
        "lora",
    )
    peft = config.lora.to_peft()
    assert (peft.r, peft.lora_alpha, peft.lora_dropout, peft.use_rslora) == (4, 32, 0.05, True)
    assert set(peft.target_modules) == {"q_proj"} and peft.task_type == "CAUSAL_LM"


@pytest.mark.parametrize(
    ("change", "field", "message"),
    [
        ({"lora": {"r": 0}}, "lora.r", "greater than or equal to 1"),
        ({"lora": {"rank": 4}}, "lora.rank", "unknown field"),
        ({"training": {"lr_scheduler": "step"}}, "training.lr_scheduler", "'linear'"),
        ({"dpo": {"beta": 0.1}}, "dpo", "unknown field"),
        ({"device": "tpu"}, "device", "should match pattern"),
        ({"data": {}}, "data.train", "Field required"),
        ({"kind": "dpo"}, "kind", "this is a 'dpo' config"),
    ],
)
def test_errors_name_the_field(change: dict[str, Any], field: str, message: str) -> None:
    with pytest.raises(TrainingConfigError) as caught:
        parse_training_config({**MINIMAL, **change}, "lora")
    assert caught.value.field == field
    assert message in caught.value.message
    assert caught.value.details["field"] == field


@pytest.mark.skipif(cuda_available(), reason="checks the message on a machine without CUDA")
def test_qlora_without_cuda_fails_at_validation_with_a_clear_message() -> None:
    with pytest.raises(TrainingConfigError) as caught:
        parse_training_config({**MINIMAL, "quantization": {"load_in_4bit": True}}, "lora")
    assert caught.value.field == "quantization"
    assert "4-bit QLoRA runs only on CUDA" in caught.value.message
    assert "remove quantization" in caught.value.message
    with pytest.raises(TrainingConfigError, match="device: 'cuda' asks for CUDA"):
        parse_training_config({**MINIMAL, "device": "cuda"}, "dpo")


def test_loads_yaml_and_json_files(tmp_path: Path) -> None:
    (tmp_path / "c.yaml").write_text(
        "base_model: ./b\noutput_dir: o\ndata: {train: t.jsonl, eval: h.jsonl}\n"
        "training: {max_steps: 5}\n"
    )
    config = load_training_config(tmp_path / "c.yaml", "lora")
    assert config.data.eval == tmp_path / "h.jsonl" and config.training.max_steps == 5
    (tmp_path / "c.json").write_text(
        '{"base_model": "b", "output_dir": "o", "data": {"train": "t"}}'
    )
    assert load_training_config(tmp_path / "c.json", "dpo").output_dir == tmp_path / "o"
    (tmp_path / "bad.yaml").write_text("base_model: [unclosed\n")
    with pytest.raises(TrainingConfigError, match="not valid YAML/JSON"):
        load_training_config(tmp_path / "bad.yaml", "lora")
    with pytest.raises(TrainingConfigError, match="cannot read"):
        load_training_config(tmp_path / "missing.yaml", "lora")
