"""How the Ray executor scales: one merge on local Ray clusters of 1, 2 and 4 nodes.

    python bench/ray_scale.py [--model-gb 3] [--nodes 1,2,4] [--recipes ties,linear]
        [--repeats 2] [--node-cpus N] [--task-cpus 1] [--out-shard-size 64MB] [--out DIR]

One command, made for the 16-core GPU machine (8 minutes at ``--model-gb 3``); ``--model-gb
0.2 --nodes 1,2 --node-cpus 1`` is a smoke run on two cores. Steps:

1. write (or find) the base and 3 fine-tunes of ``bench/generate.py --deltas bf16-ties``
   (4 x 3 GB of bf16 at ``--model-gb 3``; heavy ties at the TIES threshold) and read every
   input once, so every run starts from a warm page cache;
2. for each cluster size N: start a ``ray.cluster_utils.Cluster`` of N nodes on this machine.
   **The CPU split**: every node gets ``--node-cpus`` cores of its own (default: a quarter of
   the machine's), pinned with ``sched_setaffinity`` before the node's processes start (its
   raylet and the workers it forks inherit them), and declares that many CPUs and 90% of a
   quarter of the machine's memory (more if the largest task's estimate needs it: Ray
   schedules by it, nothing enforces it). A node is a fixed size, as when machines are
   added to a cluster: 1 node has a quarter of the machine, 4 nodes all of it. Without the
   pinning every node's workers would share all the cores and 1 node would already use the
   whole machine. (The fused loops split a tensor in up to 8 threads, from
   ``os.cpu_count()``, whatever the pinning: on a node of 4 cores those threads share its
   4 cores);
3. merge each recipe ``--repeats`` times on it, each run a fresh driver process (as ``tureen
   merge --executor ray`` is). Two times: **wall**, from the driver's start to its merge's
   end (interpreter, ``ray.init`` and the start of one worker per task slot included, as a
   command pays them), and **merge**, the merge alone once the workers are started (as a
   long-lived driver such as the service pays it). The driver merges with
   ``RayExecutor(address, task_bytes=--out-shard-size)``, what ``--executor ray`` builds but
   with one task per output shard: the output is cut in ``--out-shard-size`` shards (64 MB:
   about 48 tasks at 3 GB) so that 16 task slots have work; the CLI's default groups shards
   into tasks of 1 GiB, three tasks for a 3 GB output;
4. write ``ray-scale.json`` (every run, every task's times) and ``ray-scale.md`` (the table)
   under ``--out`` and print the table.

Per-task overhead, three figures: ``noop_ms``, the round trip of an empty task with the same
options (Ray's own cost per task); ``plan_s``, the time a worker's first task of a run spends
planning the merge again from the headers; ``idle_per_task_s``, the task slots' time not
spent merging (slots x merge wall - sum of the tasks' merge times) divided by the tasks:
scheduling, planning, the wait for the slowest task at the end, all of it.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench.generate import DEFAULT_DATA, checkpoint_files, ensure_dataset  # noqa: E402
from bench.run import recipe_yaml  # noqa: E402
from service.cli import parse_size  # noqa: E402

GB = 1000**3
OBJECT_STORE = 256 * 2**20  # tasks return checksums only: the object store stays empty
NOOP_TASKS = 64


def _memory_bytes() -> int:
    with open("/proc/meminfo") as meminfo:
        for line in meminfo:
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no MemTotal in /proc/meminfo")


def _task_memory(recipe: Path, shard_bytes: int) -> int:
    """The ``memory`` resource the largest task of ``recipe`` declares."""
    import yaml

    from merge_kernels.executors.ray_cluster import shard_memory
    from merge_kernels.recipe import parse_recipe
    from merge_kernels.runner import MergeOptions, close_inputs, plan_merge

    options = MergeOptions(max_shard_bytes=shard_bytes)
    plan, inputs = plan_merge(parse_recipe(yaml.safe_load(recipe.read_text())), options)
    try:
        return max(shard_memory(plan, shard) for shard in plan.shards)
    finally:
        close_inputs(inputs)


PINNED: list[bool] = []  # whether the pinning took (a sandboxed kernel may refuse it)


def _pin(cores: set[int]) -> None:
    try:
        os.sched_setaffinity(0, cores)
        PINNED.append(sorted(os.sched_getaffinity(0)) == sorted(cores))
    except OSError as error:
        print(
            f"cannot pin to cores {sorted(cores)}: {error}; nodes share the cores", file=sys.stderr
        )
        PINNED.append(False)


def start_cluster(nodes: int, node_cpus: int, cores: list[int], memory: int) -> Any:
    """A local Ray cluster of ``nodes`` nodes, node i pinned to its own ``node_cpus`` cores."""
    from ray.cluster_utils import Cluster

    everything = os.sched_getaffinity(0)
    cluster = None
    try:
        for index in range(nodes):
            own = {cores[(index * node_cpus + k) % len(cores)] for k in range(node_cpus)}
            _pin(own)  # inherited by the node's processes started now
            args: dict[str, Any] = {
                "num_cpus": node_cpus,
                "memory": memory,
                "object_store_memory": OBJECT_STORE,
                "include_dashboard": False,
            }
            if cluster is None:
                cluster = Cluster(initialize_head=True, head_node_args=args)
            else:
                cluster.add_node(**args)
    finally:
        _pin(everything)
    assert cluster is not None
    cluster.wait_for_nodes()
    return cluster


def _noop() -> float:
    return time.time()


def _warm() -> int:
    """Start a worker with tureen imported (a task slot each, all at once)."""
    import merge_kernels.executors.ray_tasks  # noqa: F401  (torch and the kernels)

    time.sleep(0.5)  # held long enough that every slot starts a worker of its own
    return os.getpid()


def driver(spec: dict[str, Any]) -> dict[str, Any]:
    """One merge on the cluster at ``spec["address"]`` (run in its own process)."""
    import ray

    from merge_kernels.executors.ray_cluster import RayExecutor
    from merge_kernels.recipe import parse_recipe
    from merge_kernels.runner import MergeOptions, run_merge

    ray.init(address=spec["address"], logging_level=logging.WARNING, log_to_driver=False)
    executor = RayExecutor(task_bytes=spec["shard_bytes"], num_cpus=spec["task_cpus"])
    options = MergeOptions(max_shard_bytes=spec["shard_bytes"], executor=executor)
    import yaml

    recipe = parse_recipe(yaml.safe_load(Path(spec["recipe"]).read_text()))
    # Workers are started (and import torch) once per driver: a long-lived driver such as the
    # service starts them once, a `tureen merge` command every time. Both are measured: the
    # merge with the workers started, and the command's wall time, which includes this.
    warming = time.time()
    warm = ray.remote(_warm).options(num_cpus=spec["task_cpus"], scheduling_strategy="SPREAD")
    workers = len(set(ray.get([warm.remote() for _ in range(spec["slots"])])))
    begun = time.time()
    run_merge(recipe, Path(spec["out"]), options)
    ended = time.time()
    # Ray's own cost per task, measured after the merge so that it is not in its time.
    noop = ray.remote(_noop).options(num_cpus=spec["task_cpus"], scheduling_strategy="SPREAD")
    ray.get([noop.remote() for _ in range(spec["slots"])])
    trips = []
    for _ in range(NOOP_TASKS):
        tripped = time.perf_counter()
        ray.get(noop.remote())
        trips.append(time.perf_counter() - tripped)
    return {
        "merge_s": ended - begun,
        "worker_start_s": begun - warming,
        "workers": workers,
        "merged_at": ended,
        "noop_ms": 1000 * statistics.median(trips),
        "tasks": [
            {
                "shards": len(report.shards),
                "node": report.node_id[:8],
                "pid": report.pid,
                "submitted": submitted - begun,
                "started": report.started - begun,
                "planned": report.planned - begun,
                "finished": report.finished - begun,
                "returned": returned - begun,
            }
            for report, (submitted, returned) in zip(
                executor.reports, executor.round_trips, strict=True
            )
        ],
    }


def summarise(result: dict[str, Any], slots: int) -> dict[str, float]:
    """Per-task figures of one run (see the module docstring)."""
    tasks = result["tasks"]
    merging = [t["finished"] - t["planned"] for t in tasks]
    firsts: dict[int, float] = {}
    for t in sorted(tasks, key=lambda t: t["started"]):
        firsts.setdefault(t["pid"], t["planned"] - t["started"])
    return {
        "tasks": len(tasks),
        "task_merge_s_median": statistics.median(merging),
        "plan_s_median": statistics.median(firsts.values()),
        "noop_ms": result["noop_ms"],
        "idle_per_task_s": (slots * result["merge_s"] - sum(merging)) / len(tasks),
        "utilisation": sum(merging) / (slots * result["merge_s"]),
    }


def run_once(spec: dict[str, Any], scratch: Path) -> dict[str, Any]:
    """One merge in a fresh driver process; its wall time from start to exit."""
    out = Path(spec["out"])
    shutil.rmtree(out, ignore_errors=True)
    spec_file = scratch / "driver.json"
    spec_file.write_text(json.dumps(spec))
    begun = time.time()
    done = subprocess.run(
        [sys.executable, __file__, "--driver", str(spec_file)],
        capture_output=True,
        text=True,
        timeout=spec["timeout_s"],
    )
    if done.returncode != 0:
        raise RuntimeError(f"the driver failed ({done.returncode}):\n{done.stderr[-4000:]}")
    result = json.loads((scratch / "driver-result.json").read_text())
    shutil.rmtree(out, ignore_errors=True)
    # From the driver's start to its merge's end (its exit, and the no-op tasks timed after
    # the merge, are left out).
    return {"wall_s": result["merged_at"] - begun, **result}


def table(rows: list[dict[str, Any]]) -> str:
    """The markdown table of the results."""
    lines = [
        "| recipe | nodes | CPUs | runs | median wall (s) | median merge (s) | speed-up (wall) | "
        "speed-up (merge) | tasks | "
        "task merge (s, median) | no-op task (ms) | plan per worker (s) | idle slot per task "
        "(s) | slot utilisation |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        s = r["summary"]
        lines.append(
            f"| {r['recipe']} | {r['nodes']} | {r['cpus']} | {len(r['runs'])} | "
            f"{r['wall_s']:.1f} | {r['merge_s']:.1f} | {r['speedup_wall']:.2f}x | "
            f"**{r['speedup_merge']:.2f}x** | {s['tasks']} | "
            f"{s['task_merge_s_median']:.2f} | {s['noop_ms']:.1f} | {s['plan_s_median']:.2f} | "
            f"{s['idle_per_task_s']:.2f} | {100 * s['utilisation']:.0f}% |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Parse the arguments and run the benchmark (or, with ``--driver``, one merge)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-gb", type=float, default=3.0, help="size of each model, GB")
    parser.add_argument("--nodes", default="1,2,4", help="cluster sizes, e.g. 1,2,4")
    parser.add_argument("--recipes", default="ties,linear", help="e.g. ties,linear")
    parser.add_argument("--repeats", type=int, default=2, help="runs per recipe and size")
    parser.add_argument("--node-cpus", type=int, help="cores per node (default: a quarter)")
    parser.add_argument("--task-cpus", type=float, default=1.0, help="CPUs each task declares")
    parser.add_argument("--out-shard-size", type=parse_size, default=64 * 1000**2)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="where sets are kept")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "ray-scale")
    parser.add_argument("--budget-s", type=float, default=470, help="skip runs past this")
    parser.add_argument("--driver", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.driver is not None:
        result = driver(json.loads(args.driver.read_text()))
        (args.driver.parent / "driver-result.json").write_text(json.dumps(result))
        return 0

    started = time.monotonic()
    import torch

    # The nodes' workers import tureen from this checkout, as the drivers do.
    paths = [str(REPO), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
    os.environ["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))

    cores = sorted(os.sched_getaffinity(0))
    node_cpus = args.node_cpus or max(1, len(cores) // 4)
    sizes = [int(n) for n in args.nodes.split(",")]
    recipes = args.recipes.split(",")
    draw_on = "cuda" if torch.cuda.is_available() else None
    data = ensure_dataset(args.model_gb, deltas="bf16-ties", data=args.data, draw_on=draw_on)
    generated_s = time.monotonic() - started
    input_bytes = 0
    for model in data.models:  # warm the page cache
        for path in checkpoint_files(model):
            with open(path, "rb") as handle:
                while chunk := handle.read(64 * 2**20):
                    input_bytes += len(chunk)
    args.out.mkdir(parents=True, exist_ok=True)
    scratch = args.out / "scratch"
    scratch.mkdir(exist_ok=True)
    for recipe in recipes:
        (scratch / f"{recipe}.yaml").write_text(recipe_yaml(recipe, data))
    largest = max(
        _task_memory(scratch / f"{recipe}.yaml", args.out_shard_size) for recipe in recipes
    )
    # The memory a node declares is what Ray schedules by, not a limit: a quarter of the
    # machine's, or the largest task's estimate where that is more (the estimate is an upper
    # bound, well above what a task uses: see bench/SCALE.md).
    memory = max(int(0.9 * _memory_bytes()) // max(4, max(sizes)), int(1.05 * largest))
    print(
        f"{data.folder}: {input_bytes / GB:.2f} GB of inputs ({generated_s:.0f} s); nodes of "
        f"{node_cpus} cores and {memory / 2**30:.1f} GiB; {len(cores)} cores here",
        file=sys.stderr,
    )
    rows: list[dict[str, Any]] = []
    skipped: list[str] = []
    for nodes in sizes:
        cluster_begun = time.monotonic()
        cluster = start_cluster(nodes, node_cpus, cores, memory)
        cluster_s = time.monotonic() - cluster_begun
        slots = int(nodes * node_cpus / args.task_cpus)
        try:
            for recipe in recipes:
                one = [r for r in rows if r["recipe"] == recipe and r["nodes"] == sizes[0]]
                guess = one[0]["wall_s"] * sizes[0] / nodes if one else 40.0
                runs = []
                for _ in range(args.repeats):
                    left = args.budget_s - (time.monotonic() - started)
                    if left < 1.5 * guess + 10:
                        skipped.append(f"{recipe} on {nodes} nodes ({left:.0f} s left)")
                        break
                    spec = {
                        "address": cluster.address,
                        "recipe": str(scratch / f"{recipe}.yaml"),
                        "out": str(args.out / "merged"),
                        "shard_bytes": args.out_shard_size,
                        "task_cpus": args.task_cpus,
                        "slots": slots,
                        "timeout_s": max(30.0, left - 5),
                    }
                    runs.append(run_once(spec, scratch))
                    print(f"{recipe}, {nodes} nodes: {runs[-1]['wall_s']:.1f} s", file=sys.stderr)
                if not runs:
                    continue
                middle = sorted(runs, key=lambda r: r["wall_s"])[(len(runs) - 1) // 2]
                rows.append(
                    {
                        "recipe": recipe,
                        "nodes": nodes,
                        "cpus": nodes * node_cpus,
                        "cluster_start_s": cluster_s,
                        "wall_s": statistics.median(r["wall_s"] for r in runs),
                        "merge_s": statistics.median(r["merge_s"] for r in runs),
                        "summary": summarise(middle, slots),
                        "runs": runs,
                    }
                )
        finally:
            cluster.shutdown()
    for row in rows:
        first = next(r for r in rows if r["recipe"] == row["recipe"])
        row["speedup_wall"] = first["wall_s"] / row["wall_s"]  # over the smallest cluster
        row["speedup_merge"] = first["merge_s"] / row["merge_s"]
        row["baseline_nodes"] = first["nodes"]
    text = table(rows)
    facts = {
        "data": str(data.folder),
        "input_gb": input_bytes / GB,
        "cores": len(cores),
        "node_cpus": node_cpus,
        "node_memory": memory,
        "largest_task_memory_estimate": largest,
        "nodes_pinned": bool(PINNED) and all(PINNED),
        "task_cpus": args.task_cpus,
        "out_shard_bytes": args.out_shard_size,
        "generated_s": generated_s,
        "total_s": time.monotonic() - started,
        "skipped": skipped,
    }
    (args.out / "ray-scale.json").write_text(json.dumps({**facts, "rows": rows}, indent=2))
    (args.out / "ray-scale.md").write_text(text + "\n")
    print(text)
    if not facts["nodes_pinned"]:
        print("the nodes were NOT pinned to their own cores: the speed-ups do not measure scaling")
    if skipped:
        print("skipped (time budget): " + "; ".join(skipped))
    return 0


if __name__ == "__main__":
    sys.exit(main())
