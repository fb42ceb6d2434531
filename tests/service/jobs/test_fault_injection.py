"""Servers and workers killed at random points of a merge, the commit window included.

Each trial starts a real ``tureen serve``, submits a merge, and stops everything at once at
a point drawn from a seeded generator: the worker after its N-th shard, just before the
final rename, just after it, or the server at a random moment. While everything is down no
partial output may be visible; a restarted server must finish the job, and its output must
be byte-identical to an uninterrupted run's.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from merge_kernels.recipe import Recipe
from merge_kernels.runner import MergeOptions, run_merge
from tests.service.jobs.conftest import SHARD_BYTES, ties_recipe

pytestmark = pytest.mark.slow

FAULTS = Path(__file__).parent / "faults"
SEED = 20261203
TRIALS = 6
POINTS = ("after_shard", "before_commit", "after_commit", "server")


class Server:
    """``tureen serve`` in a process of its own, optionally with a fault armed."""

    def __init__(self, data_dir: Path, root: Path, fault: str | None) -> None:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        environment = {k: v for k, v in os.environ.items() if not k.startswith("TUREEN_")}
        if fault is not None:
            path = os.pathsep.join(p for p in (str(FAULTS), os.environ.get("PYTHONPATH")) if p)
            environment |= {
                "PYTHONPATH": path,
                "MERGE_FAULT_KILL_AT": fault,
                "MERGE_FAULT_KILL_PARENT": "1",
            }
        command = [sys.executable, "-m", "service.cli", "serve", "--port", str(port)]
        command += ["--data-dir", str(data_dir), "--allow-root", str(root)]
        self.process = subprocess.Popen(
            command, env=environment, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"{self.url}/readyz").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert self.process.poll() is None, "the server did not start"
            assert time.monotonic() < deadline, "the server did not become ready"
            time.sleep(0.05)

    def get(self, path: str) -> dict[str, Any]:
        response = httpx.get(f"{self.url}{path}", timeout=30)
        assert response.status_code == 200, response.text
        body: dict[str, Any] = response.json()
        return body

    def submit(self, body: dict[str, Any]) -> str:
        response = httpx.post(f"{self.url}/v1/merges", json=body, timeout=30)
        assert response.status_code == 202, response.text
        return str(response.json()["id"])

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
        self.process.wait(30)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def wait_finished(server: Server, job_id: str, timeout: float = 60) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        job = server.get(f"/v1/merges/{job_id}")
        if job["status"] in ("succeeded", "failed", "cancelled"):
            return job
        assert time.monotonic() < deadline, f"job still {job['status']}"
        time.sleep(0.05)


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def assert_nothing_partial(outputs: Path, name: str, reference: dict[str, bytes]) -> None:
    """Only finished outputs are visible: an output folder is absent or complete."""
    out = outputs / name
    if out.exists():
        assert snapshot(out) == reference, "a published output differs from a clean run"


def test_random_kills_always_end_in_the_clean_runs_output(
    tmp_path: Path, large_models: Path
) -> None:
    chance = random.Random(SEED)
    recipe: Recipe = ties_recipe(large_models, method="task_arithmetic")
    body = recipe.model_dump(mode="json")
    data_dir = tmp_path / "data"
    outputs = data_dir / "outputs"
    name = "merged"  # every trial writes the same output, so one clean run is the reference
    reference_dir = tmp_path / "reference" / name
    run_merge(recipe, reference_dir, MergeOptions(max_shard_bytes=SHARD_BYTES))
    reference = snapshot(reference_dir)
    started = time.monotonic()
    for trial in range(TRIALS):
        point = POINTS[trial] if trial < len(POINTS) else chance.choice(POINTS)
        fault = f"after_shard:{chance.randint(1, 8)}" if point == "after_shard" else point

        first = Server(data_dir, large_models.parent, None if point == "server" else fault)
        try:
            job_id = first.submit(body | {"output": {"name": name, "shard_size": SHARD_BYTES}})
            if point == "server":
                time.sleep(chance.uniform(0.0, 1.5))
                first.kill()
            else:
                first.process.wait(60)  # the worker kills its server at the fault point
        finally:
            first.kill()
        time.sleep(0.6)  # a worker whose server died notices within half a second
        assert_nothing_partial(outputs, name, reference)

        second = Server(data_dir, large_models.parent, None)
        try:
            job = wait_finished(second, job_id)
            assert job["status"] == "succeeded", (fault, job["error"])
            listing = second.get(f"/v1/merges/{job_id}/files")
            assert sorted(f["name"] for f in listing["files"]) == sorted(reference)
        finally:
            second.stop()
        assert snapshot(outputs / name) == reference, fault
        leftovers = [p.name for p in outputs.iterdir() if p.name != name]
        assert leftovers == [], (fault, leftovers)
        shutil.rmtree(outputs / name)  # free the name for the next trial
    assert time.monotonic() - started < 180
