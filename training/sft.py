"""LoRA supervised fine-tuning of a causal LM with PEFT, in a plain PyTorch loop.

Each ``{"prompt", "completion"}`` record becomes ``prompt + completion + eos``, the prompt
tokenized with the tokenizer's special tokens (e.g. a BOS) and the completion without, and
only the completion's tokens (with the eos) carry loss; a ``{"text"}`` record carries loss on
every token. The loss of an optimizer step is the mean over every loss-carrying token of its
accumulated micro-batches (token-weighted, so gradient accumulation equals one large batch),
under AdamW and a transformers learning-rate schedule.

Held-out numbers are computed the same way before and after training: the token-weighted
loss, the token accuracy (argmax equals the next token) and the exact-match rate (every
completion token is the argmax, i.e. greedy decoding reproduces the completion).

Runs are deterministic for a seed on a given device and thread count: the seed fixes the
LoRA initialisation, dropout and the data order.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from training.base_loading import check_base_folder, check_output_dir, load_base
from training.config import LoraTrainingConfig
from training.data import RecordForm, load_splits
from training.errors import TrainingCancelledError, TrainingDataError
from training.progress import ProgressCallback, StopCheck, TrainingProgress, eta
from training.publish import publish_adapter
from training.report import inputs_report

IGNORE_INDEX = -100


@dataclass(frozen=True)
class Encoded:
    """One tokenized example: input ids and labels (``-100`` where no loss is taken)."""

    input_ids: list[int]
    labels: list[int]


def encode(
    records: list[dict[str, str]], form: RecordForm, tokenizer: Any, max_length: int
) -> tuple[list[Encoded], int]:
    """Tokenize records for causal-LM training with completion-only loss.

    Args:
        records: ``prompt``/``completion`` or ``text`` records.
        form: which of the two.
        tokenizer: the base's tokenizer.
        max_length: longer examples are cut at the end.

    Returns:
        The examples that keep at least one loss-carrying token, and how many were dropped
        because truncation left none.
    """
    eos = int(tokenizer.eos_token_id)
    encoded: list[Encoded] = []
    dropped = 0
    for record in records:
        if form == "text":
            ids = [*tokenizer(record["text"])["input_ids"], eos]
            labels = list(ids)
        else:
            prompt = list(tokenizer(record["prompt"])["input_ids"])
            completion = [
                *tokenizer(record["completion"], add_special_tokens=False)["input_ids"],
                eos,
            ]
            ids = prompt + completion
            labels = [IGNORE_INDEX] * len(prompt) + completion
        ids, labels = ids[:max_length], labels[:max_length]
        if all(label == IGNORE_INDEX for label in labels[1:]):
            dropped += 1
            continue
        encoded.append(Encoded(ids, labels))
    return encoded, dropped


def collate(batch: list[Encoded], pad_id: int, device: str) -> dict[str, Any]:
    """Right-pad a micro-batch into ``input_ids``, ``attention_mask`` and ``labels``."""
    import torch

    width = max(len(example.input_ids) for example in batch)
    input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for row, example in enumerate(batch):
        n = len(example.input_ids)
        input_ids[row, :n] = torch.tensor(example.input_ids)
        labels[row, :n] = torch.tensor(example.labels)
        mask[row, :n] = 1
    return {
        "input_ids": input_ids.to(device),
        "attention_mask": mask.to(device),
        "labels": labels.to(device),
    }


def token_losses(model: Any, batch: dict[str, Any]) -> tuple[Any, Any, Any]:
    """Per-token losses of a batch, with the next-token targets and their mask.

    Returns:
        ``(losses, correct, mask)``: float losses, booleans (argmax equals target) and the
        loss mask, each of shape (batch, width - 1).
    """
    import torch

    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    logits = logits[:, :-1].float()
    targets = batch["labels"][:, 1:]
    mask = targets != IGNORE_INDEX
    safe = targets.masked_fill(~mask, 0)
    losses = torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), safe.reshape(-1), reduction="none"
    ).view_as(safe)
    correct = logits.argmax(dim=-1) == safe
    return losses * mask, correct & mask, mask


def evaluate(
    model: Any, examples: list[Encoded], pad_id: int, device: str, batch_size: int
) -> dict[str, float]:
    """Held-out loss (token-weighted), token accuracy and exact-match rate.

    Returns:
        ``{"loss", "token_accuracy", "exact_match", "tokens", "examples"}``.
    """
    import torch

    was_training = model.training
    model.eval()
    loss_sum, tokens, right, exact = 0.0, 0, 0, 0
    with torch.no_grad():
        for start in range(0, len(examples), batch_size):
            batch = collate(examples[start : start + batch_size], pad_id, device)
            losses, correct, mask = token_losses(model, batch)
            loss_sum += float(losses.sum())
            tokens += int(mask.sum())
            right += int(correct.sum())
            exact += int((correct == mask).all(dim=1).sum())
    model.train(was_training)
    return {
        "loss": loss_sum / max(1, tokens),
        "token_accuracy": right / max(1, tokens),
        "exact_match": exact / max(1, len(examples)),
        "tokens": tokens,
        "examples": len(examples),
    }


def _micro_batches(
    examples: list[Encoded], batch_size: int, seed: int
) -> Iterator[tuple[int, list[Encoded]]]:
    """Endless shuffled micro-batches, reshuffled every epoch; yields ``(epoch, batch)``."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    epoch = 0
    while True:
        order = torch.randperm(len(examples), generator=generator).tolist()
        for start in range(0, len(order), batch_size):
            yield epoch, [examples[i] for i in order[start : start + batch_size]]
        epoch += 1


