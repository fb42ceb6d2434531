"""Huge safetensors headers: refused past the service's limits, planned off the event loop."""

from __future__ import annotations

import json
import struct
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.service.api.conftest import LiveServer, make_settings


def write_many_tensors(folder: Path, count: int) -> Path:
    """A checkpoint of ``count`` one-element tensors (a header of about 85 bytes each)."""
    folder.mkdir(parents=True, exist_ok=True)
    header = {
        f"model.layers.0.t{i}": {"dtype": "F32", "shape": [1], "data_offsets": [4 * i, 4 * i + 4]}
        for i in range(count)
    }
    body = json.dumps(header, separators=(",", ":")).encode()
    path = folder / "model.safetensors"
    path.write_bytes(struct.pack("<Q", len(body)) + body + bytes(4 * count))
    return path


def _linear(root: Path, *names: str) -> dict[str, Any]:
    return {"merge_method": "linear", "models": [{"model": str(root / n)} for n in names]}


@pytest.fixture(scope="module")
def many_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("many")
    for name in ("a", "b"):
        write_many_tensors(root / f"small-{name}", 500)
        write_many_tensors(root / f"large-{name}", 20_000)
    return root


@pytest.fixture(scope="module")
def limited(tmp_path_factory: pytest.TempPathFactory, many_root: Path) -> Iterator[LiveServer]:
    """A server that reads headers of at most 1,000 tensors and 64 KiB."""
    settings = make_settings(
        tmp_path_factory.mktemp("data"),
        [many_root],
        max_header_tensors=1_000,
        max_header_bytes=64 * 1024,
    )
    live = LiveServer(settings).start()
    yield live
    live.stop()


@pytest.mark.parametrize("path", ["/v1/plans", "/v1/merges"])
def test_headers_past_the_limits_are_refused(
    limited: LiveServer, many_root: Path, path: str
) -> None:
    with limited.client() as http:
        allowed = http.post("/v1/plans", json=_linear(many_root, "small-a", "small-b"))
        assert allowed.status_code == 200, allowed.text
        response = http.post(path, json=_linear(many_root, "large-a", "large-b"))
        assert response.status_code == 422, response.text
        error = response.json()["error"]
        assert error["code"] == "bad_checkpoint_file"
        assert str(many_root / "large-a" / "model.safetensors") in error["message"]
        assert "TUREEN_MAX_HEADER_BYTES" in error["message"]
        assert http.get("/v1/merges").json()["total"] == 0


def test_tensor_count_limit_is_named(
    tmp_path_factory: pytest.TempPathFactory, many_root: Path
) -> None:
    settings = make_settings(tmp_path_factory.mktemp("data"), [many_root], max_header_tensors=1_000)
    live = LiveServer(settings).start()
    try:
        with live.client() as http:
            response = http.post("/v1/plans", json=_linear(many_root, "large-a", "large-b"))
    finally:
        live.stop()
    assert response.status_code == 422, response.text
    message = response.json()["error"]["message"]
    assert "lists 20000 tensors, over the limit of 1000" in message
    assert "TUREEN_MAX_HEADER_TENSORS" in message


def test_health_answers_while_a_large_plan_runs(
    tmp_path_factory: pytest.TempPathFactory, many_root: Path
) -> None:
    # Default limits: the 20,000-tensor headers are read, which takes seconds of work.
    live = LiveServer(make_settings(tmp_path_factory.mktemp("data"), [many_root])).start()
    result: dict[str, Any] = {}

    def plan() -> None:
        with live.client() as http:
            started = time.monotonic()
            document = _linear(many_root, "large-a", "large-b")
            result["response"] = http.post("/v1/plans", json=document, timeout=120)
            result["seconds"] = time.monotonic() - started

    planner = threading.Thread(target=plan)
    slowest = 0.0
    answered = 0
    try:
        planner.start()
        with httpx.Client(base_url=live.url, timeout=10) as anonymous:
            while planner.is_alive():
                started = time.monotonic()
                assert anonymous.get("/healthz").status_code == 200
                slowest = max(slowest, time.monotonic() - started)
                answered += 1
                time.sleep(0.05)
        planner.join()
    finally:
        live.stop()
    assert result["response"].status_code == 200, result["response"].text
    assert result["response"].json()["output"]["tensors"] == 20_000
    assert answered >= 5, f"the plan took only {result['seconds']:.2f} s"
    assert slowest < 1.0, f"/healthz took {slowest:.2f} s while a plan ran"
