"""Time tureen's streaming merge side by side with mergekit on the same synthetic checkpoints.

For each recipe (linear, task_arithmetic, ties density 0.2, dare_ties density 0.1, written
once in mergekit's YAML syntax and given unchanged to both tools) the runs alternate
tureen, mergekit, tureen, mergekit, ... each as its own process:

- tureen: ``python -m service.cli merge RECIPE OUT --quiet`` (the ``tureen merge`` command);
- mergekit: ``mergekit-yaml RECIPE OUT --lazy-unpickle --quiet`` from its own virtualenv
  (``--mergekit``), on the CPU, which is its default.

tureen runs from a copy of its packages taken when the benchmark starts, so that every run
measures the same code (the commit and any uncommitted changes are recorded with it).

Every run is timed from process start to exit (interpreter start-up and imports included).
Its peak RSS is the larger of GNU time's "Maximum resident set size" (``/usr/bin/time``
launches every run; the kernel's ``ru_maxrss`` of the command and its reaped children) and
the peak of the summed RSS of the whole process tree, polled from ``/proc`` every 20 ms.
After each run, ``sync`` is timed separately (tureen fsyncs its output before it exits;
mergekit leaves it to the page cache), then the output is deleted and synced away.

The page cache is warm: every input file is read once before the first timed run, and the
floor's read pass (below) runs again just before every merge, so each merge starts with the
inputs cached.

The floor is the time to read every input byte once plus the time to write one output's
bytes once: the read pass reads all input files with ``preadv`` into one 64 MiB buffer; the
write pass ``pwrite``s 64 MiB blocks into a new file of the output's size and fsyncs it, as
tureen does. Both are timed in every round, alternating with the merges.

In the last round of each recipe the two outputs are compared tensor by tensor (untimed).

Results go to ``bench/results/<date>-<name>.json``, and a markdown table is printed.

Usage: ``python bench/run.py --model-gb 3 --mergekit ../mergekit-venv/bin/mergekit-yaml
[--repeats 3] [--mergekit-repeats ties=1] [--recipes linear,ties] [--tools tureen,mergekit]``
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench.generate import (  # noqa: E402
    DEFAULT_DATA,
    DataSet,
    checkpoint_bytes,
    checkpoint_files,
    ensure_dataset,
)
from service.cli import parse_size  # noqa: E402

GB = 1000**3
BLOCK = 64 * 1024 * 1024
POLL_SECONDS = 0.02
TIME = "/usr/bin/time"  # GNU time
RESULTS = Path(__file__).resolve().parent / "results"
SNAPSHOT_PACKAGES = ("merge_kernels", "service")
RECIPES = ("linear", "task_arithmetic", "ties", "dare_ties")
TOOLS = ("tureen", "mergekit")

# The targets the README states next to the numbers.
TARGET_LINEAR_SPEEDUP = 3.0
TARGET_LINEAR_RSS_GB = 0.6
TARGET_TIES_SPEEDUP = 15.0
TARGET_LINEAR_FLOOR_RATIO = 1.3


def recipe_yaml(method: str, data: DataSet) -> str:
    """A mergekit config for ``method`` over the data set's base and fine-tunes."""
    base = data.base
    tuned = data.finetunes
    if method == "linear":
        # Every model in the soup, the base too, so every recipe reads the same inputs.
        models = "".join(
            f"  - model: {path}\n    parameters:\n      weight: 1.0\n" for path in data.models
        )
        return f"merge_method: linear\nmodels:\n{models}dtype: bfloat16\n"
    if method == "task_arithmetic":
        params = "      weight: 0.5\n"
    elif method == "ties":
        params = "      weight: 1.0\n      density: 0.2\n"
    elif method == "dare_ties":
        params = "      weight: 1.0\n      density: 0.1\n"
    else:
        raise ValueError(f"unknown recipe {method!r}")
    models = "".join(f"  - model: {path}\n    parameters:\n{params}" for path in tuned)
    return f"merge_method: {method}\nbase_model: {base}\nmodels:\n{models}dtype: bfloat16\n"


def recipe_inputs(method: str, data: DataSet) -> tuple[Path, ...]:
    """The checkpoint folders a recipe reads."""
    return data.models


# --------------------------------------------------------------------------------------------
# Process measurement


