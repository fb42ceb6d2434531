"""Latency of small merges through the service, as a client-driven soup loop sees it.

Starts a real tureen server on loopback (SQLite, worker processes), writes a tiny Llama-
layout base and fine-tunes, then submits linear merges one after another and measures, for
each, the wall time from ``POST /v1/merges`` to the job reading ``succeeded``, polling every
10 ms. Runs the series with worker reuse (``standby_worker``, the default) on and off, alternating
blocks, and prints medians and the ratio. Off, every job starts a fresh worker process.

    python bench/small_merges.py --merges 20 --json bench/results/small_merges.json
"""

from __future__ import annotations

import argparse
import json
import platform
import socket
import statistics
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import uvicorn

from merge_kernels.synthetic import LlamaShape, write_checkpoint
from service.app import create_app
from service.settings import ServiceSettings

VERBOSE = False
SHAPE = LlamaShape(hidden_size=64, intermediate_size=192, num_hidden_layers=2, vocab_size=512)


class Server:
    def __init__(self, data_dir: Path, root: Path, standby: bool) -> None:
        settings = ServiceSettings(
            data_dir=data_dir, allow_roots=[root], standby_worker=standby, workers=1
        )
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.server = uvicorn.Server(
            uvicorn.Config(create_app(settings), log_level="warning", lifespan="on")
        )
        self.thread = threading.Thread(
            target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True
        )

    def __enter__(self) -> Server:
        self.thread.start()
        while not self.server.started:
            time.sleep(0.01)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(30)
        self.sock.close()


def one_merge(client: httpx.Client, models: list[str]) -> float:
    started = time.perf_counter()
    body = {"merge_method": "linear", "models": [{"model": m} for m in models]}
    job_id = client.post("/v1/merges", json=body).json()["id"]
    while True:
        job = client.get(f"/v1/merges/{job_id}").json()
        if job["status"] in ("succeeded", "failed", "cancelled"):
            break
        time.sleep(0.01)
    if job["status"] != "succeeded":
        raise RuntimeError(f"merge failed: {job['error']}")
    total = time.perf_counter() - started
    if VERBOSE:
        from datetime import datetime

        times = {
            k: datetime.fromisoformat(job[k]) for k in ("created_at", "started_at", "finished_at")
        }
        queued = (times["started_at"] - times["created_at"]).total_seconds()
        running = (times["finished_at"] - times["started_at"]).total_seconds()
        print(
            f"total {total:.3f}  queued {queued:.3f}  running {running:.3f}"
            f"  engine {job['merge_seconds']:.3f}"
        )
    return total


def series(root: Path, work: Path, standby: bool, merges: int) -> list[float]:
    models = [str(root / f"ft{i}") for i in range(3)]
    with Server(work, root, standby) as server, httpx.Client(base_url=server.url) as client:
        one_merge(client, models[:1])  # the first job also waits for the first standby
        times = []
        for index in range(merges):  # back to back, as fast as a loop can ask
            times.append(one_merge(client, models[: 2 + index % 2]))
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--merges", type=int, default=20, help="merges per block")
    parser.add_argument("--blocks", type=int, default=2, help="blocks per setting, alternated")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--verbose", action="store_true", help="print each merge's phases")
    args = parser.parse_args()
    global VERBOSE
    VERBOSE = args.verbose
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder) / "models"
        for index in range(3):
            write_checkpoint(root / f"ft{index}", SHAPE, seed=index + 1, base_seed=0)
        size = sum(f.stat().st_size for f in (root / "ft0").glob("*.safetensors"))
        results: dict[str, list[float]] = {"standby": [], "cold": []}
        for block in range(args.blocks):
            for standby in (True, False):
                work = Path(folder) / f"data-{block}-{standby}"
                key = "standby" if standby else "cold"
                results[key] += series(root, work, standby, args.merges)
    summary: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()}, {platform.processor() or 'cpu'}",
        "model_bytes": size,
        "merges_per_setting": len(results["standby"]),
        "median_s": {k: statistics.median(v) for k, v in results.items()},
        "p90_s": {k: sorted(v)[int(0.9 * len(v))] for k, v in results.items()},
    }
    summary["cold_over_standby"] = summary["median_s"]["cold"] / summary["median_s"]["standby"]
    print(json.dumps(summary, indent=2))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({**summary, "times_s": results}, indent=2))


if __name__ == "__main__":
    main()
