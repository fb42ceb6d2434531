"""DPO with a LoRA adapter, through TRL's ``DPOTrainer``.

The policy is the base with a fresh LoRA adapter (TRL's ``peft_config``); the reference is
the same base with the adapter disabled, so no second copy of the model is held. Held-out
pairs are scored by ``DPOTrainer.evaluate`` before and after training: the DPO loss of the
configured ``loss_type``, the implicit rewards ``β·(log π(y|x) − log π_ref(y|x))`` of chosen
and rejected answers, their margin, and the preference accuracy (share of pairs whose chosen
reward exceeds the rejected one). Before training the adapter is zero, so margins are 0 and
the sigmoid loss is log 2.
"""

from __future__ import annotations

import math
import tempfile
import time
from typing import Any

from training.base_loading import check_base_folder, check_output_dir, load_base
from training.config import DpoTrainingConfig
from training.data import load_splits
from training.errors import TrainingCancelledError
from training.progress import ProgressCallback, StopCheck, TrainingProgress, eta
from training.publish import publish_adapter
from training.report import inputs_report

_EVAL_KEYS = {
    "eval_loss": "loss",
    "eval_rewards/chosen": "reward_chosen",
    "eval_rewards/rejected": "reward_rejected",
    "eval_rewards/margins": "reward_margin",
    "eval_rewards/accuracies": "preference_accuracy",
    "eval_logps/chosen": "logp_chosen",
    "eval_logps/rejected": "logp_rejected",
}


def _held_out_metrics(raw: dict[str, float], pairs: int) -> dict[str, float]:
    metrics = {name: float(raw[key]) for key, name in _EVAL_KEYS.items() if key in raw}
    metrics["pairs"] = pairs
    return metrics


def _callback(progress: ProgressCallback | None, should_stop: StopCheck | None, total: int) -> Any:
    from transformers import TrainerCallback

    class _Progress(TrainerCallback):
        """Reports each optimizer step and stops the trainer when cancelled."""

        def __init__(self) -> None:
            self.start = time.perf_counter()
            self.loss: float | None = None
            self.learning_rate: float | None = None

        def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            if should_stop is not None and should_stop():
                raise TrainingCancelledError(
                    f"training cancelled at step {state.global_step} of {total}"
                )

        def on_log(
            self, args: Any, state: Any, control: Any, logs: Any = None, **kwargs: Any
        ) -> None:
            if logs and "loss" in logs:
                self.loss = float(logs["loss"])
                self.learning_rate = float(logs.get("learning_rate", math.nan))
                if progress is not None:
                    step = state.global_step
                    progress(
                        TrainingProgress(
                            "training",
                            step,
                            total,
                            self.loss,
                            self.learning_rate,
                            eta(time.perf_counter() - self.start, step, total),
                        )
                    )

    return _Progress()