def _children(pid: int) -> list[int]:
    found: list[int] = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return found
    for tid in tasks:
        try:
            with open(f"/proc/{pid}/task/{tid}/children") as handle:
                found += [int(c) for c in handle.read().split()]
        except OSError:
            continue
    return found


def _rss_bytes(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/statm") as handle:
            return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, IndexError, ValueError):
        return 0


def tree_rss_bytes(root: int) -> int:
    """The summed RSS of ``root`` and all its descendants now."""
    total = 0
    stack = [root]
    seen: set[int] = set()
    while stack:
        pid = stack.pop()
        if pid in seen:
            continue
        seen.add(pid)
        total += _rss_bytes(pid)
        stack += _children(pid)
    return total


@dataclass
class ProcessRun:
    """One measured process."""

    command: list[str]
    returncode: int
    wall_s: float
    maxrss_time_bytes: int
    tree_rss_peak_bytes: int
    cpu_s: float
    load_before: float
    stdout_tail: str
    stderr_tail: str

    @property
    def peak_rss_bytes(self) -> int:
        """The larger of the two peak-RSS measurements."""
        return max(self.maxrss_time_bytes, self.tree_rss_peak_bytes)


def _tail(path: Path, chars: int = 4000) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    return text[-chars:]


def measure(command: list[str], log_dir: Path, env: dict[str, str], cwd: Path) -> ProcessRun:
    """Run ``command`` to completion; its wall time and peak RSS (whole process tree)."""
    log_dir.mkdir(parents=True, exist_ok=True)
    out_path, err_path = log_dir / "stdout.txt", log_dir / "stderr.txt"
    time_path = log_dir / "time.txt"
    # /usr/bin/time forks the command from a tiny process: Linux carries a process's peak RSS
    # across fork+exec, so forking straight from this (larger) process would inflate it.
    launcher = [TIME, "-f", "%M %U %S", "-o", str(time_path)]
    peak = [0]
    load = os.getloadavg()[0]  # 1-minute load average, a sign of other work on the machine
    done = threading.Event()
    with out_path.open("wb") as out, err_path.open("wb") as err:
        started = time.monotonic()
        process = subprocess.Popen(launcher + command, stdout=out, stderr=err, env=env, cwd=cwd)

        def poll() -> None:
            while not done.is_set():
                tree = sum(tree_rss_bytes(child) for child in _children(process.pid))
                peak[0] = max(peak[0], tree)
                done.wait(POLL_SECONDS)

        poller = threading.Thread(target=poll, daemon=True)
        poller.start()
        returncode = process.wait()
        wall = time.monotonic() - started
        done.set()
        poller.join()
    try:
        # "Command exited with non-zero status N" may come first.
        maxrss_kb, user_s, sys_s = time_path.read_text().split("\n")[-2].split()
        maxrss, cpu = int(maxrss_kb) * 1024, float(user_s) + float(sys_s)
    except (OSError, ValueError, IndexError):
        maxrss, cpu = 0, float("nan")
    return ProcessRun(
        command=command,
        returncode=returncode,
        wall_s=wall,
        maxrss_time_bytes=maxrss,
        tree_rss_peak_bytes=peak[0],
        cpu_s=cpu,
        load_before=load,
        stdout_tail=_tail(out_path),
        stderr_tail=_tail(err_path),
    )


# --------------------------------------------------------------------------------------------
# The floor


def read_all(files: Sequence[Path], buffer: bytearray) -> tuple[float, int]:
    """Read every byte of ``files`` once with preadv; (seconds, bytes)."""
    view = memoryview(buffer)
    total = 0
    started = time.monotonic()
    for path in files:
        fd = os.open(path, os.O_RDONLY)
        try:
            offset = 0
            while True:
                got = os.preadv(fd, [view], offset)
                if got <= 0:
                    break
                offset += got
            total += offset
        finally:
            os.close(fd)
    return time.monotonic() - started, total


def write_once(path: Path, nbytes: int, buffer: bytearray) -> tuple[float, float]:
    """Write ``nbytes`` to a new file with pwrite, then fsync; (seconds, seconds before fsync)."""
    view = memoryview(buffer)
    started = time.monotonic()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.ftruncate(fd, nbytes)
        offset = 0
        while offset < nbytes:
            chunk = view[: min(len(view), nbytes - offset)]
            offset += os.pwrite(fd, chunk, offset)
        written = time.monotonic() - started
        os.fsync(fd)
    finally:
        os.close(fd)
    return time.monotonic() - started, written


