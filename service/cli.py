"""The ``tureen`` command: each subcommand maps onto one plain function."""

from __future__ import annotations

import argparse
import gc
import json
import re
import sys
from collections.abc import Sequence
from pathlib import Path

from merge_kernels import __version__
from merge_kernels.errors import TureenError
from service.command_checks import check_device_available, check_output_folder, parse_device
from service.command_parser import CommandParser

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?I?B?)?\s*$", re.IGNORECASE)
_UNITS = {
    "": 1,
    "B": 1,
    "KB": 1000,
    "MB": 1000**2,
    "GB": 1000**3,
    "TB": 1000**4,
    "KIB": 1024,
    "MIB": 1024**2,
    "GIB": 1024**3,
    "TIB": 1024**4,
    "K": 1000,
    "M": 1000**2,
    "G": 1000**3,
    "T": 1000**4,
}


def parse_size(text: str) -> int:
    """``5GB``, ``500MB``, ``2GiB`` or a number of bytes."""
    match = _SIZE.match(text)
    unit = (match.group(2) or "").upper() if match else None
    if match is None or unit not in _UNITS:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size; use e.g. 5GB, 500MB or 2GiB")
    return int(float(match.group(1)) * _UNITS[unit])


def _options(args: argparse.Namespace) -> object:
    from merge_kernels.runner import MergeOptions

    return MergeOptions(
        max_shard_bytes=args.shard_size,
        out_dtype=args.out_dtype,
        device=args.device,
        allow_pickle=args.allow_pickle,
        base_dir=Path(args.recipe).resolve().parent,
        overwrite=getattr(args, "overwrite", False),
        executor=args.executor,
        ray_address=args.ray_address,
    )


def _settle_staging(out_dir: Path) -> None:
    """After a failed merge: keep a staging folder a re-run can resume, and say so; drop
    any other."""
    from merge_kernels.io.staging import StagingDir

    staging = StagingDir(out_dir, "settle")
    if not staging.path.exists():
        return
    shards = staging.recorded_shards()
    if shards:
        print(
            f"note: {shards} finished shard(s) are kept in {staging.path}; run the same command "
            "again to resume after them, or delete that folder",
            file=sys.stderr,
        )
    else:
        staging.discard()


def cmd_merge(args: argparse.Namespace) -> int:
    """Merge the recipe's models into OUT_DIR."""
    try:
        return _merge(args)
    except (TureenError, OSError):
        _settle_staging(Path(args.out_dir))
        raise


def _load(args: argparse.Namespace) -> object:
    """The recipe file as a recipe or a multi-document merge; warnings go to stderr."""
    from merge_kernels.multi_merge import MultiMerge, load_merge_file

    loaded = load_merge_file(Path(args.recipe), intermediate_dir=args.intermediate_dir)
    for warning in loaded.warnings():
        print(f"warning: {warning}", file=sys.stderr)
    if isinstance(loaded, MultiMerge):
        print(
            f"note: {len(loaded.steps)} merges; intermediate merges go to "
            f"{loaded.intermediate_dir}/<name>",
            file=sys.stderr,
        )
    return loaded


def _merge(args: argparse.Namespace) -> int:
    from merge_kernels.multi_merge import MultiMerge
    from merge_kernels.recipe import Recipe
    from merge_kernels.runner import run_merge
    from service.progress_bar import ProgressBar

    check_output_folder(Path(args.out_dir), overwrite=args.overwrite)
    check_device_available(args.device)
    loaded = _load(args)
    if isinstance(loaded, MultiMerge):
        return _merge_all(args, loaded)
    assert isinstance(loaded, Recipe)
    recipe = loaded
    bar = None if args.quiet else ProgressBar()
    evaluation = None
    if recipe.method.needs_evaluation or recipe.evaluator is not None:
        from merge_kernels.evaluated_merge import run_evaluated_merge
        from service.evaluation.config import build_evaluator

        evaluator = build_evaluator(
            recipe.evaluator, base_dir=Path(args.recipe).resolve().parent, device=args.device
        )
        scored = run_evaluated_merge(
            recipe,
            Path(args.out_dir),
            evaluator,
            _options(args),  # type: ignore[arg-type]
            progress=bar,
            memory_limit_bytes=args.memory_limit,
        )
        result, evaluation = scored.result, scored.report
    else:
        result = run_merge(recipe, Path(args.out_dir), _options(args), progress=bar)  # type: ignore[arg-type]
    if bar is not None:
        print(file=sys.stderr)
    summary: dict[str, object] = {
        "out_dir": str(result.out_dir),
        "files": result.files,
        "tensors": result.tensors,
        "bytes_written": result.bytes_written,
        "shards_resumed": result.shards_resumed,
        "seconds": round(result.seconds, 3),
    }
    if evaluation is not None:
        summary["evaluation"] = evaluation
    print(json.dumps(summary, indent=2))
    return 0


