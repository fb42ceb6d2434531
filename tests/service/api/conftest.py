"""A real tureen server for the API tests: uvicorn, SQLite, worker processes, checkpoints."""

from __future__ import annotations

import json
import os
import signal
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn

from merge_kernels.synthetic import LlamaShape, write_checkpoint
from service.app import create_app
from service.settings import ServiceSettings

TINY = LlamaShape(hidden_size=32, intermediate_size=64, num_hidden_layers=2, vocab_size=96)
# Big enough that a DARE-TIES merge in 1 MB shards takes a few seconds (cancel, resume).
LARGER = LlamaShape(hidden_size=128, intermediate_size=256, num_hidden_layers=16, vocab_size=2048)
TOKEN = "test-token-3f9c2a"
FINISHED = ("succeeded", "failed", "cancelled")


class LiveServer:
    """The real app under uvicorn on a free loopback port, in a background thread."""

    def __init__(self, settings: ServiceSettings) -> None:
        self.settings = settings
        self.app = create_app(settings)
        self.app.state.sse_poll_seconds = 0.05
        self.app.state.sse_heartbeat_seconds = 0.5
        self.app.state.worker_stop_seconds = 1.0
        self.socket = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.socket.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.socket.getsockname()[1]}"
        config = uvicorn.Config(
            self.app, log_level="warning", lifespan="on", timeout_graceful_shutdown=2
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(
            target=self.server.run, kwargs={"sockets": [self.socket]}, daemon=True
        )

    def start(self) -> LiveServer:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the test server did not start")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)
        self.socket.close()

    def client(self, token: str | None = TOKEN) -> httpx.Client:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=30)


def make_settings(data_dir: Path, roots: list[Path], **overrides: Any) -> ServiceSettings:
    """Settings for a test server (keyword arguments win over any TUREEN_* variable)."""
    values: dict[str, Any] = {
        "data_dir": data_dir,
        "allow_roots": roots,
        "api_tokens": [TOKEN],
        "workers": 1,
        "max_body_bytes": 64 * 1024,
        "memory_budget_bytes": None,
        "device": "cpu",
        "host": "127.0.0.1",
    }
    values.update(overrides)
    return ServiceSettings(**values)


def ties_recipe(root: Path, *, density: float = 0.5, models: int = 2) -> dict[str, Any]:
    """A TIES recipe over ``root/base`` and ``root/ft1..``, absolute paths."""
    return {
        "merge_method": "ties",
        "base_model": str(root / "base"),
        "models": [
            {"model": str(root / f"ft{i}"), "parameters": {"weight": 1.0, "density": density}}
            for i in range(1, models + 1)
        ],
        "parameters": {"lambda": 1.0},
    }


def dare_recipe(root: Path) -> dict[str, Any]:
    """A DARE-TIES recipe (random masks from the seed) over ``root``."""
    return {
        "merge_method": "dare_ties",
        "base_model": str(root / "base"),
        "models": [
            {"model": str(root / f"ft{i}"), "parameters": {"weight": 0.5, "density": 0.4}}
            for i in (1, 2)
        ],
        "seed": 7,
    }


def wait_for(
    client: httpx.Client, job_id: str, statuses: tuple[str, ...] = FINISHED, timeout: float = 60
) -> dict[str, Any]:
    """Poll a job until its status is one of ``statuses``."""
    deadline = time.monotonic() + timeout
    while True:
        job: dict[str, Any] = client.get(f"/v1/merges/{job_id}").json()
        if job["status"] in statuses:
            return job
        if time.monotonic() > deadline:
            raise AssertionError(f"job {job_id} still {job['status']} after {timeout} s")
        time.sleep(0.05)