def drop_file(path: Path) -> None:
    """Delete a file or folder and flush the deletion to disk."""
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()
    os.sync()


def drop_cached(folder: Path) -> None:
    """Evict a (synced) folder's pages from the page cache."""
    for path in folder.rglob("*"):
        if path.is_file():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


# --------------------------------------------------------------------------------------------
# Comparing outputs


def _tensor_files(folder: Path) -> dict[str, Path]:
    from safetensors import safe_open

    found: dict[str, Path] = {}
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as handle:
            for name in handle.keys():  # noqa: SIM118 (safe_open has no __iter__)
                found[name] = path
    return found


def compare_outputs(first: Path, second: Path) -> dict[str, object]:
    """Compare two merged checkpoints tensor by tensor."""
    import torch
    from safetensors import safe_open

    left, right = _tensor_files(first), _tensor_files(second)
    if set(left) != set(right):
        return {
            "same_names": False,
            "only_first": sorted(set(left) - set(right))[:10],
            "only_second": sorted(set(right) - set(left))[:10],
        }
    elements = differing = 0
    max_abs = 0.0
    squared_diff = squared_ref = 0.0
    dtypes: set[str] = set()
    for name in sorted(left):
        with (
            safe_open(str(left[name]), framework="pt") as a_file,
            safe_open(str(right[name]), framework="pt") as b_file,
        ):
            a_raw, b_raw = a_file.get_tensor(name), b_file.get_tensor(name)
        dtypes.add(f"{a_raw.dtype}/{b_raw.dtype}")
        a, b = a_raw.float(), b_raw.float()
        diff = (a - b).abs()
        elements += diff.numel()
        differing += int(torch.count_nonzero(diff))
        max_abs = max(max_abs, float(diff.max()) if diff.numel() else 0.0)
        squared_diff += float((diff.double() ** 2).sum())
        squared_ref += float((b.double() ** 2).sum())
    return {
        "same_names": True,
        "tensors": len(left),
        "dtypes": sorted(dtypes),
        "elements": elements,
        "fraction_differing": differing / max(1, elements),
        "max_abs_diff": max_abs,
        "relative_l2_diff": (squared_diff / squared_ref) ** 0.5 if squared_ref else 0.0,
    }


# --------------------------------------------------------------------------------------------
# The benchmark


@dataclass
class Run:
    """One timed merge, as recorded in the results."""

    recipe: str
    tool: str
    round: int
    ok: bool
    wall_s: float
    peak_rss_bytes: int
    maxrss_time_bytes: int
    tree_rss_peak_bytes: int
    cpu_s: float
    load_before: float
    sync_after_s: float
    output_bytes: int
    command: list[str]
    tool_reported_s: float | None = None
    error: str | None = None


@dataclass
class FloorSample:
    """One read pass and/or write pass."""

    recipe: str
    round: int
    read_s: float | None = None
    read_bytes: int | None = None
    write_s: float | None = None
    write_nosync_s: float | None = None
    write_bytes: int | None = None