def _merge_all(args: argparse.Namespace, merges: object) -> int:
    """Run a multi-document file's merges in order; the final one writes OUT_DIR."""
    from merge_kernels.multi_merge import MergeStep, MultiMerge
    from merge_kernels.multi_merge_run import run_multi_merge
    from service.progress_bar import ProgressBar

    assert isinstance(merges, MultiMerge)
    bar = None if args.quiet else ProgressBar()

    def announce(step: MergeStep, target: Path, reused: bool) -> None:
        if bar is not None:
            print(file=sys.stderr)
        doing = "kept from an earlier run:" if reused else "merging into"
        print(f"{step.label}: {doing} {target}", file=sys.stderr)

    results = run_multi_merge(
        merges,
        Path(args.out_dir),
        _options(args),  # type: ignore[arg-type]
        progress=bar,
        announce=announce,
    )
    if bar is not None:
        print(file=sys.stderr)
    summary = [
        {
            "document": item.step.index,
            "name": item.step.name,
            "out_dir": str(item.result.out_dir),
            "reused": item.reused,
            "tensors": item.result.tensors,
            "bytes_written": item.result.bytes_written,
            "seconds": round(item.result.seconds, 3),
        }
        for item in results
    ]
    print(json.dumps({"out_dir": str(results[-1].result.out_dir), "merges": summary}, indent=2))
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    """Print the plan report as JSON; exit 1 if the inputs are incompatible."""
    from merge_kernels.multi_merge import MultiMerge
    from merge_kernels.multi_merge_run import plan_multi_merge
    from merge_kernels.recipe import Recipe
    from merge_kernels.runner import close_inputs, plan_merge

    check_device_available(args.device)
    loaded = _load(args)
    if isinstance(loaded, MultiMerge):
        report = plan_multi_merge(loaded, None, _options(args))  # type: ignore[arg-type]
        print(json.dumps(report, indent=2))
        return 0 if report["ok"] else 1
    assert isinstance(loaded, Recipe)
    recipe = loaded
    plan, inputs = plan_merge(recipe, _options(args))  # type: ignore[arg-type]
    try:
        print(json.dumps(plan.report(), indent=2))
    finally:
        close_inputs(inputs)
    return 0 if not plan.problems else 1


def cmd_methods(args: argparse.Namespace) -> int:
    """List the registered merge methods and their parameters."""
    from merge_kernels.registry import methods

    for spec in methods():
        print(f"{spec.name}: {spec.title} — {spec.paper}")
        for model, scope in ((spec.params, "merge"), (spec.model_params, "per model")):
            for name, info in model.model_fields.items():
                default = "required" if info.is_required() else f"default {info.default!r}"
                print(f"    {info.alias or name} ({scope}, {default}): {info.description}")
    return 0