def planned_steps(config: LoraTrainingConfig, examples: int) -> int:
    """Optimizer steps: ``max_steps``, else ``epochs`` (default 1) over the examples."""
    settings = config.training
    if settings.max_steps is not None:
        return settings.max_steps
    micro_per_epoch = math.ceil(examples / settings.batch_size)
    per_epoch = math.ceil(micro_per_epoch / settings.gradient_accumulation_steps)
    return max(1, math.ceil((settings.epochs or 1.0) * per_epoch))


def train_lora(
    config: LoraTrainingConfig,
    *,
    progress: ProgressCallback | None = None,
    should_stop: StopCheck | None = None,
) -> dict[str, Any]:
    """Train a LoRA adapter by supervised fine-tuning and write it to ``config.output_dir``.

    Args:
        config: the validated config (absolute paths).
        progress: called at each phase and after every optimizer step.
        should_stop: polled before every optimizer step; True cancels the run.

    Returns:
        The training report, also written as ``training_report.json`` next to the adapter.

    Raises:
        TrainingConfigError: the base or output folder is unusable.
        TrainingDataError: the data is malformed, or no example keeps a completion token.
        TrainingCancelledError: ``should_stop`` returned True; nothing was written.
    """
    import torch
    from peft import get_peft_model
    from transformers import get_scheduler

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
        allowed=("prompt_completion", "text"),
        fraction=config.data.eval_fraction,
        seed=settings.seed,
    )
    report_progress(TrainingProgress("loading"))
    model, tokenizer = load_base(config)
    device = config.resolved_device()
    form = splits.train_file.form
    train, dropped = encode(splits.train, form, tokenizer, config.data.max_length)
    held_out, held_dropped = encode(splits.held_out, form, tokenizer, config.data.max_length)
    if not train or not held_out:
        raise TrainingDataError(
            f"no {'training' if not train else 'held-out'} example keeps a completion token "
            f"within data.max_length={config.data.max_length}; raise data.max_length"
        )
    pad_id = int(tokenizer.pad_token_id)

    torch.manual_seed(settings.seed)
    model = get_peft_model(model, config.lora.to_peft())
    report_progress(TrainingProgress("evaluating"))
    before = evaluate(model, held_out, pad_id, device, settings.eval_batch_size)

    total = planned_steps(config, len(train))
    parameters = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(
        parameters, lr=settings.learning_rate, weight_decay=settings.weight_decay
    )
    scheduler = get_scheduler(
        settings.lr_scheduler,
        optimizer,
        num_warmup_steps=settings.warmup_steps,
        num_training_steps=total,
    )
    batches = _micro_batches(train, settings.batch_size, settings.seed)
    curve: list[dict[str, float | int]] = []
    epoch = 0
    model.train()
    train_start = time.perf_counter()
    for step in range(1, total + 1):
        if should_stop is not None and should_stop():
            raise TrainingCancelledError(f"training cancelled at step {step - 1} of {total}")
        micro = [next(batches) for _ in range(settings.gradient_accumulation_steps)]
        epoch = micro[-1][0]
        collated = [collate(batch, pad_id, device) for _, batch in micro]
        step_tokens = sum(int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) for b in collated)
        step_loss = 0.0
        for batch in collated:
            losses, _, _ = token_losses(model, batch)
            loss = losses.sum() / step_tokens
            loss.backward()
            step_loss += float(loss.detach())
        grad_norm = None
        if settings.max_grad_norm is not None:
            grad_norm = float(torch.nn.utils.clip_grad_norm_(parameters, settings.max_grad_norm))
        learning_rate = float(scheduler.get_last_lr()[0])
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        point: dict[str, float | int] = {
            "step": step,
            "loss": step_loss,
            "learning_rate": learning_rate,
        }
        if grad_norm is not None:
            point["grad_norm"] = grad_norm
        curve.append(point)
        report_progress(
            TrainingProgress(
                "training",
                step,
                total,
                step_loss,
                learning_rate,
                eta(time.perf_counter() - train_start, step, total),
            )
        )
    train_seconds = time.perf_counter() - train_start

    report_progress(TrainingProgress("evaluating", total, total))
    after = evaluate(model, held_out, pad_id, device, settings.eval_batch_size)
    report = inputs_report(config, splits.train_file, splits.held_out_file, splits.counts())
    report["data"]["dropped_by_truncation"] = {"train": dropped, "held_out": held_dropped}
    report["training"] = {
        "steps": total,
        "epochs_started": epoch + 1,
        "train_examples": len(train),
        "trainable_parameters": sum(p.numel() for p in parameters),
        "loss_curve": curve,
        "seconds": round(train_seconds, 3),
    }
    report["held_out"] = {
        "before": before,
        "after": after,
        "loss_change": after["loss"] - before["loss"],
    }
    if should_stop is not None and should_stop():
        raise TrainingCancelledError(f"training cancelled after step {total}")
    report_progress(TrainingProgress("saving", total, total))
    report["seconds"] = round(time.perf_counter() - start, 3)
    report["files"] = publish_adapter(model, config.output_dir, report, overwrite=config.overwrite)
    report_progress(TrainingProgress("done", total, total))
    return report