@dataclass
class Bench:
    """State of one benchmark invocation."""

    data: DataSet
    work: Path
    mergekit: Path | None
    env: dict[str, str]
    source: Path
    runs: list[Run] = field(default_factory=list)
    floor: list[FloorSample] = field(default_factory=list)
    comparisons: dict[str, dict[str, object]] = field(default_factory=dict)
    buffer: bytearray = field(default_factory=lambda: bytearray(BLOCK))

    def input_files(self, recipe: str) -> list[Path]:
        return [f for m in recipe_inputs(recipe, self.data) for f in checkpoint_files(m)]

    def command(self, tool: str, config: Path, out: Path) -> list[str]:
        if tool == "tureen":
            return [sys.executable, "-m", "service.cli", "merge", str(config), str(out), "--quiet"]
        assert self.mergekit is not None
        return [str(self.mergekit), str(config), str(out), "--lazy-unpickle", "--quiet"]

    def read_pass(self, recipe: str, round_: int) -> None:
        seconds, nbytes = read_all(self.input_files(recipe), self.buffer)
        self.floor.append(FloorSample(recipe, round_, read_s=seconds, read_bytes=nbytes))

    def write_pass(self, recipe: str, round_: int) -> None:
        nbytes = checkpoint_bytes(self.data.base)
        target = self.work / "floor-write.bin"
        seconds, nosync = write_once(target, nbytes, self.buffer)
        drop_file(target)
        self.floor.append(
            FloorSample(recipe, round_, write_s=seconds, write_nosync_s=nosync, write_bytes=nbytes)
        )

    def merge(self, recipe: str, tool: str, round_: int, config: Path, keep: bool) -> Path | None:
        out = self.work / f"out-{tool}"
        drop_file(out)
        command = self.command(tool, config, out)
        logs = self.work / "logs" / f"{recipe}-{tool}-{round_}"
        result = measure(command, logs, self.env, self.source if tool == "tureen" else REPO)
        started = time.monotonic()
        os.sync()
        sync_s = time.monotonic() - started
        files = sorted(out.glob("*.safetensors")) if out.is_dir() else []
        ok = result.returncode == 0 and bool(files)
        reported = None
        if tool == "tureen" and ok:
            try:
                report = json.loads(result.stdout_tail[result.stdout_tail.index("{") :])
                reported = float(report["seconds"])
            except (ValueError, KeyError):
                reported = None
        error = None
        if not ok:
            error = f"exit {result.returncode}: {result.stderr_tail[-1500:]}"
        run = Run(
            recipe=recipe,
            tool=tool,
            round=round_,
            ok=ok,
            wall_s=result.wall_s,
            peak_rss_bytes=result.peak_rss_bytes,
            maxrss_time_bytes=result.maxrss_time_bytes,
            tree_rss_peak_bytes=result.tree_rss_peak_bytes,
            cpu_s=result.cpu_s,
            load_before=result.load_before,
            sync_after_s=sync_s,
            output_bytes=sum(f.stat().st_size for f in files),
            command=command,
            tool_reported_s=reported,
            error=error,
        )
        self.runs.append(run)
        status = "ok" if ok else f"FAILED ({error[:300] if error else ''})"
        print(
            f"  {recipe:16s} {tool:8s} round {round_}: {run.wall_s:8.2f} s, peak RSS "
            f"{run.peak_rss_bytes / GB:6.2f} GB, CPU {run.cpu_s:7.1f} s, load before "
            f"{run.load_before:4.1f}, sync after {sync_s:5.2f} s  {status}",
            file=sys.stderr,
            flush=True,
        )
        if keep and ok:
            kept = self.work / f"kept-{tool}"
            drop_file(kept)
            out.rename(kept)
            drop_cached(kept)
            return kept
        drop_file(out)
        return None


def run_recipe(
    bench: Bench, recipe: str, tools: Sequence[str], repeats: dict[str, int], compare: bool
) -> None:
    config = bench.work / "recipes" / f"{recipe}.yaml"
    config.parent.mkdir(parents=True, exist_ok=True)
    config.write_text(recipe_yaml(recipe, bench.data))
    rounds = max(repeats[t] for t in tools)
    last = {t: repeats[t] - 1 for t in tools}
    kept: dict[str, Path] = {}
    for round_ in range(rounds):
        for tool in tools:
            if round_ >= repeats[tool]:
                continue
            bench.read_pass(recipe, round_)  # re-warms the inputs too
            keep = compare and len(tools) > 1 and round_ == last[tool]
            path = bench.merge(recipe, tool, round_, config, keep)
            if path is not None:
                kept[tool] = path
        bench.write_pass(recipe, round_)
    if len(kept) == 2:
        started = time.monotonic()
        bench.comparisons[recipe] = compare_outputs(kept["tureen"], kept["mergekit"])
        bench.comparisons[recipe]["seconds"] = round(time.monotonic() - started, 1)
        print(f"  {recipe:16s} tureen vs mergekit: {bench.comparisons[recipe]}", file=sys.stderr)
    for path in kept.values():
        drop_file(path)


# --------------------------------------------------------------------------------------------
# Summaries


def _median(values: Sequence[float]) -> float | None:
    return statistics.median(values) if values else None