def train_dpo(
    config: DpoTrainingConfig,
    *,
    progress: ProgressCallback | None = None,
    should_stop: StopCheck | None = None,
) -> dict[str, Any]:
    """Train a LoRA adapter with DPO and write it to ``config.output_dir``.

    Args:
        config: the validated config (absolute paths).
        progress: called at each phase and after every optimizer step.
        should_stop: polled before every optimizer step; True cancels the run.

    Returns:
        The training report, also written as ``training_report.json`` next to the adapter.

    Raises:
        TrainingConfigError: the base or output folder is unusable.
        TrainingDataError: the data is malformed.
        TrainingCancelledError: ``should_stop`` returned True; nothing was written.
    """
    import torch
    from datasets import Dataset
    from datasets.utils.logging import disable_progress_bar
    from transformers import PrinterCallback
    from transformers.utils import logging as transformers_logging
    from trl.trainer.dpo_config import DPOConfig
    from trl.trainer.dpo_trainer import DPOTrainer

    def report_progress(update: TrainingProgress) -> None:
        if progress is not None:
            progress(update)

    start = time.perf_counter()
    check_base_folder(config.base_model)
    check_output_dir(config)
    settings = config.training
    splits = load_splits(
        config.data.train,
        config.data.eval,
        allowed=("preference",),
        fraction=config.data.eval_fraction,
        seed=settings.seed,
    )
    report_progress(TrainingProgress("loading"))
    model, tokenizer = load_base(config)
    device = config.resolved_device()
    quiet: Any = (transformers_logging.disable_progress_bar, disable_progress_bar)
    for silence in quiet:
        silence()

    with tempfile.TemporaryDirectory(prefix="tureen-dpo-") as scratch:
        arguments: dict[str, Any] = {
            "output_dir": scratch,
            "seed": settings.seed,
            "data_seed": settings.seed,
            "per_device_train_batch_size": settings.batch_size,
            "per_device_eval_batch_size": settings.eval_batch_size,
            "gradient_accumulation_steps": settings.gradient_accumulation_steps,
            "learning_rate": settings.learning_rate,
            "lr_scheduler_type": settings.lr_scheduler,
            "warmup_steps": settings.warmup_steps,
            "weight_decay": settings.weight_decay,
            "max_grad_norm": settings.max_grad_norm or 0.0,
            "max_steps": settings.max_steps or -1,
            "num_train_epochs": settings.epochs or 1.0,
            "beta": config.dpo.beta,
            "loss_type": [config.dpo.loss_type],
            "label_smoothing": config.dpo.label_smoothing,
            "max_length": config.data.max_length,
            "logging_steps": 1,
            "save_strategy": "no",
            "eval_strategy": "no",
            "report_to": [],
            "disable_tqdm": True,
            "use_cpu": device == "cpu",
            "bf16": config.dtype == "bfloat16" and device != "cpu",
            "fp16": config.dtype == "float16" and device != "cpu",
            "dataloader_num_workers": 0,
        }
        torch.manual_seed(settings.seed)
        trainer = DPOTrainer(
            model=model,
            args=DPOConfig(**arguments),
            train_dataset=Dataset.from_list(splits.train),
            eval_dataset=Dataset.from_list(splits.held_out),
            processing_class=tokenizer,
            peft_config=config.lora.to_peft(),
        )
        total = int(trainer.args.max_steps)
        if total <= 0:
            batches = math.ceil(len(splits.train) / settings.batch_size)
            per_epoch = max(1, math.ceil(batches / settings.gradient_accumulation_steps))
            total = math.ceil((settings.epochs or 1.0) * per_epoch)
        trainer.remove_callback(PrinterCallback)
        trainer.add_callback(_callback(progress, should_stop, total))

        report_progress(TrainingProgress("evaluating"))
        before = _held_out_metrics(trainer.evaluate(), len(splits.held_out))
        train_start = time.perf_counter()
        trainer.train()
        train_seconds = time.perf_counter() - train_start
        report_progress(TrainingProgress("evaluating", total, total))
        after = _held_out_metrics(trainer.evaluate(), len(splits.held_out))
        curve = [
            {
                "step": int(entry["step"]),
                "loss": float(entry["loss"]),
                "learning_rate": float(entry.get("learning_rate", math.nan)),
                **{
                    name: float(entry[key[len("eval_") :]])
                    for key, name in _EVAL_KEYS.items()
                    if key != "eval_loss" and key[len("eval_") :] in entry
                },
            }
            for entry in trainer.state.log_history
            if "loss" in entry and "step" in entry
        ]
        if should_stop is not None and should_stop():
            raise TrainingCancelledError(f"training cancelled after step {total}")
        policy: Any = trainer.model
        report = inputs_report(config, splits.train_file, splits.held_out_file, splits.counts())
        report["training"] = {
            "steps": int(trainer.state.global_step),
            "train_pairs": len(splits.train),
            "trainable_parameters": sum(
                int(p.numel()) for p in policy.parameters() if p.requires_grad
            ),
            "loss_curve": curve,
            "seconds": round(train_seconds, 3),
        }
        report["held_out"] = {
            "before": before,
            "after": after,
            "loss_change": after["loss"] - before["loss"],
        }
        report_progress(TrainingProgress("saving", total, total))
        report["seconds"] = round(time.perf_counter() - start, 3)
        report["files"] = publish_adapter(
            policy, config.output_dir, report, overwrite=config.overwrite
        )
    report_progress(TrainingProgress("done", total, total))
    return report
