"""The GPU benchmark in one command: tureen ``--device cuda`` beside mergekit ``--cuda``.

    python3 bench/gpu_run.py --out OUT [--model-gb 8] [--budget-s 530] [--recipes linear,ties]

Made for a fresh GPU machine with no network, whose Python already has torch: every step is
timed, logged and bounded by a time limit, and the whole command ends within ``--budget-s``
seconds. Steps:

1. install the wheels carried in ``--wheels`` (mergekit and whatever else the machine's Python
   lacks) into ``--site`` with ``pip --no-index --no-deps``, and put that folder on
   ``PYTHONPATH`` for every later step;
2. record the GPU, the versions of the packages involved, disk space and memory;
3. import tureen's CLI and mergekit, and merge a tiny synthetic TIES recipe with tureen on
   CUDA and with each mergekit configuration, so that a broken install is found in seconds:
   a mergekit configuration that fails here is left out of the benchmark;
4. write a bf16 base and ``--finetunes`` fine-tunes of ``--model-gb`` each (weights drawn on
   the GPU, see ``bench/generate.py --draw-on``), shrinking the size if the disk is too small;
5. run ``bench/run.py`` on them: tureen (``--device cuda``) and mergekit (``--cuda``) alternate,
   round 0 of every recipe first, then round 1, ...; mergekit with all its single-GPU options
   (``--cuda --read-to-gpu --low-cpu-memory --async-write``) runs once per recipe from round 1;
   the floor (read every input once, write one output once) is measured every round; the
   outputs of tureen's and mergekit's first runs are compared on the GPU; merges that would
   not end before the deadline are left out;
6. write everything under ``--out``: ``gpu-bench.log`` (this log, with every step's output),
   the results JSON of ``bench/run.py`` and ``gpu-trace.csv`` (``nvidia-smi`` every 0.5 s).

Only the standard library is imported here; each step runs in its own process.
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TextIO

REPO = Path(__file__).resolve().parent.parent
GB = 1000**3
TEMP = Path(tempfile.gettempdir())

# mergekit's GPU configurations. "mergekit" is the issue's `--cuda` (math on the GPU, tensors
# read and kept on the CPU); "mergekit-ongpu" adds the other single-GPU options mergekit 0.1.5
# has: read tensors straight to the GPU (--read-to-gpu), keep intermediate results there
# (--low-cpu-memory) and write shards from a background thread (--async-write). --lazy-unpickle
# only matters for .bin inputs; it is kept for parity with the CPU benchmark.
MERGEKIT_ARGS = "--cuda --lazy-unpickle"
MERGEKIT_VARIANT = "mergekit-ongpu"
MERGEKIT_VARIANT_ARGS = "--cuda --read-to-gpu --low-cpu-memory --async-write --lazy-unpickle"

# Estimates for the plan, from the 1 GB runs of bench/device_compare.py on an H200 (tureen:
# linear 2.17 s, ties 2.70 s for 4 GB of inputs, in process) and guesses for the rest.
START_S = {"tureen": 3.0, "mergekit": 8.0}
INPUT_S_PER_GB = {"tureen-linear": 0.55, "tureen-ties": 0.70, "mergekit": 1.0}
DISK_WRITE_GB_S = 1.2
PAGE_CACHE_READ_GB_S = 4.0
PACKAGES = (
    "torch",
    "numpy",
    "safetensors",
    "transformers",
    "tokenizers",
    "huggingface_hub",
    "accelerate",
    "peft",
    "pydantic",
    "pydantic_core",
    "pydantic-settings",
    "typing_extensions",
    "click",
    "tqdm",
    "immutables",
    "mergekit",
    "datasets",
    "pyarrow",
    "fsspec",
    "dill",
    "multiprocess",
    "trl",
    "bitsandbytes",
)


class Log:
    """Lines to stderr and to a file, each with the seconds since the start."""

    def __init__(self, path: Path) -> None:
        self.started = time.monotonic()
        self.handle: TextIO = path.open("a", encoding="utf-8", errors="replace")
        self.lock = threading.Lock()

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def __call__(self, text: str) -> None:
        with self.lock:
            for line in text.rstrip("\n").split("\n"):
                stamped = f"[{self.elapsed():6.1f}s] {line}"
                print(stamped, file=sys.stderr, flush=True)
                self.handle.write(stamped + "\n")
            self.handle.flush()


def run_step(
    log: Log,
    name: str,
    command: Sequence[str],
    *,
    timeout: float,
    env: dict[str, str],
    cwd: Path = REPO,
    echo: bool = True,
) -> tuple[int, str]:
    """Run one step with its output streamed into the log; kill its process group at timeout.

    Returns the exit code (-9 after a timeout, 127 if it could not start) and the output.
    """
    shown = shlex.join(command)
    shown = shown if len(shown) <= 1500 else shown[:200] + " ... " + shown[-100:]
    log(f"== {name}: {shown} (limit {timeout:.0f} s)")
    started = time.monotonic()
    lines: list[str] = []
    try:
        process = subprocess.Popen(
            list(command),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            cwd=cwd,
            start_new_session=True,
            text=True,
            errors="replace",
        )
    except OSError as error:
        log(f"== {name}: could not start: {error}")
        return 127, str(error)

    def pump() -> None:
        assert process.stdout is not None
        for line in process.stdout:
            lines.append(line)
            if echo:
                log("   " + line.rstrip("\n"))

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    try:
        code = process.wait(timeout=max(1.0, timeout))
    except subprocess.TimeoutExpired:
        # SIGTERM first: bench/run.py then kills the merge it is timing (its own session).
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        code = -9
        log(f"== {name}: stopped after its {timeout:.0f} s limit")
    reader.join(timeout=5)
    log(f"== {name}: exit {code} in {time.monotonic() - started:.1f} s")
    return code, "".join(lines)


def free_bytes(folder: Path) -> int:
    """Free bytes on the file system that holds ``folder`` (or its nearest existing parent)."""
    probe = folder
    while not probe.exists():
        probe = probe.parent
    return shutil.disk_usage(probe).free


def plan(model_gb: float, finetunes: int, recipes: Sequence[str]) -> dict[str, float]:
    """Estimated seconds of each step, for the plan printed at the start."""
    inputs = (finetunes + 1) * model_gb
    kind = {r: "tureen-ties" if "ties" in r else "tureen-linear" for r in recipes}
    tureen = {r: START_S["tureen"] + inputs * INPUT_S_PER_GB[kind[r]] for r in recipes}
    mergekit = START_S["mergekit"] + inputs * INPUT_S_PER_GB["mergekit"]
    read = inputs / PAGE_CACHE_READ_GB_S
    write = model_gb / DISK_WRITE_GB_S
    compare = 2 * model_gb / PAGE_CACHE_READ_GB_S + 2
    round0 = sum(read + tureen[r] + mergekit + compare + write + 2 for r in recipes)
    round1 = sum(read + tureen[r] + 2 * mergekit + write + 2 for r in recipes)
    return {
        "install wheels": 20.0,
        "facts, imports, smoke merges": 50.0,
        "generate inputs (GPU draws, disk writes, sync)": inputs / DISK_WRITE_GB_S + 10,
        "benchmark start + warm-up read": 8 + read,
        "round 0 (tureen, mergekit, compare, floor)": round0,
        "round 1 (tureen, mergekit, mergekit-ongpu, floor)": round1,
        "each later round": sum(read + tureen[r] + mergekit + write + 2 for r in recipes),
    }


def smoke_recipe(folder: Path) -> Path:
    """A tiny TIES recipe over the example checkpoints, with absolute paths (for mergekit)."""
    models = "".join(
        f"  - model: {folder / f'finetune-{i}'}\n    parameters:\n      weight: 1.0\n"
        "      density: 0.2\n"
        for i in (1, 2, 3)
    )
    path = folder / "smoke-ties.yaml"
    path.write_text(
        f"merge_method: ties\nbase_model: {folder / 'base'}\nmodels:\n{models}dtype: bfloat16\n"
    )
    return path


def mergekit_script(site: Path, scratch: Path, python: str) -> Path:
    """``mergekit-yaml`` as pip installed it into ``site``, else a small wrapper around it."""
    installed = site / "bin" / "mergekit-yaml"
    if installed.is_file() and os.access(installed, os.X_OK):
        return installed
    wrapper = scratch / "mergekit-yaml"
    wrapper.write_text(f'#!/bin/sh\nexec {shlex.quote(python)} -m mergekit.scripts.run_yaml "$@"\n')
    wrapper.chmod(0o755)
    return wrapper


def start_trace(log: Log, path: Path) -> subprocess.Popen[bytes] | None:
    """``nvidia-smi`` sampling the GPU every 0.5 s into ``path``, if it is there."""
    if shutil.which("nvidia-smi") is None:
        log("nvidia-smi not found: no GPU trace")
        return None
    query = "timestamp,utilization.gpu,utilization.memory,memory.used,power.draw,clocks.sm"
    with path.open("wb") as handle:
        return subprocess.Popen(
            ["nvidia-smi", f"--query-gpu={query}", "--format=csv", "-lms", "500"],
            stdout=handle,
            stderr=subprocess.DEVNULL,
            stdin=subprocess.DEVNULL,
        )


def stop_trace(process: subprocess.Popen[bytes] | None) -> None:
    if process is not None and process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


FACTS = """
import importlib.metadata as md, os, platform, sys
print("python", sys.version.split()[0], sys.executable, "cores", os.cpu_count())
print("platform", platform.platform())
for name in {packages!r}:
    try:
        print(f"  {{name}} {{md.version(name)}}")
    except md.PackageNotFoundError:
        print(f"  {{name}} MISSING")
