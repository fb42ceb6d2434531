"""``tureen train``: base, data with configs, LoRA and DPO from config files, clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from service.cli import main


def test_base_data_and_lora_from_the_command_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["train", "base", str(tmp_path / "base"), "--pretrain-steps", "5"]) == 0
    built = json.loads(capsys.readouterr().out)
    assert built["pretrain_steps"] == 5 and built["vocab_size"] > 256
    assert (
        main(
            [
                "train",
                "data",
                str(tmp_path / "data"),
                "--train",
                "32",
                "--heldout",
                "8",
                "--tasks",
                "add",
                "--pairs",
                "title",
                "--base",
                str(tmp_path / "base"),
            ]
        )
        == 0
    )
    capsys.readouterr()
    config = tmp_path / "data" / "add.lora.yaml"
    text = config.read_text().replace("max_steps: 60", "max_steps: 3")
    config.write_text(text.replace("batch_size: 16", "batch_size: 8"))
    assert main(["train", "lora", str(config)]) == 0
    captured = capsys.readouterr()
    summary = json.loads(captured.out)
    assert summary["kind"] == "lora" and summary["steps"] == 3
    assert "adapter_model.safetensors" in summary["files"]
    assert Path(summary["output_dir"]) == tmp_path / "data" / "adapters" / "add"
    assert "step 3/3" in captured.err
    assert (tmp_path / "data" / "title-pairs.dpo.yaml").is_file()

    assert main(["train", "lora", str(config)]) == 2
    assert "error: output_dir: " in capsys.readouterr().err
    wrong = tmp_path / "data" / "wrong.dpo.yaml"
    wrong.write_text(config.read_text().replace("adapters/add", "adapters/wrong"))
    assert main(["train", "dpo", str(wrong)]) == 2
    assert 'add/train.jsonl, line 1: expected a JSON object {"prompt", "chosen"' in (
        capsys.readouterr().err
    )


def test_invalid_config_prints_the_field(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "c.yaml"
    config.write_text("base_model: b\noutput_dir: o\ndata: {train: t.jsonl}\nlora: {r: -1}\n")
    assert main(["train", "lora", str(config)]) == 2
    assert "error: lora.r: Input should be greater than or equal to 1" in capsys.readouterr().err
