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

Results go to ``bench/results/<date>-<name>.json`` (``--results``), rewritten after every
recipe or round, and a markdown table is printed.

For GPUs and tight time budgets (``bench/gpu_run.py`` drives it so): ``--tureen-args`` and
``--mergekit-args`` add arguments (write them as ``--tureen-args=--device cuda``);
``--mergekit-variant NAME=ARGS`` adds mergekit under another tool name with other arguments;
``--tureen-variant NAME=DIR`` adds tureen from another source tree (say an export of an earlier
commit, with its built extension) under another tool name, for before/after runs side by side;
``--order round`` runs round 0 of every recipe before round 1; ``--rewarm round`` reads the
inputs once per round instead of before every merge; ``--compare-first`` compares the first
runs' outputs; ``--deadline-s`` leaves out what would not end in time.

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
import resource
import shlex
import shutil
import signal
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
SNAPSHOT_PACKAGES = ("merge_kernels", "service", "training")  # the CLI imports all three
# Per recipe: how many fine-tunes it merges (None: all), whether the base is an input, the
# per-model parameters and the whole-merge parameters, all in mergekit's syntax.
RECIPE_SHAPES: dict[str, tuple[int | None, bool, str, str]] = {
    "linear": (None, False, "weight: 1.0", ""),
    "task_arithmetic": (None, True, "weight: 0.5", ""),
    "ties": (None, True, "weight: 1.0, density: 0.2", ""),
    "dare_ties": (None, True, "weight: 1.0, density: 0.1", ""),
    "dare_linear": (None, True, "weight: 1.0, density: 0.1", ""),
    "della": (None, True, "weight: 1.0, density: 0.2, epsilon: 0.1", "lambda: 1.0"),
    "della_linear": (None, True, "weight: 1.0, density: 0.2, epsilon: 0.1", "lambda: 1.0"),
    "breadcrumbs": (None, True, "weight: 1.0, density: 0.9, gamma: 0.01", ""),
    "breadcrumbs_ties": (None, True, "weight: 1.0, density: 0.9, gamma: 0.01", ""),
    "sce": (None, True, "weight: 1.0", "select_topk: 0.1"),
    "model_stock": (None, True, "", ""),
    "ram": (None, True, "", ""),
    "ramplus_tl": (None, True, "", ""),
    "slerp": (1, True, "", "t: 0.5"),
    "nuslerp": (2, False, "weight: 0.5", ""),
    "multislerp": (None, False, "weight: 1.0", ""),
    "karcher": (None, False, "", ""),
    "nearswap": (1, True, "", "t: 0.001"),
    "arcee_fusion": (1, True, "", ""),
    "passthrough": (0, True, "", ""),
}
# The default set: the recipes whose figures the README reports against mergekit at 3 GB.
RECIPES = ("linear", "task_arithmetic", "ties", "dare_ties")
TOOLS = ("tureen", "mergekit")

# The targets the README states next to the numbers.
TARGET_LINEAR_SPEEDUP = 3.0
TARGET_LINEAR_RSS_GB = 0.6
TARGET_TIES_SPEEDUP = 15.0
TARGET_LINEAR_FLOOR_RATIO = 1.3
# The GPU benchmark's (--goals gpu).
TARGET_GPU_TIES_OVER_LINEAR = 1.05
TARGET_GPU_TIES_SPEEDUP = 3.0


def recipe_yaml(method: str, data: DataSet) -> str:
    """A mergekit config for ``method`` over the data set's base and fine-tunes."""
    count, with_base, per_model, whole = RECIPE_SHAPES[method]
    tuned = data.finetunes if count is None else data.finetunes[:count]
    # linear soups the base too, so that it reads the same inputs as the task-vector methods
    listed = (data.base, *tuned) if method in ("linear", "passthrough") else tuned
    params = f"    parameters: {{{per_model}}}\n" if per_model else ""
    models = "".join(f"  - model: {path}\n{params}" for path in listed)
    text = f"merge_method: {method}\n"
    if with_base:
        text += f"base_model: {data.base}\n"
    text += f"models:\n{models}"
    if whole:
        text += f"parameters: {{{whole}}}\n"
    return text + "dtype: bfloat16\n"


def recipe_inputs(method: str, data: DataSet) -> tuple[Path, ...]:
    """The checkpoint folders a recipe reads."""
    count, with_base, _, _ = RECIPE_SHAPES[method]
    tuned = data.finetunes if count is None else data.finetunes[:count]
    return (data.base, *tuned) if with_base or method == "linear" else tuned


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


