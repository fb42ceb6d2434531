"""``tureen search SPEC OUT_DIR``: tune a recipe's parameters against an evaluator, locally.

The search (:mod:`merge_kernels.search`) prints one line per evaluation on stderr and the
summary as JSON on stdout. With ``--state FILE`` its state is written atomically after every
evaluation, so a search that was interrupted (Ctrl-C, a killed process, a lost machine)
resumes where it was when the same command runs again, without scoring any point twice.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from service.command_checks import check_device_available, check_output_folder, parse_device

if TYPE_CHECKING:
    from merge_kernels.search import SearchProgress


def add_search_command(commands: Any) -> None:
    """Add ``tureen search`` to the ``tureen`` command's subparsers."""
    search = commands.add_parser(
        "search",
        help="search a recipe's parameters (grid, random, cmaes) against an evaluator",
        description="Merge and score candidates of a recipe whose parameters hold search "
        "dimensions, then write the best one into OUT_DIR with report.json, scores.svg and "
        "best_recipe.yaml.",
    )
    search.add_argument("spec", help="search spec YAML: recipe, strategy, budget, evaluator")
    search.add_argument("out_dir", help="the winner's output folder (appears when complete)")
    search.add_argument(
        "--state",
        type=Path,
        default=None,
        metavar="FILE",
        help="save the search's state here after every evaluation and resume from it "
        "(default: no state file; an interrupted search starts over)",
    )
    search.add_argument(
        "--seed", type=int, default=None, help="the strategy's seed (default: the spec's)"
    )
    search.add_argument(
        "--device",
        type=parse_device,
        default="cpu",
        help="where merges and the held-out evaluator run: cpu, cuda or cuda:N",
    )
    search.add_argument("--quiet", action="store_true", help="no progress lines")
    search.set_defaults(handler=cmd_search)


def cmd_search(args: argparse.Namespace) -> int:
    """Run (or resume) the search of SPEC and write its winner into OUT_DIR."""
    from merge_kernels.runner import MergeOptions
    from merge_kernels.search import (
        JsonFileStateStore,
        load_search_spec,
        run_search,
    )
    from service.evaluation.config import build_evaluator

    check_device_available(args.device)
    spec_path = Path(args.spec)
    spec = load_search_spec(spec_path)
    if args.seed is not None:
        spec = spec.model_copy(update={"seed": args.seed})
    store = JsonFileStateStore(args.state) if args.state is not None else None
    saved = store.load() if store is not None else None
    finished = saved is not None and saved.get("status") == "finished"
    if not finished:
        check_output_folder(Path(args.out_dir), overwrite=False)
    base_dir = spec_path.resolve().parent

    def evaluators(section: Any) -> Any:
        return build_evaluator(section, base_dir=base_dir, device=args.device)

    def show(progress: SearchProgress) -> None:
        if args.quiet:
            return
        print(_progress_line(progress), file=sys.stderr, flush=True)

    report = run_search(
        spec,
        Path(args.out_dir),
        evaluators=evaluators,
        state_store=store,
        options=MergeOptions(base_dir=base_dir, device=args.device),
        on_progress=show,
    )
    data = report.data
    summary = {
        "out_dir": str(report.out_dir),
        "strategy": data["strategy"]["name"],
        "evaluations": len(data["evaluations"]),
        "stopped_by": data["stopped_by"],
        "evaluator": data["evaluator"],
        "best": data["best"],
        "written_validation_score": data.get("written_validation_score"),
        "test": data.get("test"),
        "best_recipe": str(report.out_dir / "best_recipe.yaml"),
    }
    print(json.dumps(summary, indent=2))
    return 0


def _progress_line(progress: SearchProgress) -> str:
    point = " ".join(f"{k}={_short(v)}" for k, v in (progress.point or {}).items())
    head = f"[{progress.done}/{progress.budget}]"
    if progress.phase == "resumed":
        return f"{head} resuming: {progress.done} evaluation(s) already scored"
    if progress.phase == "writing":
        return f"{head} writing the best candidate ({point}, score {_short(progress.score)})"
    if progress.phase == "done":
        return f"{head} done"
    where = "in memory" if progress.in_memory else "on disk"
    return f"{head} {point} -> {_short(progress.score)} (best {_short(progress.best)}, {where})"


def _short(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    return "failed" if value is None else str(value)