def summarize(bench: Bench, recipes: Sequence[str], tools: Sequence[str]) -> dict[str, object]:
    floor_read = _median([f.read_s for f in bench.floor if f.read_s is not None])
    floor_write = _median([f.write_s for f in bench.floor if f.write_s is not None])
    floor_write_nosync = _median(
        [f.write_nosync_s for f in bench.floor if f.write_nosync_s is not None]
    )
    floor = floor_read + floor_write if floor_read is not None and floor_write else None
    per_recipe: dict[str, object] = {}
    for recipe in recipes:
        input_bytes = sum(f.stat().st_size for f in bench.input_files(recipe))
        row: dict[str, object] = {"input_bytes": input_bytes}
        for tool in tools:
            runs = [r for r in bench.runs if r.recipe == recipe and r.tool == tool]
            good = [r for r in runs if r.ok]
            wall = _median([r.wall_s for r in good])
            row[tool] = {
                "runs": len(runs),
                "ok_runs": len(good),
                "median_wall_s": wall,
                "min_wall_s": min((r.wall_s for r in good), default=None),
                "max_wall_s": max((r.wall_s for r in good), default=None),
                "input_gb_per_s": input_bytes / GB / wall if wall else None,
                "median_peak_rss_bytes": _median([r.peak_rss_bytes for r in good]),
                "median_sync_after_s": _median([r.sync_after_s for r in good]),
                "median_cpu_s": _median([r.cpu_s for r in good]),
                "mean_load_before": statistics.fmean([r.load_before for r in runs])
                if runs
                else None,
                "errors": [r.error for r in runs if not r.ok],
            }
        tureen = row.get("tureen")
        mergekit = row.get("mergekit")
        if isinstance(tureen, dict) and isinstance(mergekit, dict):
            t, m = tureen["median_wall_s"], mergekit["median_wall_s"]
            row["speedup_mergekit_over_tureen"] = m / t if t and m else None
            tr, mr = tureen["median_peak_rss_bytes"], mergekit["median_peak_rss_bytes"]
            row["rss_ratio_tureen_over_mergekit"] = tr / mr if tr and mr else None
            tc, mc = tureen["median_cpu_s"], mergekit["median_cpu_s"]
            row["cpu_ratio_mergekit_over_tureen"] = mc / tc if tc and mc else None
        if isinstance(tureen, dict) and floor and tureen["median_wall_s"]:
            row["tureen_over_floor"] = tureen["median_wall_s"] / floor
        per_recipe[recipe] = row
    return {
        "floor": {
            "median_read_s": floor_read,
            "median_write_s": floor_write,
            "median_write_nosync_s": floor_write_nosync,
            "read_plus_write_s": floor,
        },
        "recipes": per_recipe,
        "targets": targets(per_recipe),
    }


def targets(per_recipe: dict[str, object]) -> list[dict[str, object]]:
    """The README's targets, each with its measured value and whether it was met."""
    found: list[dict[str, object]] = []

    def get(recipe: str, *keys: str) -> float | None:
        value: object = per_recipe.get(recipe)
        for key in keys:
            if not isinstance(value, dict):
                return None
            value = value.get(key)
        return float(value) if isinstance(value, int | float) else None

    checks = [
        ("linear ≥ 3× faster than mergekit", get("linear", "speedup_mergekit_over_tureen"),
         TARGET_LINEAR_SPEEDUP, "≥"),
        ("linear peak RSS ≤ 0.6 GB", _gb(get("linear", "tureen", "median_peak_rss_bytes")),
         TARGET_LINEAR_RSS_GB, "≤"),
        ("TIES (density 0.2) ≥ 15× faster than mergekit",
         get("ties", "speedup_mergekit_over_tureen"), TARGET_TIES_SPEEDUP, "≥"),
        ("linear within 1.3× of the read-once/write-once floor",
         get("linear", "tureen_over_floor"), TARGET_LINEAR_FLOOR_RATIO, "≤"),
    ]  # fmt: skip
    for name, value, target, sense in checks:
        met = None if value is None else (value >= target if sense == "≥" else value <= target)
        found.append({"target": name, "value": value, "threshold": target, "met": met})
    return found


def _gb(value: float | None) -> float | None:
    return None if value is None else value / GB


def _fmt(value: object, digits: int = 2, suffix: str = "") -> str:
    if value is None:
        return "—"
    if isinstance(value, int | float):
        return f"{value:.{digits}f}{suffix}"
    return str(value)