def _children_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def measure(
    command: list[str],
    log_dir: Path,
    env: dict[str, str],
    cwd: Path,
    timeout: float | None = None,
) -> ProcessRun:
    """Run ``command`` to completion; its wall time and peak RSS (whole process tree).

    With ``timeout`` (seconds), a command still running then is killed with its whole process
    group and reported with return code -9. Where GNU time is not installed, the command is
    started directly: its CPU time then comes from this process's children's rusage and its
    peak RSS from polling alone.
    """
    log_dir.mkdir(parents=True, exist_ok=True)
    out_path, err_path = log_dir / "stdout.txt", log_dir / "stderr.txt"
    time_path = log_dir / "time.txt"
    # /usr/bin/time forks the command from a tiny process: Linux carries a process's peak RSS
    # across fork+exec, so forking straight from this (larger) process would inflate it.
    with_time = os.access(TIME, os.X_OK)
    launcher = [TIME, "-f", "%M %U %S", "-o", str(time_path)] if with_time else []
    peak = [0]
    try:
        load = os.getloadavg()[0]  # 1-minute load average, a sign of other work on the machine
    except OSError:
        load = float("nan")
    done = threading.Event()
    cpu_before = _children_cpu_s()
    with out_path.open("wb") as out, err_path.open("wb") as err:
        started = time.monotonic()
        process = subprocess.Popen(
            launcher + command, stdout=out, stderr=err, env=env, cwd=cwd, start_new_session=True
        )

        def poll() -> None:
            while not done.is_set():
                if with_time:
                    tree = sum(tree_rss_bytes(child) for child in _children(process.pid))
                else:
                    tree = tree_rss_bytes(process.pid)
                peak[0] = max(peak[0], tree)
                done.wait(POLL_SECONDS)

        poller = threading.Thread(target=poll, daemon=True)
        poller.start()
        try:
            returncode = process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            returncode = -9
            err.write(f"\nkilled after the {timeout:.0f} s time limit\n".encode())
        except BaseException:  # interrupted: never leave the measured command running
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            raise
        wall = time.monotonic() - started
        done.set()
        poller.join()
    if with_time:
        try:
            # "Command exited with non-zero status N" may come first.
            maxrss_kb, user_s, sys_s = time_path.read_text().split("\n")[-2].split()
            maxrss, cpu = int(maxrss_kb) * 1024, float(user_s) + float(sys_s)
        except (OSError, ValueError, IndexError):
            maxrss, cpu = 0, float("nan")
    else:
        maxrss, cpu = 0, _children_cpu_s() - cpu_before
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


def compare_outputs(first: Path, second: Path, device: str = "cpu") -> dict[str, object]:
    """Compare two merged checkpoints tensor by tensor (the arithmetic on ``device``)."""
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
        a, b = a_raw.to(device).float(), b_raw.to(device).float()
        diff = (a - b).abs()
        elements += diff.numel()
        differing += int(torch.count_nonzero(diff))
        max_abs = max(max_abs, float(diff.max()) if diff.numel() else 0.0)
        squared_diff += float((diff.double() ** 2).sum())
        squared_ref += float((b.double() ** 2).sum())
    del a, b, diff
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()  # the merges that follow run in other processes
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
class Skipped:
    """A merge or floor pass left out because it would not end before the deadline."""

    recipe: str
    tool: str
    round: int
    reason: str