import torch
print("torch", torch.__version__, "cuda", torch.version.cuda,
      "available", torch.cuda.is_available(), "threads", torch.get_num_threads())
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("gpu", p.name, round(p.total_memory / 2**30, 1), "GiB", p.multi_processor_count, "SMs")
    x = torch.empty(2**28, dtype=torch.uint8, pin_memory=True)
    y = torch.empty(2**28, dtype=torch.uint8, device="cuda")
    y.copy_(x, non_blocking=True); torch.cuda.synchronize()
    import time
    t = time.perf_counter(); y.copy_(x, non_blocking=True); torch.cuda.synchronize()
    print("pinned host->device copy", round(2**28 / (time.perf_counter() - t) / 1e9, 1), "GB/s")
"""


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for the log and results")
    parser.add_argument("--model-gb", type=float, default=8.0, help="size of each model, GB")
    parser.add_argument("--finetunes", type=int, default=3)
    parser.add_argument("--recipes", default="linear,ties", help="e.g. linear,ties,dare_ties")
    parser.add_argument("--repeats", type=int, default=3, help="most runs per tool and recipe")
    parser.add_argument("--budget-s", type=float, default=530.0, help="wall-time budget")
    parser.add_argument("--device", default="cuda", help="tureen's --device (cpu to test)")
    parser.add_argument("--mergekit-args", default=MERGEKIT_ARGS, help=f"default {MERGEKIT_ARGS!r}")
    parser.add_argument(
        "--variant-args",
        default=MERGEKIT_VARIANT_ARGS,
        help=f"{MERGEKIT_VARIANT}'s arguments ('' leaves it out); default "
        f"{MERGEKIT_VARIANT_ARGS!r}",
    )
    parser.add_argument(
        "--deltas",
        default="scaled",
        help="the fine-tunes' deltas, as bench/generate.py --deltas (bf16-ties: heavy ties)",
    )
    parser.add_argument("--no-mergekit", action="store_true", help="tureen only")
    parser.add_argument("--mergekit", type=Path, help="a mergekit-yaml to use (else installed)")
    parser.add_argument("--wheels", type=Path, default=REPO / ".whl", help="wheels to install")
    parser.add_argument("--site", type=Path, default=TEMP / "site", help="install target")
    parser.add_argument("--data", type=Path, default=REPO / "bench" / "data")
    parser.add_argument("--scratch", type=Path, default=TEMP / "tureen-gpu-bench")
    args = parser.parse_args(argv)
    args.scratch = args.scratch.resolve()
    args.data = args.data.resolve()

    args.out.mkdir(parents=True, exist_ok=True)
    log = Log(args.out / "gpu-bench.log")
    deadline = log.started + float(args.budget_s)

    def left() -> float:
        return deadline - time.monotonic()

    recipes = [r for r in args.recipes.split(",") if r]
    python = sys.executable
    env = dict(os.environ, PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    log(f"GPU benchmark: {args.model_gb:g} GB × {args.finetunes + 1} models, recipes {recipes}, ")
    log(f"budget {args.budget_s:.0f} s, tureen --device {args.device}, python {python}")
    estimates = plan(args.model_gb, args.finetunes, recipes)
    total = 0.0
    for step, seconds in estimates.items():
        if step != "each later round":
            total += seconds
        log(f"  plan: {step:52s} ~{seconds:5.0f} s (cumulative ~{total:4.0f} s)")
    log("  later rounds and runs that would not end in the budget are left out by bench/run.py")

    # 1. Wheels.
    wheels = sorted(args.wheels.glob("*.whl")) if args.wheels.is_dir() else []
    if wheels:
        code, _ = run_step(
            log,
            "install wheels",
            [python, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
             "--no-cache-dir", "--upgrade", "--target", str(args.site), *map(str, wheels)],
            timeout=min(240.0, left()),
            env=env,
        )  # fmt: skip
        if code != 0:
            log("wheel install failed; carrying on with what the machine has")
    else:
        log(f"no wheels in {args.wheels}: using the machine's packages")
    path = [str(args.site), str(REPO), env.get("PYTHONPATH", "")]
    env["PYTHONPATH"] = os.pathsep.join(p for p in path if p)
    env["PATH"] = os.pathsep.join([str(args.site / "bin"), env.get("PATH", "")])

    # 2. Facts.
    facts = FACTS.format(packages=PACKAGES)
    run_step(log, "python facts", [python, "-c", facts], timeout=min(90.0, left()), env=env)
    if shutil.which("nvidia-smi"):
        run_step(log, "nvidia-smi", ["nvidia-smi"], timeout=min(30.0, left()), env=env)
    run_step(log, "disk", ["df", "-h", str(REPO), str(TEMP)], timeout=10, env=env)
    run_step(log, "memory", ["free", "-g"], timeout=10, env=env)

    # 3. Imports and smoke merges.
    args.scratch.mkdir(parents=True, exist_ok=True)
    smoke = args.scratch / "smoke"
    shutil.rmtree(smoke, ignore_errors=True)
    tools = ["tureen"]
    variants: dict[str, str] = {}
    code, _ = run_step(
        log,
        "import tureen",
        [python, "-c", "import service.cli, merge_kernels.runner; print('tureen imports ok')"],
        timeout=min(90.0, left()),
        env=env,
    )
    if code != 0:
        log("tureen does not import: nothing to benchmark")
        return 1
    code, _ = run_step(
        log,
        "tiny checkpoints",
        [python, "-m", "service.cli", "example", str(smoke), "--hidden", "256", "--layers", "2"],
        timeout=min(90.0, left()),
        env=env,
    )
    recipe = smoke_recipe(smoke)
    code, _ = run_step(
        log,
        "smoke: tureen",
        [python, "-m", "service.cli", "merge", str(recipe), str(smoke / "out-tureen"),
         "--quiet", "--device", args.device],
        timeout=min(120.0, left()),
        env=env,
    )  # fmt: skip
    if code != 0:
        log(f"tureen --device {args.device} fails on a tiny recipe: nothing to benchmark")
        return 1
    mergekit: Path | None = None
    if not args.no_mergekit:
        mergekit = args.mergekit or mergekit_script(args.site, args.scratch, python)
        configs = {"mergekit": args.mergekit_args}
        if args.variant_args:
            configs[MERGEKIT_VARIANT] = args.variant_args
        for tool, extra in configs.items():
            code, _ = run_step(
                log,
                f"smoke: {tool}",
                [str(mergekit), str(recipe), str(smoke / f"out-{tool}"), *shlex.split(extra),
                 "--quiet"],
                timeout=min(150.0, left()),
                env=env,
            )  # fmt: skip
            if code == 0:
                tools.append(tool)
                if tool != "mergekit":
                    variants[tool] = extra
            else:
                log(f"{tool} ({extra}) fails on a tiny recipe: left out of the benchmark")

    # 4. Inputs: shrink the size if the disk cannot hold the inputs and two outputs.
    model_gb = args.model_gb
    kept = sum(p.stat().st_size for p in args.data.rglob("*") if p.is_file())
    free = free_bytes(args.data) + kept  # a set already there is reused or replaced
    need = ((args.finetunes + 3) * model_gb + 2) * GB
    if free < need:
        model_gb = max(0.5, int(2 * (free / GB - 2) / (args.finetunes + 3)) / 2)
        log(f"only {free / GB:.1f} GB free at {args.data}: models of {model_gb:g} GB instead")
    draw_on = "cuda" if args.device.startswith("cuda") else "cpu"
    code, _ = run_step(
        log,
        "generate inputs",
        [python, str(REPO / "bench" / "generate.py"), "--model-gb", f"{model_gb:g}",
         "--finetunes", str(args.finetunes), "--data", str(args.data), "--draw-on", draw_on,
         "--deltas", args.deltas],
        timeout=max(10.0, min(300.0, left() - 60)),
        env=env,
    )  # fmt: skip
    if code != 0:
        log("input generation failed")
        return 1

    # 5. The benchmark.
    name = f"gpu-{model_gb:g}gb-{args.finetunes}ft"
    command = [
        python, str(REPO / "bench" / "run.py"),
        "--model-gb", f"{model_gb:g}", "--finetunes", str(args.finetunes),
        "--data", str(args.data), "--draw-on", draw_on, "--deltas", args.deltas,
        "--recipes", ",".join(recipes), "--tools", ",".join(tools),
        "--repeats", str(args.repeats),
        f"--tureen-args=--device {args.device}",
        "--order", "round", "--rewarm", "round",
        "--compare-first", "--compare-device", draw_on, "--keep-outputs-cached",
        "--goals", "gpu", "--results", str(args.out), "--name", name,
    ]  # fmt: skip
    if mergekit is not None and len(tools) > 1:
        command += ["--mergekit", str(mergekit), f"--mergekit-args={args.mergekit_args}"]
        for tool, extra in variants.items():
            command += [
                f"--mergekit-variant={tool}={extra}",
                f"--tool-repeats={tool}=1",
                f"--tool-first-round={tool}=1",
            ]
    margin = 15.0
    command += ["--deadline-s", f"{max(10.0, left() - margin):.0f}"]
    trace = start_trace(log, args.out / "gpu-trace.csv")
    try:
        code, _ = run_step(
            log, "benchmark", command, timeout=max(10.0, left() - margin / 2), env=env
        )
    finally:
        stop_trace(trace)
    outputs = sorted(p.name for p in args.out.iterdir())
    log(f"done in {log.elapsed():.0f} s (budget {args.budget_s:.0f} s); {args.out}: {outputs}")
    return 0 if code == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
