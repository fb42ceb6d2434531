"""Training the task adapters: LoRA fine-tunes of the base with ``training.sft.train_lora``.

Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models", ICLR 2022. Each adapter is
trained on one task's train split, with its validation split scored before and after.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from quality_lab import METRICS
from quality_methods import Settings
from quality_tasks import TASKS


@dataclass(frozen=True)
class Run:
    """One LoRA adapter to train."""

    label: str
    task: str
    seed: int
    learning_rate: float


def task_runs(settings: Settings, seed: int) -> list[Run]:
    """One adapter per task, trained with ``seed`` (one seed set)."""
    return [Run(task.name, task.name, seed, settings.learning_rate) for task in TASKS]


def soup_runs(settings: Settings) -> list[Run]:
    """The soup task's extra runs (other seeds and learning rates)."""
    return [
        Run(f"{settings.soup_task} run {number}", settings.soup_task, seed, rate)
        for number, (seed, rate) in enumerate(settings.soup_runs, start=2)
    ]


def train(
    run: Run, base: Path, data: Path, out: Path, settings: Settings, device: str
) -> dict[str, Any]:
    """Train one adapter; returns what the results record about it."""
    from training.config import LoraTrainingConfig
    from training.sft import train_lora

    config = LoraTrainingConfig.model_validate(
        {
            "base_model": base,
            "output_dir": out,
            "overwrite": True,
            "device": device,
            "data": {
                "train": data / run.task / "train.jsonl",
                "eval": data / run.task / "validation.jsonl",
                "max_length": settings.max_length,
            },
            "lora": {
                "r": settings.lora_r,
                "alpha": settings.lora_alpha,
                "target_modules": list(settings.target_modules),
            },
            "training": {
                "seed": run.seed,
                "max_steps": settings.steps,
                "learning_rate": run.learning_rate,
                "batch_size": settings.batch_size,
                "eval_batch_size": settings.eval_batch_size,
            },
        }
    )
    report = train_lora(config)
    curve = report["training"]["loss_curve"]
    return {
        "task": run.task,
        "seed": run.seed,
        "learning_rate": run.learning_rate,
        "steps": report["training"]["steps"],
        "seconds": report["training"]["seconds"],
        "first_loss": curve[0]["loss"],
        "last_loss": curve[-1]["loss"],
        "validation_before": _metrics(report["held_out"]["before"]),
        "validation_after": _metrics(report["held_out"]["after"]),
    }


def _metrics(values: dict[str, Any]) -> dict[str, float]:
    return {name: float(values[name]) for name in ("exact_match", "token_accuracy", "loss")}


def _metrics(values: dict[str, Any]) -> dict[str, float]:
    return {name: float(values[name]) for name in METRICS}