@dataclass
class Bench:
    """State of one benchmark invocation.

    ``tool_args`` holds each tool's extra command-line arguments: tureen's go after
    ``merge RECIPE OUT --quiet``, and every other tool is mergekit, run as
    ``mergekit-yaml RECIPE OUT ARGS --quiet`` (so a mergekit "variant" is a tool name with its
    own arguments). ``deadline`` (a ``time.monotonic()`` value) makes the benchmark leave out
    any merge or floor pass that its previous timings say would not end before it, and kill
    one still running then.
    """

    data: DataSet
    work: Path
    mergekit: Path | None
    env: dict[str, str]
    source: Path
    tool_args: dict[str, list[str]] = field(default_factory=dict)
    # Tools that are tureen from another source snapshot (name -> snapshot folder).
    tureen_sources: dict[str, Path] = field(default_factory=dict)
    deadline: float | None = None
    compare_device: str = "cpu"
    evict_kept: bool = True
    runs: list[Run] = field(default_factory=list)
    floor: list[FloorSample] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)
    comparisons: dict[str, dict[str, object]] = field(default_factory=dict)
    buffer: bytearray = field(default_factory=lambda: bytearray(BLOCK))

    def input_files(self, recipe: str) -> list[Path]:
        return [f for m in recipe_inputs(recipe, self.data) for f in checkpoint_files(m)]

    def config(self, recipe: str) -> Path:
        """The recipe's YAML file (written on first use)."""
        path = self.work / "recipes" / f"{recipe}.yaml"
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(recipe_yaml(recipe, self.data))
        return path

    def is_tureen(self, tool: str) -> bool:
        return tool == "tureen" or tool in self.tureen_sources

    def env_for(self, tool: str) -> dict[str, str]:
        """The environment of a run: a tureen variant imports its own snapshot."""
        source = self.tureen_sources.get(tool)
        if source is None:
            return self.env
        return dict(self.env, PYTHONPATH=str(source))

    def command(self, tool: str, config: Path, out: Path) -> list[str]:
        extra = self.tool_args.get(tool, ["--lazy-unpickle"] if tool == "mergekit" else [])
        if self.is_tureen(tool):
            command = [sys.executable, "-m", "service.cli", "merge", str(config), str(out)]
            return [*command, "--quiet", *extra]
        assert self.mergekit is not None
        return [str(self.mergekit), str(config), str(out), *extra, "--quiet"]

    def remaining(self) -> float | None:
        """Seconds left before the deadline, if there is one."""
        return None if self.deadline is None else self.deadline - time.monotonic()

    def _fits(self, needed: float | None) -> bool:
        """Whether a step expected to take ``needed`` seconds (with 15% + 2 s to spare) ends
        before the deadline; a step never timed before only needs some time left."""
        left = self.remaining()
        return left is None or (left > 0 and (needed is None or 1.15 * needed + 2 < left))

    def predicted_merge_s(self, recipe: str, tool: str) -> float | None:
        """Wall plus sync time of the tool's last run of this recipe, else its slowest run,
        else (for a mergekit variant) the last run of this recipe by any mergekit."""
        same = [r for r in self.runs if r.ok and r.tool == tool and r.recipe == recipe]
        if same:
            return same[-1].wall_s + same[-1].sync_after_s
        other = [r.wall_s + r.sync_after_s for r in self.runs if r.ok and r.tool == tool]
        if other:
            return max(other)
        kin = [r for r in self.runs if r.ok and r.tool != "tureen" and r.recipe == recipe]
        return kin[-1].wall_s + kin[-1].sync_after_s if not self.is_tureen(tool) and kin else None

    def read_pass(self, recipe: str, round_: int) -> None:
        last = [f.read_s for f in self.floor if f.read_s is not None]
        if not self._fits(last[-1] if last else None):
            self.skipped.append(Skipped(recipe, "floor-read", round_, "deadline"))
            return
        seconds, nbytes = read_all(self.input_files(recipe), self.buffer)
        self.floor.append(FloorSample(recipe, round_, read_s=seconds, read_bytes=nbytes))

    def write_pass(self, recipe: str, round_: int) -> None:
        last = [f.write_s for f in self.floor if f.write_s is not None]
        if not self._fits(last[-1] if last else None):
            self.skipped.append(Skipped(recipe, "floor-write", round_, "deadline"))
            return
        nbytes = checkpoint_bytes(self.data.base)
        target = self.work / "floor-write.bin"
        seconds, nosync = write_once(target, nbytes, self.buffer)
        drop_file(target)
        self.floor.append(
            FloorSample(recipe, round_, write_s=seconds, write_nosync_s=nosync, write_bytes=nbytes)
        )

    def merge(self, recipe: str, tool: str, round_: int, keep: bool) -> Path | None:
        predicted = self.predicted_merge_s(recipe, tool)
        if not self._fits(predicted):
            left = self.remaining()
            reason = f"deadline: {max(0.0, left or 0.0):.0f} s left" + (
                f", {predicted:.0f} s expected" if predicted is not None else ""
            )
            self.skipped.append(Skipped(recipe, tool, round_, reason))
            print(f"  {recipe:16s} {tool:8s} round {round_}: skipped ({reason})", file=sys.stderr)
            return None
        config = self.config(recipe)
        out = self.work / f"out-{tool}"
        drop_file(out)
        command = self.command(tool, config, out)
        logs = self.work / "logs" / f"{recipe}-{tool}-{round_}"
        cwd = self.tureen_sources.get(tool, self.source if tool == "tureen" else REPO)
        result = measure(command, logs, self.env_for(tool), cwd, timeout=self.remaining())
        started = time.monotonic()
        os.sync()
        sync_s = time.monotonic() - started
        files = sorted(out.glob("*.safetensors")) if out.is_dir() else []
        ok = result.returncode == 0 and bool(files)
        reported = None
        if self.is_tureen(tool) and ok:
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
            if self.evict_kept:
                drop_cached(kept)
            return kept
        drop_file(out)
        return None

    def compare(self, recipe: str, kept: dict[str, Path]) -> None:
        """Compare the two kept outputs (tureen's first), then delete them."""
        if len(kept) == 2:
            names = sorted(kept, key=lambda tool: tool != "tureen")
            first, second = (kept[tool] for tool in names)
            started = time.monotonic()
            self.comparisons[recipe] = compare_outputs(first, second, self.compare_device)
            self.comparisons[recipe]["seconds"] = round(time.monotonic() - started, 1)
            pair = " vs ".join(names)
            print(f"  {recipe:16s} {pair}: {self.comparisons[recipe]}", file=sys.stderr)
        for path in kept.values():
            drop_file(path)
        kept.clear()


