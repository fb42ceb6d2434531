"""DPO with TRL on the tiny base: a valid adapter that tureen merges like PEFT, and it learns
the preference on held-out pairs."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.training.conftest import adapter_tensors, peft_merged_state, tureen_merged_state
from training.config import DpoTrainingConfig, parse_training_config
from training.dpo import train_dpo
from training.errors import TrainingCancelledError, TrainingDataError
from training.tasks import TaskFiles


def dpo_config(base: Path, data: TaskFiles, out: Path, **training: Any) -> DpoTrainingConfig:
    config = parse_training_config(
        {
            "base_model": str(base),
            "output_dir": str(out),
            "device": "cpu",
            "data": {"train": str(data.train), "eval": str(data.heldout)},
            "lora": {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj", "up_proj"]},
            "training": {
                "max_steps": 12,
                "learning_rate": 1e-2,
                "batch_size": 8,
                "eval_batch_size": 32,
                **training,
            },
            "dpo": {"beta": 0.5, "loss_type": "sigmoid"},
        },
        "dpo",
    )
    assert isinstance(config, DpoTrainingConfig)
    return config


@pytest.fixture(scope="module")
def trained(
    tiny_base: Path, task_data: dict[str, TaskFiles], tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, dict[str, Any]]:
    out = tmp_path_factory.mktemp("dpo") / "adapter-title"
    steps: list[int] = []
    report = train_dpo(
        dpo_config(tiny_base, task_data["title-pairs"], out),
        progress=lambda update: steps.append(update.step) if update.phase == "training" else None,
    )
    assert steps == list(range(1, 13))
    return out, report


def test_held_out_preferences_improve(trained: tuple[Path, dict[str, Any]]) -> None:
    out, report = trained
    before, after = report["held_out"]["before"], report["held_out"]["after"]
    # The adapter starts at zero, so the policy is the reference: no margin, loss log 2.
    assert before["reward_margin"] == pytest.approx(0.0, abs=1e-5)
    assert before["loss"] == pytest.approx(math.log(2), abs=1e-5)
    assert after["loss"] < before["loss"] - 0.2
    assert after["reward_margin"] > 0.5
    assert after["preference_accuracy"] >= 0.9 > before["preference_accuracy"]
    assert before["pairs"] == after["pairs"] == 32
    written = json.loads((out / "training_report.json").read_text())
    assert written["kind"] == "dpo" and written["config"]["dpo"]["beta"] == 0.5
    assert len(written["training"]["loss_curve"]) == 12
    assert "reward_margin" in written["training"]["loss_curve"][-1]


def test_peft_loads_it_and_tureen_merges_it_like_merge_and_unload(
    trained: tuple[Path, dict[str, Any]], tiny_base: Path, tmp_path: Path
) -> None:
    out, _ = trained
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4
    assert all(".lora_A." in n or ".lora_B." in n for n in adapter_tensors(out))
    expected = peft_merged_state(tiny_base, out)
    written = tureen_merged_state(tiny_base, out, tmp_path / "merged")
    assert set(written) == set(expected)
    for name, tensor in written.items():
        assert torch.allclose(tensor, expected[name], atol=1e-6, rtol=0), name
    base = adapter_tensors(out)
    assert any(float(t.abs().max()) > 0 for n, t in base.items() if "lora_B" in n)


def test_cancel_publishes_nothing(
    tiny_base: Path, task_data: dict[str, TaskFiles], tmp_path: Path
) -> None:
    polls: list[int] = []

    def should_stop() -> bool:
        polls.append(1)
        return len(polls) > 3

    with pytest.raises(TrainingCancelledError, match="step 3 of 12"):
        train_dpo(
            dpo_config(tiny_base, task_data["title-pairs"], tmp_path / "out"),
            should_stop=should_stop,
        )
    assert not (tmp_path / "out").exists()


def test_refuses_prompt_completion_data(
    tiny_base: Path, task_data: dict[str, TaskFiles], tmp_path: Path
) -> None:
    with pytest.raises(TrainingDataError, match='expected a JSON object \\{"prompt", "chosen"'):
        train_dpo(dpo_config(tiny_base, task_data["add"], tmp_path / "out"))
