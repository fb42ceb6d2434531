"""Running a training config of either kind: the one entry point the CLI and the service use."""

from __future__ import annotations

from typing import Any

from training.config import AnyTrainingConfig, DpoTrainingConfig
from training.progress import ProgressCallback, StopCheck


def run_training(
    config: AnyTrainingConfig,
    *,
    progress: ProgressCallback | None = None,
    should_stop: StopCheck | None = None,
) -> dict[str, Any]:
    """Train the adapter a config describes (LoRA SFT or DPO) and write it.

    Args:
        config: a validated config with absolute paths.
        progress: called at each phase and after every optimizer step.
        should_stop: polled before every optimizer step; True cancels the run.

    Returns:
        The training report (also saved as ``training_report.json`` in the adapter folder).
    """
    if isinstance(config, DpoTrainingConfig):
        from training.dpo import train_dpo

        return train_dpo(config, progress=progress, should_stop=should_stop)
    from training.sft import train_lora

    return train_lora(config, progress=progress, should_stop=should_stop)


def summary(report: dict[str, Any]) -> dict[str, Any]:
    """The short form of a report: where the adapter is and the held-out numbers."""
    return {
        "kind": report.get("kind"),
        "output_dir": report.get("config", {}).get("output_dir"),
        "files": report.get("files", []),
        "steps": report.get("training", {}).get("steps"),
        "held_out": report.get("held_out"),
        "seconds": report.get("seconds"),
    }