@dataclass(frozen=True)
class Schedule:
    """Which rounds each tool runs in, per recipe, and which outputs are compared.

    A tool runs in rounds ``first_round[tool]`` to ``first_round[tool] + repeats - 1``. The
    outputs compared are tureen's and ``reference``'s, from each one's first run
    (``compare_first``) or last run; with ``compare_first`` they are compared as soon as both
    exist, otherwise once the recipe's rounds are over.
    """

    tools: tuple[str, ...]
    repeats: dict[str, dict[str, int]]  # recipe -> tool -> runs
    first_round: dict[str, int]
    reference: str | None
    compare_first: bool = False
    rewarm_every_run: bool = True

    def active(self, recipe: str, round_: int) -> list[str]:
        return [
            t
            for t in self.tools
            if self.first_round.get(t, 0)
            <= round_
            < self.first_round.get(t, 0) + self.repeats[recipe][t]
        ]

    def rounds(self, recipe: str) -> int:
        return max(self.first_round.get(t, 0) + self.repeats[recipe][t] for t in self.tools)

    def keeps(self, recipe: str, tool: str, round_: int) -> bool:
        if self.reference is None or tool not in ("tureen", self.reference):
            return False
        first = self.first_round.get(tool, 0)
        return round_ == (first if self.compare_first else first + self.repeats[recipe][tool] - 1)


def run_round(
    bench: Bench, recipe: str, round_: int, schedule: Schedule, kept: dict[str, Path]
) -> None:
    """One round of a recipe: a read pass, the active tools' merges, and a write pass."""
    tools = schedule.active(recipe, round_)
    if not tools:
        return
    for index, tool in enumerate(tools):
        if schedule.rewarm_every_run or index == 0:
            bench.read_pass(recipe, round_)  # re-warms the inputs too
        path = bench.merge(recipe, tool, round_, schedule.keeps(recipe, tool, round_))
        if path is not None:
            kept[tool] = path
        if schedule.compare_first and len(kept) == 2:
            bench.compare(recipe, kept)
    bench.write_pass(recipe, round_)


def run_recipe(bench: Bench, recipe: str, schedule: Schedule) -> None:
    """All rounds of one recipe, then the comparison of the kept outputs."""
    kept: dict[str, Path] = {}
    for round_ in range(schedule.rounds(recipe)):
        run_round(bench, recipe, round_, schedule, kept)
    bench.compare(recipe, kept)


# --------------------------------------------------------------------------------------------
# Summaries


def _median(values: Sequence[float]) -> float | None:
    return statistics.median(values) if values else None


def summarize(
    bench: Bench, recipes: Sequence[str], tools: Sequence[str], goals: str = "cpu"
) -> dict[str, object]:
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
        if isinstance(tureen, dict) and tureen["median_wall_s"]:
            row["speedup_over_tureen"] = {
                tool: stats["median_wall_s"] / tureen["median_wall_s"]
                for tool in tools
                if tool != "tureen"
                and isinstance(stats := row.get(tool), dict)
                and stats["median_wall_s"]
            }
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
        "targets": gpu_targets(per_recipe, tools) if goals == "gpu" else targets(per_recipe),
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


