"""Where a streaming merge spends its time: busy seconds of each pipeline stage.

    python bench/stage_profile.py --set bench/data/llama-1gb-bfloat16-s2gb --method linear \
        [--device cuda]

Runs one merge in this process with the runner's stages wrapped in timers: reading a piece
from every input (``read``, on the read-ahead thread), merging it (``compute``: conversion,
kernel, transfers), and writing it (``write``, on the write-behind thread; ``pwrite`` is the
part spent in the system call, the rest is mostly the shard checksum). A stage whose busy
time is close to the wall time is the one that binds.
"""

from __future__ import annotations

import argparse
import collections
import json
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import merge_kernels  # noqa: F401  (sets the allocator environment before torch loads)
import merge_kernels.runner as runner
from merge_kernels.io import shard_writer
from merge_kernels.recipe import parse_recipe
from merge_kernels.runner import MergeOptions, run_merge

BUSY: dict[str, float] = collections.defaultdict(float)


def timed(stage: str, function: Callable[..., Any]) -> Callable[..., Any]:
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        started = time.perf_counter()
        try:
            return function(*args, **kwargs)
        finally:
            BUSY[stage] += time.perf_counter() - started

    return wrapper


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--set", type=Path, required=True, help="a bench/generate.py set")
    parser.add_argument("--method", default="linear", choices=["linear", "ties", "dare_ties"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--read-threads", type=int, help="inputs read at once (default 8)")
    args = parser.parse_args()
    if args.read_threads is not None:
        import merge_kernels.pieces as pieces

        pieces.READ_THREADS = args.read_threads
    models = [args.set / f"finetune-{i}" for i in (1, 2, 3)]
    document: dict[str, Any] = {"merge_method": args.method, "dtype": "bfloat16"}
    if args.method == "linear":
        document["models"] = [{"model": str(m)} for m in [args.set / "base", *models]]
    else:
        document["base_model"] = str(args.set / "base")
        density = 0.2 if args.method == "ties" else 0.1
        document["models"] = [
            {"model": str(m), "parameters": {"weight": 1.0, "density": density}} for m in models
        ]
    runner.read_piece = timed("read", runner.read_piece)  # type: ignore[assignment]
    runner.PieceMerger.compute = timed("compute", runner.PieceMerger.compute)  # type: ignore[method-assign]
    runner._write = timed("write", runner._write)
    shard_writer._pwrite_all = timed("pwrite", shard_writer._pwrite_all)
    with tempfile.TemporaryDirectory(dir=args.set.parent) as work:
        started = time.perf_counter()
        run_merge(parse_recipe(document), Path(work) / "out", MergeOptions(device=args.device))
        wall = time.perf_counter() - started
        shutil.rmtree(Path(work) / "out", ignore_errors=True)
    print(
        json.dumps(
            {
                "set": args.set.name,
                "method": args.method,
                "device": args.device,
                "read_threads": args.read_threads,
                "wall_s": round(wall, 2),
                "busy_s": {stage: round(seconds, 2) for stage, seconds in BUSY.items()},
            }
        )
    )


if __name__ == "__main__":
    main()
