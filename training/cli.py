"""``tureen train``: build the tiny base, write synthetic task data, train LoRA and DPO adapters.

* ``tureen train base OUT_DIR`` builds (and briefly pre-trains) the tiny Llama base;
* ``tureen train data OUT_DIR`` writes synthetic task data (and configs, given ``--base``);
* ``tureen train lora CONFIG`` / ``tureen train dpo CONFIG`` train an adapter from a YAML or
  JSON config, with progress on stderr and a JSON summary on stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any, TextIO

from training.progress import TrainingProgress

DEFAULT_SFT_TASKS = ("reverse", "add", "upper")
DEFAULT_PREFERENCE_TASKS = ("title",)


class _ProgressLine:
    """One rewritten stderr line: phase, step, loss, learning rate and ETA."""

    def __init__(self, stream: TextIO | None = None) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.phase = ""

    def __call__(self, update: TrainingProgress) -> None:
        if update.phase == "training":
            eta = f"  eta {update.eta_seconds:.0f}s" if update.eta_seconds is not None else ""
            line = (
                f"\rstep {update.step}/{update.total_steps}  loss {update.loss:.4f}  "
                f"lr {update.learning_rate:.2e}{eta}   "
            )
            print(line, end="", file=self.stream, flush=True)
        elif update.phase != self.phase:
            newline = "\n" if self.phase == "training" else ""
            print(f"{newline}{update.phase}", file=self.stream, flush=True)
        self.phase = update.phase


def quiet_libraries() -> None:
    """Keep stderr for our progress: no library progress bars or deprecation warnings."""
    import warnings

    from transformers.utils import logging as transformers_logging

    warnings.filterwarnings("ignore", category=FutureWarning)
    logging: Any = transformers_logging
    logging.disable_progress_bar()
    logging.set_verbosity_error()


def cmd_train(args: argparse.Namespace) -> int:
    """Train an adapter from a config file; print the summary as JSON."""
    from training.config import load_training_config
    from training.runner import run_training, summary

    config = load_training_config(Path(args.config), args.kind)
    quiet_libraries()
    progress = None if args.quiet else _ProgressLine()
    report = run_training(config, progress=progress)
    print(json.dumps(summary(report), indent=2))
    return 0


def cmd_base(args: argparse.Namespace) -> int:
    """Build the tiny base model into OUT_DIR."""
    from training.tiny_base import TinyBaseSpec, build_tiny_base

    quiet_libraries()
    spec = TinyBaseSpec(
        hidden_size=args.hidden,
        intermediate_size=args.hidden * 11 // 4,
        num_hidden_layers=args.layers,
        seed=args.seed,
        pretrain_steps=args.pretrain_steps,
    )

    def progress(step: int, steps: int, loss: float) -> None:
        if not args.quiet and (step % 10 == 0 or step == steps):
            end = "\n" if step == steps else ""
            print(f"\rpre-training {step}/{steps}  loss {loss:.4f}", end=end, file=sys.stderr)

    try:
        result = build_tiny_base(
            Path(args.out_dir), spec, overwrite=args.overwrite, progress=progress
        )
    except FileExistsError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    summary: dict[str, Any] = {
        "folder": str(result.folder),
        "parameters": result.parameters,
        "vocab_size": result.vocab_size,
        "pretrain_steps": len(result.losses),
        "final_loss": round(result.losses[-1], 4) if result.losses else None,
        "seconds": round(result.seconds, 2),
    }
    print(json.dumps(summary, indent=2))
    return 0


def _config_text(kind: str, base: str, task_dir: str, output: str) -> str:
    lines = [
        f"base_model: {base}",
        f"output_dir: {output}",
        "data:",
        f"  train: {task_dir}/train.jsonl",
        f"  eval: {task_dir}/heldout.jsonl",
        "lora: {r: 8, alpha: 16, target_modules: all-linear}",
    ]
    if kind == "lora":
        lines.append("training: {seed: 0, max_steps: 60, learning_rate: 0.01, batch_size: 16}")
    else:
        lines.append("training: {seed: 0, max_steps: 30, learning_rate: 0.005, batch_size: 8}")
        lines.append("dpo: {beta: 0.1, loss_type: sigmoid}")
    return "\n".join(lines) + "\n"


def cmd_data(args: argparse.Namespace) -> int:
    """Write synthetic task data (and configs that train on it, given ``--base``)."""
    from training.tasks import write_task

    out = Path(args.out_dir)
    written: list[str] = []
    jobs = [(task, False) for task in args.tasks] + [(task, True) for task in args.pairs]
    for task, preferences in jobs:
        name = f"{task}-pairs" if preferences else task
        files = write_task(
            out / name,
            task,
            train=args.train,
            heldout=args.heldout,
            seed=args.seed,
            preferences=preferences,
        )
        written += [str(files.train), str(files.heldout)]
        if args.base is not None:
            kind = "dpo" if preferences else "lora"
            base = os.path.relpath(Path(args.base).resolve(), out.resolve())
            config = out / f"{name}.{kind}.yaml"
            config.write_text(_config_text(kind, base, name, f"adapters/{name}"))
            written.append(str(config))
    print(json.dumps({"files": written}, indent=2))
    return 0


def _task_list(text: str) -> list[str]:
    from training.tasks import TASKS

    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in TASKS]
    if unknown:
        raise argparse.ArgumentTypeError(
            f"unknown task(s) {', '.join(unknown)}; known: {', '.join(TASKS)}"
        )
    return names


def add_train_command(commands: Any) -> None:
    """Add ``tureen train {lora,dpo,base,data}`` to the ``tureen`` command's subparsers."""
    train = commands.add_parser("train", help="train LoRA/DPO adapters to merge")
    kinds = train.add_subparsers(dest="train_command", required=True, metavar="KIND")
    for kind, title in (("lora", "LoRA supervised fine-tuning"), ("dpo", "DPO with LoRA")):
        sub = kinds.add_parser(kind, help=f"{title} from a YAML/JSON config")
        sub.add_argument("config", help="training config file (YAML or JSON)")
        sub.add_argument("--quiet", action="store_true", help="no progress on stderr")
        sub.set_defaults(handler=cmd_train, kind=kind)

    base = kinds.add_parser("base", help="build a tiny Llama base model (no download)")
    base.add_argument("out_dir", help="model folder to write")
    base.add_argument(
        "--pretrain-steps",
        type=int,
        default=100,
        help="pre-training steps on the synthetic tasks; 0: random weights",
    )
    base.add_argument("--hidden", type=int, default=64, help="hidden size of the model")
    base.add_argument("--layers", type=int, default=2, help="number of transformer layers")
    base.add_argument("--seed", type=int, default=0, help="seed of the weights and pre-training")
    base.add_argument("--overwrite", action="store_true", help="replace an existing OUT_DIR")
    base.add_argument("--quiet", action="store_true", help="no progress on stderr")
    base.set_defaults(handler=cmd_base)

    data = kinds.add_parser("data", help="write synthetic task data (JSONL) and configs")
    data.add_argument("out_dir", help="folder to write the task data (and configs) into")
    data.add_argument(
        "--tasks",
        type=_task_list,
        default=list(DEFAULT_SFT_TASKS),
        help="prompt/completion tasks, comma separated (default reverse,add,upper)",
    )
    data.add_argument(
        "--pairs",
        type=_task_list,
        default=list(DEFAULT_PREFERENCE_TASKS),
        help="tasks written as DPO preference pairs (default title)",
    )
    data.add_argument("--train", type=int, default=256, help="training records per task")
    data.add_argument("--heldout", type=int, default=64, help="held-out records per task")
    data.add_argument("--seed", type=int, default=0, help="seed of the generated records")
    data.add_argument("--base", help="base model folder: also write a config per task")
    data.set_defaults(handler=cmd_data)