def cmd_example(args: argparse.Namespace) -> int:
    """Write a small base, three synthetic fine-tunes and a TIES recipe into FOLDER."""
    from merge_kernels.synthetic import LlamaShape, write_checkpoint

    folder = Path(args.folder)
    shape = LlamaShape(
        hidden_size=args.hidden,
        intermediate_size=args.hidden * 3,
        num_hidden_layers=args.layers,
        vocab_size=512,
    )
    write_checkpoint(folder / "base", shape, seed=0)
    for index in (1, 2, 3):
        write_checkpoint(folder / f"finetune-{index}", shape, seed=index, base_seed=0)
    recipe = (
        "merge_method: ties\nbase_model: ./base\nmodels:\n"
        + "".join(
            f"  - model: ./finetune-{i}\n    parameters: {{weight: 1.0, density: 0.2}}\n"
            for i in (1, 2, 3)
        )
        + "dtype: bfloat16\n"
    )
    (folder / "recipe.yaml").write_text(recipe)
    print(f"wrote {folder}/base, finetune-1..3 and {folder}/recipe.yaml")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The ``tureen`` command's parser, with every subcommand."""
    parser = CommandParser(prog="tureen", description="Merge fine-tuned checkpoints.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add_run_options(sub: argparse.ArgumentParser) -> None:
        sub.add_argument("recipe", help="recipe YAML (mergekit-style)")
        sub.add_argument(
            "--shard-size",
            type=parse_size,
            default=5 * 1000**3,
            help="largest output shard, e.g. 5GB (default) or 500MB",
        )
        sub.add_argument(
            "--out-dtype",
            choices=["float32", "float16", "bfloat16"],
            help="output dtype (default: the recipe's, else the base's)",
        )
        sub.add_argument(
            "--device",
            type=parse_device,
            default="cpu",
            help="where kernels run: cpu, cuda or cuda:N",
        )
        sub.add_argument(
            "--allow-pickle",
            action="store_true",
            help="accept .bin/.pt checkpoints via torch's weights-only loader",
        )
        sub.add_argument(
            "--executor",
            choices=["local", "ray"],
            default="local",
            help="where the output shards are merged: local (this process, the default) or "
            "ray (one task per shard on a Ray cluster; pip install 'tureen[ray]')",
        )
        sub.add_argument(
            "--ray-address",
            default=None,
            metavar="ADDR",
            help="--executor ray: the cluster to connect to, e.g. 10.0.0.5:6379 (default: "
            "RAY_ADDRESS, else a cluster started on this machine, else a new local one)",
        )
        sub.add_argument(
            "--intermediate-dir",
            type=Path,
            default=None,
            help="multi-document recipes: where named merges are written, each in a folder "
            "of its name (default: RECIPE-intermediates beside the recipe file)",
        )

    merge = commands.add_parser("merge", help="merge a recipe into OUT_DIR")
    add_run_options(merge)
    merge.add_argument("out_dir", help="output folder (appears only when complete)")
    merge.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an existing OUT_DIR, once the new merge is complete (without it, an "
        "existing OUT_DIR is refused before merging)",
    )
    merge.add_argument("--quiet", action="store_true", help="no progress bar")
    merge.add_argument(
        "--memory-limit",
        type=parse_size,
        default=4 * 1024**3,
        help="greedy soup: keep candidates in memory when two float32 copies and a "
        "candidate fit under this (default 4GiB); else they go through the disk",
    )
    merge.set_defaults(handler=cmd_merge)

    plan = commands.add_parser("plan", help="check inputs and report the plan as JSON")
    add_run_options(plan)
    plan.set_defaults(handler=cmd_plan)

    listing = commands.add_parser("methods", help="list merge methods and parameters")
    listing.set_defaults(handler=cmd_methods)

    example = commands.add_parser("example", help="write tiny synthetic checkpoints + a recipe")
    example.add_argument("folder", help="folder to write base/, finetune-1..3/ and recipe.yaml")
    example.add_argument("--hidden", type=int, default=256, help="hidden size of the models")
    example.add_argument("--layers", type=int, default=4, help="number of transformer layers")
    example.set_defaults(handler=cmd_example)

    from service.search_command import add_search_command

    add_search_command(commands)

    from service.serve import add_serve_command

    add_serve_command(commands)

    from service.demo import add_demo_command

    add_demo_command(commands)

    # train: LoRA SFT, DPO, the tiny base and synthetic task data (training/cli.py).
    from training.cli import add_train_command

    add_train_command(commands)

    from service.push import add_push_command

    add_push_command(commands)

    # import-gguf: convert a GGUF file into a safetensors checkpoint.
    from merge_kernels.checkpoints.gguf_command import add_import_gguf_command

    add_import_gguf_command(commands, parse_size=parse_size)

    from service.config_example import add_config_command

    add_config_command(commands)

    from service.completion import add_completion_command

    add_completion_command(commands)
    return parser


def _os_error_text(error: OSError) -> str:
    if error.strerror is None:
        return str(error)
    where = f": {error.filename}" if error.filename is not None else ""
    return f"{error.strerror}{where}"


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``tureen`` command.

    Errors in the input print one clear line and exit 2 (usage errors too, as argparse
    does); a failing file operation prints the system's message and exits 1.
    """
    args = build_parser().parse_args(argv)
    try:
        return int(args.handler(args))
    except TureenError as error:
        print(f"error: {error.message}", file=sys.stderr)
        for detail in error.details.get("problems", []) or []:  # type: ignore[union-attr]
            print(f"  - {detail}", file=sys.stderr)
        return 2
    except ModuleNotFoundError as error:
        # An optional dependency of this command: name the extra that installs it.
        from service.extras import missing_extra_error

        missing = missing_extra_error(f"tureen {args.command}", error.name or "")
        if missing is None:
            raise
        print(f"error: {missing.message}", file=sys.stderr)
        return 2
    except OSError as error:
        # A folder that cannot be written, a full disk: the system's words, without a traceback.
        print(f"error: {_os_error_text(error)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130


def run() -> None:
    """The ``tureen`` program: :func:`main`, then exit with its status."""
    status = main()
    # The command is done and the process ends here: spare the interpreter's last garbage
    # collections over every object torch created (about 0.3 s of every command's exit).
    gc.freeze()
    sys.exit(status)


if __name__ == "__main__":
    run()