def gpu_targets(per_recipe: dict[str, object], tools: Sequence[str]) -> list[dict[str, object]]:
    """The GPU benchmark's targets: TIES as fast as linear, and ≥ 3× faster than mergekit."""

    def wall(recipe: str, tool: str) -> float | None:
        row = per_recipe.get(recipe)
        stats = row.get(tool) if isinstance(row, dict) else None
        value = stats.get("median_wall_s") if isinstance(stats, dict) else None
        return float(value) if isinstance(value, int | float) else None

    found: list[dict[str, object]] = []
    ties, linear = wall("ties", "tureen"), wall("linear", "tureen")
    ratio = ties / linear if ties and linear else None
    found.append(
        {
            "target": "tureen TIES wall ≤ 1.05 × tureen linear wall (compute hidden under IO)",
            "value": ratio,
            "threshold": TARGET_GPU_TIES_OVER_LINEAR,
            "met": None if ratio is None else ratio <= TARGET_GPU_TIES_OVER_LINEAR,
        }
    )
    for tool in tools:
        if tool == "tureen":
            continue
        other = wall("ties", tool)
        speedup = other / ties if other and ties else None
        found.append(
            {
                "target": f"TIES (density 0.2) ≥ 3× faster than {tool}",
                "value": speedup,
                "threshold": TARGET_GPU_TIES_SPEEDUP,
                "met": None if speedup is None else speedup >= TARGET_GPU_TIES_SPEEDUP,
            }
        )
    return found


def _gb(value: float | None) -> float | None:
    return None if value is None else value / GB


def _ratio(top: object, bottom: object) -> float | None:
    if isinstance(top, int | float) and isinstance(bottom, int | float) and top and bottom:
        return float(top) / float(bottom)
    return None


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
        for tool in sorted(tools, key=lambda t: (t != "tureen", t != "mergekit")):
            stats = row.get(tool)
            if not isinstance(stats, dict):
                continue
            runs = f"{stats['ok_runs']}/{stats['runs']}"
            speed = row.get("speedup_mergekit_over_tureen") if tool == "tureen" else None
            if tool not in TOOLS:  # a mergekit variant: its own ratio, on its own row
                speed = (row.get("speedup_over_tureen") or {}).get(tool)
            rss = row.get("rss_ratio_tureen_over_mergekit") if tool == "tureen" else None
            cpu = row.get("cpu_ratio_mergekit_over_tureen") if tool == "tureen" else None
            if tool not in TOOLS and isinstance(base := row.get("tureen"), dict):
                cpu = _ratio(stats["median_cpu_s"], base["median_cpu_s"])
                rss = _ratio(base["median_peak_rss_bytes"], stats["median_peak_rss_bytes"])
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
    variants = [t for t in tools if t not in TOOLS]
    if variants:
        lines.append(
            f"Rows of {', '.join(variants)} (mergekit with other options, or tureen from "
            "another source tree) give that tool's own ratios against tureen."
        )
    if "linear" in recipes and "ties" in recipes:
        pairs = []
        for tool in tools:
            linear, ties = recipes["linear"].get(tool), recipes["ties"].get(tool)
            if isinstance(linear, dict) and isinstance(ties, dict):
                wall = _ratio(ties["median_wall_s"], linear["median_wall_s"])
                cpu = _ratio(ties["median_cpu_s"], linear["median_cpu_s"])
                pairs.append(f"{tool} {_fmt(wall, 2, '×')} (CPU {_fmt(cpu, 2, '×')})")
        if pairs:
            lines.append("TIES ÷ linear, median wall (CPU): " + ", ".join(pairs) + ".")
    lines += ["", "| target | measured | met |", "|---|---|---|"]
    for check in summary["targets"]:  # type: ignore[attr-defined]
        met = {True: "yes", False: "**no**", None: "not measured"}[check["met"]]
        lines.append(f"| {check['target']} | {_fmt(check['value'])} | {met} |")
    return "\n".join(lines)


def snapshot_tureen(target: Path, source: Path = REPO) -> dict[str, object]:
    """Copy tureen's packages (from ``source``) into ``target`` so that every run measures the
    same code.

    Returns the commit, the uncommitted changes to those packages, and a hash of the copy.
    """
    digest = hashlib.sha256()
    for package in SNAPSHOT_PACKAGES:
        shutil.copytree(
            source / package, target / package, ignore=shutil.ignore_patterns("__pycache__")
        )
    for path in sorted(target.rglob("*.py")):
        digest.update(str(path.relative_to(target)).encode())
        digest.update(path.read_bytes())

    def git(*args: str) -> str:
        try:
            return subprocess.run(
                ["git", *args], capture_output=True, text=True, cwd=REPO, check=False
            ).stdout.strip()
        except OSError:  # no git on this machine
            return ""

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
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