def markdown(summary: dict[str, object], tools: Sequence[str]) -> str:
    """The results as markdown tables."""
    recipes = summary["recipes"]
    assert isinstance(recipes, dict)
    lines = [
        "| recipe | tool | runs | median wall (s) | input GB/s | median peak RSS (GB) "
        "| median CPU (s) | mergekit ÷ tureen wall | mergekit ÷ tureen CPU "
        "| tureen ÷ mergekit RSS |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for recipe, row in recipes.items():
        for tool in tools:
            stats = row.get(tool)
            if not isinstance(stats, dict):
                continue
            runs = f"{stats['ok_runs']}/{stats['runs']}"
            speed = row.get("speedup_mergekit_over_tureen") if tool == "tureen" else None
            rss = row.get("rss_ratio_tureen_over_mergekit") if tool == "tureen" else None
            cpu = row.get("cpu_ratio_mergekit_over_tureen") if tool == "tureen" else None
            lines.append(
                f"| {recipe} | {tool} | {runs} | {_fmt(stats['median_wall_s'], 1)} "
                f"| {_fmt(stats['input_gb_per_s'])} "
                f"| {_fmt(_gb(stats['median_peak_rss_bytes']))} "
                f"| {_fmt(stats['median_cpu_s'], 1)} "
                f"| {_fmt(speed, 1, '×')} | {_fmt(cpu, 1, '×')} | {_fmt(rss)} |"
            )
    floor = summary["floor"]
    assert isinstance(floor, dict)
    lines += [
        "",
        f"Floor (medians): read all inputs {_fmt(floor['median_read_s'])} s, write one output "
        f"{_fmt(floor['median_write_s'])} s with fsync ({_fmt(floor['median_write_nosync_s'])} s "
        f"before fsync): {_fmt(floor['read_plus_write_s'])} s.",
    ]
    ratios = [
        f"{recipe} {_fmt(row.get('tureen_over_floor'), 2, '×')}"
        for recipe, row in recipes.items()
        if row.get("tureen_over_floor") is not None
    ]
    if ratios:
        lines.append("tureen ÷ floor: " + ", ".join(ratios) + ".")
    lines += ["", "| target | measured | met |", "|---|---|---|"]
    for check in summary["targets"]:  # type: ignore[attr-defined]
        met = {True: "yes", False: "**no**", None: "not measured"}[check["met"]]
        lines.append(f"| {check['target']} | {_fmt(check['value'])} | {met} |")
    return "\n".join(lines)


def snapshot_tureen(target: Path) -> dict[str, object]:
    """Copy tureen's packages into ``target`` so that every run measures the same code.

    Returns the commit, the uncommitted changes to those packages, and a hash of the copy.
    """
    digest = hashlib.sha256()
    for package in SNAPSHOT_PACKAGES:
        shutil.copytree(
            REPO / package, target / package, ignore=shutil.ignore_patterns("__pycache__")
        )
    for path in sorted(target.rglob("*.py")):
        digest.update(str(path.relative_to(target)).encode())
        digest.update(path.read_bytes())

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", *args], capture_output=True, text=True, cwd=REPO, check=False
        ).stdout.strip()

    return {
        "commit": git("rev-parse", "HEAD"),
        "uncommitted": git("status", "--porcelain", "--", *SNAPSHOT_PACKAGES).splitlines(),
        "sha256_of_sources": digest.hexdigest(),
    }


def machine() -> dict[str, object]:
    """Facts about this machine and the software measured."""
    import torch

    cpu = ""
    try:
        with open("/proc/cpuinfo") as handle:
            cpu = next((ln.split(":", 1)[1].strip() for ln in handle if "model name" in ln), "")
    except OSError:
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "ram_bytes": mem,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
    }