def pause_mid_merge(client: httpx.Client, job_id: str, staging: Path) -> int:
    """Freeze a job's worker (SIGSTOP) as soon as it has recorded one finished shard.

    Args:
        client: a client of the server running the job.
        job_id: the job.
        staging: the job's staging folder, whose manifest lists the finished shards.

    Returns:
        The worker's process id (send it SIGCONT to let it go on).
    """
    deadline = time.monotonic() + 60
    pid = None
    while pid is None:
        job = client.get(f"/v1/merges/{job_id}").json()
        assert job["status"] not in FINISHED, f"the merge ended too soon: {job['status']}"
        pid = job["worker_pid"]
        assert time.monotonic() < deadline, "no worker took the job"
        time.sleep(0.01)
    manifest = staging / "tureen-manifest.json"
    while True:
        try:
            shards = json.loads(manifest.read_text())["shards"]
        except (OSError, ValueError):
            shards = {}
        if shards:
            os.kill(pid, signal.SIGSTOP)
            break
        assert time.monotonic() < deadline, "the merge never finished a shard"
        time.sleep(0.002)
    job = client.get(f"/v1/merges/{job_id}").json()
    assert job["status"] == "running", f"the merge ended before it was paused: {job['status']}"
    return int(pid)


def read_events(client: httpx.Client, job_id: str) -> list[tuple[str, Any]]:
    """Follow a job's SSE stream to its end: (event, data) pairs, ``:`` comments included."""
    events: list[tuple[str, Any]] = []
    name = "message"
    with client.stream("GET", f"/v1/merges/{job_id}/events", timeout=60) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        for line in response.iter_lines():
            if line.startswith(":"):
                events.append((":", line))
            elif line.startswith("event: "):
                name = line.removeprefix("event: ")
            elif line.startswith("data: "):
                events.append((name, json.loads(line.removeprefix("data: "))))
    return events


@pytest.fixture(scope="session")
def models_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An allowed root: a tiny base, three fine-tunes of it, and ``odd`` of another shape."""
    root = tmp_path_factory.mktemp("models")
    write_checkpoint(root / "base", TINY, seed=0)
    for index in (1, 2, 3):
        write_checkpoint(root / f"ft{index}", TINY, seed=index, base_seed=0, delta_scale=0.05)
    write_checkpoint(root / "odd", replace(TINY, vocab_size=80), seed=9)
    return root


@pytest.fixture(scope="session")
def larger_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An allowed root with a larger base and two fine-tunes (about 13 MB each)."""
    root = tmp_path_factory.mktemp("larger")
    write_checkpoint(root / "base", LARGER, seed=0)
    for index in (1, 2):
        write_checkpoint(root / f"ft{index}", LARGER, seed=index, base_seed=0)
    return root


@pytest.fixture(scope="session")
def outside_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real checkpoint outside every allowed root."""
    root = tmp_path_factory.mktemp("outside")
    write_checkpoint(root / "secret", TINY, seed=5, base_seed=0)
    return root


@pytest.fixture(autouse=True, scope="module")
def _hub_offline(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    # Requests may name Hub repositories: answer from an empty cache, never the network.
    try:
        # errors too: the Hub resolver uses both submodules without importing them itself
        from huggingface_hub import constants, errors  # noqa: F401
    except ImportError:  # Hub references then fail with a clear error anyway
        yield
        return
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(constants, "HF_HUB_OFFLINE", True)
        patch.setattr(constants, "HF_HUB_CACHE", str(tmp_path_factory.mktemp("hf-cache")))
        yield


@pytest.fixture(scope="module")
def server(
    tmp_path_factory: pytest.TempPathFactory, models_root: Path, larger_root: Path
) -> Iterator[LiveServer]:
    """One running server (auth on) shared by a test module."""
    data_dir = tmp_path_factory.mktemp("data")
    live = LiveServer(make_settings(data_dir, [models_root, larger_root])).start()
    yield live
    live.stop()


@pytest.fixture
def client(server: LiveServer) -> Iterator[httpx.Client]:
    """A client of the shared server that sends the token."""
    with server.client() as http:
        yield http