def _script_python(script: Path) -> Path | None:
    """The interpreter named by a console script's ``#!`` line."""
    try:
        with script.open("rb") as handle:
            first = handle.readline(4096).decode(errors="replace")
    except OSError:
        return None
    if not first.startswith("#!"):
        return None
    words = first[2:].split()
    return Path(words[0]) if words and Path(words[0]).exists() else None


def mergekit_version(mergekit: Path, env: dict[str, str] | None = None) -> str | None:
    python = mergekit.parent / "python"
    if not python.exists():
        python = _script_python(mergekit) or python
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
        env=env,
    )
    return result.stdout.strip() or None


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def parse_repeats(items: Sequence[str], option: str) -> dict[str, int]:
    """``RECIPE=N`` items as a dict."""
    found: dict[str, int] = {}
    for item in items:
        recipe, _, count = item.partition("=")
        if recipe not in RECIPE_SHAPES or not count.isdigit() or int(count) < 1:
            raise SystemExit(f"{option} takes RECIPE=N with a known RECIPE and N ≥ 1")
        found[recipe] = int(count)
    return found


def parse_tool_counts(items: Sequence[str], option: str, tools: Sequence[str]) -> dict[str, int]:
    """``TOOL=N`` items as a dict (N ≥ 0)."""
    found: dict[str, int] = {}
    for item in items:
        tool, _, count = item.partition("=")
        if tool not in tools or not count.isdigit():
            raise SystemExit(f"{option} takes TOOL=N with TOOL in {list(tools)} and N ≥ 0")
        found[tool] = int(count)
    return found


def parse_tureen_variants(items: Sequence[str]) -> dict[str, str]:
    """``NAME=DIR`` items: tureen run from another source tree under another name."""
    found: dict[str, str] = {}
    for item in items:
        name, sep, folder = item.partition("=")
        if not sep or not name or not folder or name in (*TOOLS, "tureen"):
            raise SystemExit(f"--tureen-variant: expected NAME=DIR with a new NAME, got {item!r}")
        if not all((Path(folder) / package).is_dir() for package in SNAPSHOT_PACKAGES):
            raise SystemExit(f"--tureen-variant: {folder} lacks {', '.join(SNAPSHOT_PACKAGES)}")
        found[name] = folder
    return found