def mergekit_version(mergekit: Path) -> str | None:
    python = mergekit.parent / "python"
    if not python.exists():
        return None
    result = subprocess.run(
        [
            str(python),
            "-c",
            "import importlib.metadata as m, torch; "
            "print(m.version('mergekit'), torch.__version__, torch.get_num_threads())",
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    return result.stdout.strip() or None


def parse_repeats(items: Sequence[str], option: str) -> dict[str, int]:
    """``RECIPE=N`` items as a dict."""
    found: dict[str, int] = {}
    for item in items:
        recipe, _, count = item.partition("=")
        if recipe not in RECIPES or not count.isdigit() or int(count) < 1:
            raise SystemExit(f"{option} takes RECIPE=N with RECIPE in {RECIPES} and N ≥ 1")
        found[recipe] = int(count)
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-gb", type=float, required=True, help="size of each model, GB")
    parser.add_argument("--finetunes", type=int, default=3)
    parser.add_argument("--dtype", default="bf16")
    parser.add_argument("--shard-size", type=parse_size, default=2 * GB, help="input shards")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--mergekit", type=Path, help="path to mergekit-yaml")
    parser.add_argument("--recipes", default=",".join(RECIPES))
    parser.add_argument("--tools", default=",".join(TOOLS))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--mergekit-repeats",
        action="append",
        default=[],
        metavar="RECIPE=N",
        help="fewer mergekit runs for one recipe (e.g. ties=1); repeatable",
    )
    parser.add_argument(
        "--tureen-repeats",
        action="append",
        default=[],
        metavar="RECIPE=N",
        help="fewer tureen runs for one recipe; repeatable",
    )
    parser.add_argument("--no-compare", action="store_true", help="skip comparing outputs")
    parser.add_argument("--name", help="results file name (default from the sizes)")
    args = parser.parse_args(argv)

    recipes = [r for r in args.recipes.split(",") if r]
    tools = [t for t in args.tools.split(",") if t]
    for recipe in recipes:
        if recipe not in RECIPES:
            parser.error(f"unknown recipe {recipe!r}; choose from {RECIPES}")
    for tool in tools:
        if tool not in TOOLS:
            parser.error(f"unknown tool {tool!r}; choose from {TOOLS}")
    if "mergekit" in tools and (args.mergekit is None or not args.mergekit.exists()):
        parser.error("--mergekit /path/to/mergekit-yaml is needed (see bench/setup_mergekit.sh)")
    fewer = {
        "mergekit": parse_repeats(args.mergekit_repeats, "--mergekit-repeats"),
        "tureen": parse_repeats(args.tureen_repeats, "--tureen-repeats"),
    }

    data = ensure_dataset(
        args.model_gb,
        finetunes=args.finetunes,
        dtype=args.dtype,
        shard_bytes=args.shard_size,
        data=args.data,
    )
    work = args.data / "work"
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    source = work / "tureen-src"
    tureen_source = snapshot_tureen(source)
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = str(source) + os.pathsep + env.get("PYTHONPATH", "")
    bench = Bench(data=data, work=work, mergekit=args.mergekit, env=env, source=source)

    started = dt.datetime.now(dt.UTC)
    files = bench.input_files(recipes[0])
    warm_s, warm_bytes = read_all(files, bench.buffer)
    print(
        f"warm-up read of {warm_bytes / GB:.2f} GB of inputs: {warm_s:.1f} s; data {data.folder}",
        file=sys.stderr,
    )
    for recipe in recipes:
        repeats = {t: fewer[t].get(recipe, args.repeats) for t in tools}
        run_recipe(bench, recipe, tools, repeats, compare=not args.no_compare)

    summary = summarize(bench, recipes, tools)
    name = args.name or f"{args.model_gb:g}gb-{args.finetunes}ft"
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"{started:%Y-%m-%d}-{name}.json"
    result = {
        "name": name,
        "started_utc": started.isoformat(timespec="seconds"),
        "finished_utc": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "argv": sys.argv,
        "machine": machine(),
        "tureen": tureen_source,
        "mergekit": mergekit_version(args.mergekit) if args.mergekit else None,
        "data": {
            "folder": str(data.folder),
            "dtype": data.dtype,
            "shape": asdict(data.shape),
            "parameters_per_model": data.shape.parameters(),
            "model_bytes": [checkpoint_bytes(m) for m in data.models],
            "warm_up_read_s": warm_s,
        },
        "method": {
            "timing": "wall time from process start to exit, start-up and imports included",
            "peak_rss": "max(/usr/bin/time %M: ru_maxrss of the command and its reaped "
            "children; peak of the summed RSS of the process tree polled from /proc every 20 ms)",
            "page_cache": "warm: all inputs read once before timing, and again before each run",
            "sync": "sync timed separately after each run (sync_after_s); tureen fsyncs "
            "its output inside its wall time, mergekit does not",
            "floor": "preadv of every input byte into a 64 MiB buffer + pwrite of one "
            "output's bytes in 64 MiB blocks and fsync",
        },
        "summary": summary,
        "comparisons": bench.comparisons,
        "runs": [asdict(r) for r in bench.runs],
        "floor_samples": [asdict(f) for f in bench.floor],
    }
    path.write_text(json.dumps(result, indent=2))
    shutil.rmtree(work, ignore_errors=True)
    print(markdown(summary, tools))
    print(f"\nresults: {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
