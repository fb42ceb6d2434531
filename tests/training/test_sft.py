"""LoRA SFT on the tiny base: valid PEFT adapters, tureen merges them like PEFT, it learns."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.training.conftest import (
    adapter_tensors,
    lora_config,
    peft_merged_state,
    tureen_merged_state,
)
from training.errors import TrainingCancelledError, TrainingConfigError, TrainingDataError
from training.sft import IGNORE_INDEX, encode, train_lora
from training.tasks import TaskFiles


@pytest.fixture(scope="module")
def trained(
    tiny_base: Path, task_data: dict[str, TaskFiles], tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, dict[str, Any]]:
    out = tmp_path_factory.mktemp("sft") / "adapter-add"
    report = train_lora(lora_config(tiny_base, task_data["add"], out))
    return out, report


def test_writes_a_peft_adapter_with_its_report(trained: tuple[Path, dict[str, Any]]) -> None:
    out, report = trained
    assert {"adapter_config.json", "adapter_model.safetensors", "training_report.json"} <= {
        p.name for p in out.iterdir()
    }
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4 and config["lora_alpha"] == 8
    assert set(config["target_modules"]) == {"q_proj", "v_proj", "up_proj"}
    names = set(adapter_tensors(out))
    assert names and all(".lora_A." in n or ".lora_B." in n for n in names)
    assert not list(out.parent.glob(".*partial*"))

    written = json.loads((out / "training_report.json").read_text())
    assert written["kind"] == "lora"
    assert [point["step"] for point in written["training"]["loss_curve"]] == list(range(1, 31))
    assert all(math.isfinite(point["loss"]) for point in written["training"]["loss_curve"])
    train_file = Path(written["data"]["train"]["path"])
    import hashlib

    assert written["data"]["train"]["sha256"] == hashlib.sha256(train_file.read_bytes()).hexdigest()
    assert written["data"]["counts"] == {"train": 128, "held_out": 32}
    assert written["config"]["lora"]["r"] == 4
    assert written["held_out"] == json.loads(json.dumps(report["held_out"]))


def test_held_out_loss_improves_on_a_learnable_task(trained: tuple[Path, dict[str, Any]]) -> None:
    _, report = trained
    before, after = report["held_out"]["before"], report["held_out"]["after"]
    assert before["examples"] == after["examples"] == 32
    assert after["loss"] < before["loss"] - 0.3, (before, after)
    assert after["token_accuracy"] > before["token_accuracy"]


def test_peft_loads_it_and_tureen_merges_it_like_merge_and_unload(
    trained: tuple[Path, dict[str, Any]], tiny_base: Path, tmp_path: Path
) -> None:
    out, _ = trained
    expected = peft_merged_state(tiny_base, out)
    written = tureen_merged_state(tiny_base, out, tmp_path / "merged")
    assert set(written) == set(expected)
    from safetensors.torch import load_file

    base = load_file(tiny_base / "model.safetensors")
    for name, tensor in written.items():
        assert torch.allclose(tensor, expected[name], atol=1e-6, rtol=0), name
    changed = {name for name, tensor in written.items() if not torch.equal(tensor, base[name])}
    assert len(changed) == 3 * 2  # three targeted modules in each of the two layers
    assert all(any(m in name for m in ("q_proj", "v_proj", "up_proj")) for name in changed)


def test_same_seed_same_adapter_other_seed_other_adapter(
    tiny_base: Path, task_data: dict[str, TaskFiles], tmp_path: Path
) -> None:
    def run(name: str, seed: int) -> dict[str, torch.Tensor]:
        config = lora_config(tiny_base, task_data["add"], tmp_path / name, seed=seed, max_steps=4)
        config = config.model_copy(update={"lora": config.lora.model_copy(update={"dropout": 0.1})})
        train_lora(config)
        return adapter_tensors(tmp_path / name)

    first, again, other = run("first", 0), run("again", 0), run("other", 1)
    assert set(first) == set(again) == set(other)
    for name, tensor in first.items():
        assert torch.equal(tensor, again[name]), name
    assert all(not torch.equal(tensor, other[name]) for name, tensor in first.items())


def test_gradient_accumulation_weights_tokens_like_one_big_batch(
    tiny_base: Path, task_data: dict[str, TaskFiles], tmp_path: Path
) -> None:
    big = train_lora(
        lora_config(tiny_base, task_data["add"], tmp_path / "big", max_steps=1, batch_size=16)
    )
    small = train_lora(
        lora_config(
            tiny_base,
            task_data["add"],
            tmp_path / "small",
            max_steps=1,
            batch_size=4,
            gradient_accumulation_steps=4,
        )
    )
    big_loss = big["training"]["loss_curve"][0]["loss"]
    assert small["training"]["loss_curve"][0]["loss"] == pytest.approx(big_loss, rel=1e-5)
    assert small["training"]["loss_curve"][0]["grad_norm"] == pytest.approx(
        big["training"]["loss_curve"][0]["grad_norm"], rel=1e-4
    )
    small_tensors = adapter_tensors(tmp_path / "small")
    for name, tensor in adapter_tensors(tmp_path / "big").items():
        assert torch.allclose(tensor, small_tensors[name], atol=1e-6), name


def test_loss_is_taken_on_completion_tokens_only(tiny_base: Path) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_base)
    records = [{"prompt": "add 12 7 =", "completion": " 19"}]
    (example,), dropped = encode(records, "prompt_completion", tokenizer, 64)
    prompt = tokenizer("add 12 7 =")["input_ids"]
    completion = tokenizer(" 19", add_special_tokens=False)["input_ids"]
    assert dropped == 0
    assert example.input_ids == prompt + completion + [tokenizer.eos_token_id]
    assert example.labels == [IGNORE_INDEX] * len(prompt) + completion + [tokenizer.eos_token_id]

    (text,), _ = encode([{"text": "upper abc = ABC"}], "text", tokenizer, 64)
    assert text.labels == text.input_ids and text.input_ids[-1] == tokenizer.eos_token_id

    cut, dropped = encode(records, "prompt_completion", tokenizer, len(prompt))
    assert cut == [] and dropped == 1


def test_trains_on_text_records_with_a_held_out_split(tiny_base: Path, tmp_path: Path) -> None:
    from training.config import parse_training_config

    lines = [json.dumps({"text": f"upper {w} = {w.upper()}"}) for w in ("abc", "dog", "sun", "hat")]
    (tmp_path / "text.jsonl").write_text("\n".join(lines * 5) + "\n")
    config = parse_training_config(
        {
            "base_model": str(tiny_base),
            "output_dir": "out",
            "device": "cpu",
            "data": {"train": "text.jsonl", "eval_fraction": 0.25},
            "training": {"max_steps": 3, "batch_size": 4},
        },
        "lora",
        base_dir=tmp_path,
    )
    report = train_lora(config)  # type: ignore[arg-type]
    assert report["data"]["counts"] == {"train": 15, "held_out": 5}
    assert report["data"]["held_out"]["split_from_train"] is True
    assert (tmp_path / "out" / "adapter_model.safetensors").is_file()


def test_cancel_publishes_nothing(
    tiny_base: Path, task_data: dict[str, TaskFiles], tmp_path: Path
) -> None:
    polls: list[int] = []

    def should_stop() -> bool:
        polls.append(1)
        return len(polls) > 2

    with pytest.raises(TrainingCancelledError, match="step 2 of 30"):
        train_lora(
            lora_config(tiny_base, task_data["add"], tmp_path / "out"), should_stop=should_stop
        )
    assert list(tmp_path.iterdir()) == []


def test_refuses_an_existing_output_and_bad_data_before_training(
    tiny_base: Path, task_data: dict[str, TaskFiles], tmp_path: Path
) -> None:
    (tmp_path / "taken").mkdir()
    with pytest.raises(TrainingConfigError, match=r"output_dir: .* already exists"):
        train_lora(lora_config(tiny_base, task_data["add"], tmp_path / "taken"))
    bad = TaskFiles(task_data["add"].train, tmp_path / "pairs.jsonl")
    bad.heldout.write_text('{"prompt": "a", "chosen": "b", "rejected": "c"}\n')
    with pytest.raises(TrainingDataError, match=r"pairs.jsonl, line 1: expected a JSON object"):
        train_lora(lora_config(tiny_base, bad, tmp_path / "out"))