def parse_variants(items: Sequence[str]) -> dict[str, list[str]]:
    """``NAME=ARGS`` items: mergekit run under another name with other arguments."""
    found: dict[str, list[str]] = {}
    for item in items:
        name, _, text = item.partition("=")
        if not name or name in TOOLS or not all(c.isalnum() or c in "-_" for c in name):
            raise SystemExit(
                f"--mergekit-variant takes NAME=ARGS with a NAME of letters, digits, - and _ "
                f"other than {TOOLS}; got {item!r}"
            )
        found[name] = shlex.split(text)
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-gb", type=float, required=True, help="size of each model, GB")
    parser.add_argument("--finetunes", type=int, default=3)
    parser.add_argument("--dtype", default="bf16")
    parser.add_argument("--shard-size", type=parse_size, default=2 * GB, help="input shards")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument(
        "--draw-on", help="generate missing inputs with torch on this device (see generate.py)"
    )
    parser.add_argument(
        "--deltas",
        choices=["scaled", "bf16-ties"],
        default="scaled",
        help="the inputs' fine-tune deltas (bf16-ties: heavy ties at the TIES threshold; "
        "see generate.py)",
    )
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
    parser.add_argument(
        "--tureen-args", default="", help="extra arguments for tureen merge, e.g. '--device cuda'"
    )
    parser.add_argument(
        "--mergekit-args",
        default="--lazy-unpickle",
        help="arguments for mergekit-yaml before --quiet (default: --lazy-unpickle)",
    )
    parser.add_argument(
        "--mergekit-variant",
        action="append",
        default=[],
        metavar="NAME=ARGS",
        help="also run mergekit as tool NAME with these arguments (list NAME in --tools)",
    )
    parser.add_argument(
        "--tureen-variant",
        action="append",
        default=[],
        metavar="NAME=DIR",
        help="also run tureen from the packages in DIR as tool NAME (list NAME in --tools); "
        "e.g. an earlier commit's merge_kernels/, service/ and training/ with its extension",
    )
    parser.add_argument(
        "--tool-repeats",
        action="append",
        default=[],
        metavar="TOOL=N",
        help="runs of one tool for every recipe (default --repeats); repeatable",
    )
    parser.add_argument(
        "--tool-first-round",
        action="append",
        default=[],
        metavar="TOOL=R",
        help="start a tool's runs in round R (0-based) instead of round 0; repeatable",
    )
    parser.add_argument(
        "--order",
        choices=["recipe", "round"],
        default="recipe",
        help="recipe: all rounds of one recipe, then the next; round: round 0 of every "
        "recipe, then round 1, ... (so a deadline leaves out repeats, not recipes)",
    )
    parser.add_argument(
        "--rewarm",
        choices=["run", "round"],
        default="run",
        help="read pass before every merge (run) or once per round of a recipe (round)",
    )
    parser.add_argument(
        "--compare-first",
        action="store_true",
        help="compare the outputs of each tool's first run, as soon as both exist",
    )
    parser.add_argument("--compare-device", default="cpu", help="where outputs are compared")
    parser.add_argument(
        "--keep-outputs-cached",
        action="store_true",
        help="leave the compared outputs in the page cache (by default they are evicted)",
    )
    parser.add_argument(
        "--deadline-s",
        type=float,
        help="leave out merges and floor passes that would end later than this many seconds "
        "after the start, and kill one still running then",
    )
    parser.add_argument(
        "--goals", choices=["cpu", "gpu"], default="cpu", help="which targets to check"
    )
    parser.add_argument("--results", type=Path, default=RESULTS, help="folder for the JSON")
    parser.add_argument("--no-compare", action="store_true", help="skip comparing outputs")
    parser.add_argument("--name", help="results file name (default from the sizes)")
    args = parser.parse_args(argv)
    begun = time.monotonic()
    signal.signal(signal.SIGTERM, _interrupt)  # so a stopped benchmark stops its merge too

    variants = parse_variants(args.mergekit_variant)
    tureen_variants = {
        name: Path(folder) for name, folder in parse_tureen_variants(args.tureen_variant).items()
    }
    known = (*TOOLS, *variants, *tureen_variants)
    recipes = [r for r in args.recipes.split(",") if r]
    tools = [t for t in args.tools.split(",") if t]
    for recipe in recipes:
        if recipe not in RECIPE_SHAPES:
            parser.error(f"unknown recipe {recipe!r}; choose from {', '.join(RECIPE_SHAPES)}")
    for tool in tools:
        if tool not in known:
            parser.error(f"unknown tool {tool!r}; choose from {known}")
    mergekits = [t for t in tools if t != "tureen" and t not in tureen_variants]
    if mergekits and (args.mergekit is None or not args.mergekit.exists()):
        parser.error("--mergekit /path/to/mergekit-yaml is needed (see bench/setup_mergekit.sh)")
    fewer = {
        "mergekit": parse_repeats(args.mergekit_repeats, "--mergekit-repeats"),
        "tureen": parse_repeats(args.tureen_repeats, "--tureen-repeats"),
    }
    per_tool = parse_tool_counts(args.tool_repeats, "--tool-repeats", tools)
    first_round = parse_tool_counts(args.tool_first_round, "--tool-first-round", tools)
    repeats = {
        recipe: {t: fewer.get(t, {}).get(recipe, per_tool.get(t, args.repeats)) for t in tools}
        for recipe in recipes
    }
    others = [t for t in tools if t != "tureen"]
    reference = "mergekit" if "mergekit" in others else (others[0] if others else None)
    compare = not args.no_compare and "tureen" in tools and reference is not None
    schedule = Schedule(
        tools=tuple(tools),
        repeats=repeats,
        first_round=first_round,
        reference=reference if compare else None,
        compare_first=args.compare_first,
        rewarm_every_run=args.rewarm == "run",
    )

    data = ensure_dataset(
        args.model_gb,
        finetunes=args.finetunes,
        dtype=args.dtype,
        shard_bytes=args.shard_size,
        data=args.data,
        draw_on=args.draw_on,
        deltas=args.deltas,
    )
    work = args.data / "work"
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    source = work / "tureen-src"
    tureen_source = snapshot_tureen(source)
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = str(source) + os.pathsep + env.get("PYTHONPATH", "")
    tureen_sources: dict[str, Path] = {}
    for name, folder in tureen_variants.items():
        tureen_sources[name] = work / f"{name}-src"
        snapshot_tureen(tureen_sources[name], folder)
    tool_args = {"tureen": shlex.split(args.tureen_args), **variants}
    tool_args.update({name: tool_args["tureen"] for name in tureen_variants})
    tool_args["mergekit"] = shlex.split(args.mergekit_args)
    bench = Bench(
        data=data,
        work=work,
        mergekit=args.mergekit,
        env=env,
        source=source,
        tool_args=tool_args,
        tureen_sources=tureen_sources,
        deadline=None if args.deadline_s is None else begun + args.deadline_s,
        compare_device=args.compare_device,
        evict_kept=not args.keep_outputs_cached,
    )

    started = dt.datetime.now(dt.UTC)
    name = args.name or f"{args.model_gb:g}gb-{args.finetunes}ft"
    args.results.mkdir(parents=True, exist_ok=True)
    path = args.results / f"{started:%Y-%m-%d}-{name}.json"
    facts = machine()
    mergekit_facts = mergekit_version(args.mergekit, env) if args.mergekit else None

    def save(complete: bool) -> dict[str, object]:
        summary = summarize(bench, recipes, tools, args.goals)
        result = {
            "name": name,
            "complete": complete,
            "started_utc": started.isoformat(timespec="seconds"),
            "finished_utc": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "argv": sys.argv,
            "machine": facts,
            "tureen": tureen_source,
            "mergekit": mergekit_facts,
            "commands": {
                tool: bench.command(tool, Path("RECIPE.yaml"), Path("OUT")) for tool in tools
            },
            "data": {
                "folder": str(data.folder),
                "dtype": data.dtype,
                "shape": asdict(data.shape),
                "parameters_per_model": data.shape.parameters(),
                "model_bytes": [checkpoint_bytes(m) for m in data.models],
                "warm_up_read_s": warm_s,
                "drawn_on": args.draw_on,
                "deltas": args.deltas,
            },
            "method": {
                "timing": "wall time from process start to exit, start-up and imports included",
                "peak_rss": "max(/usr/bin/time %M: ru_maxrss of the command and its reaped "
                "children; peak of the summed RSS of the process tree polled from /proc every "
                "20 ms)",
                "page_cache": "warm: all inputs read once before timing, and again before each "
                + ("run" if schedule.rewarm_every_run else "round of a recipe"),
                "sync": "sync timed separately after each run (sync_after_s); tureen fsyncs "
                "its output inside its wall time, mergekit does not",
                "floor": "preadv of every input byte into a 64 MiB buffer + pwrite of one "
                "output's bytes in 64 MiB blocks and fsync",
                "order": args.order,
                "deadline_s": args.deadline_s,
            },
            "summary": summary,
            "comparisons": bench.comparisons,
            "runs": [asdict(r) for r in bench.runs],
            "skipped": [asdict(s) for s in bench.skipped],
            "floor_samples": [asdict(f) for f in bench.floor],
        }
        path.write_text(json.dumps(result, indent=2))
        return summary

    files = bench.input_files(recipes[0])
    warm_s, warm_bytes = read_all(files, bench.buffer)
    print(
        f"warm-up read of {warm_bytes / GB:.2f} GB of inputs: {warm_s:.1f} s; data {data.folder}",
        file=sys.stderr,
    )
    complete = True
    try:
        if args.order == "recipe":
            for recipe in recipes:
                run_recipe(bench, recipe, schedule)
                save(complete=False)
        else:
            kept: dict[str, dict[str, Path]] = {recipe: {} for recipe in recipes}
            for round_ in range(max(schedule.rounds(recipe) for recipe in recipes)):
                for recipe in recipes:
                    run_round(bench, recipe, round_, schedule, kept[recipe])
                    save(complete=False)
            for recipe in recipes:
                bench.compare(recipe, kept[recipe])
    except KeyboardInterrupt as stop:
        print(f"\ninterrupted ({stop}): results so far", file=sys.stderr)
        complete = False

    summary = save(complete=complete)
    shutil.rmtree(work, ignore_errors=True)
    print(markdown(summary, tools))
    print(f"\nresults: {path}", file=sys.stderr)
    return 0 if complete else 130


if __name__ == "__main__":
    sys.exit(main())
