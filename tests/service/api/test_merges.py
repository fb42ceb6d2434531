"""Merge jobs over HTTP against a real server: submit, follow, download, cancel, idempotency."""

from __future__ import annotations

import hashlib
import os
import signal
import time
from pathlib import Path

import httpx
import yaml

from tests.service.api.conftest import (
    LiveServer,
    dare_recipe,
    pause_mid_merge,
    read_events,
    ties_recipe,
    wait_for,
)


def test_submit_follow_events_list_and_download(
    server: LiveServer, client: httpx.Client, models_root: Path
) -> None:
    response = client.post("/v1/merges", json=ties_recipe(models_root, models=3))
    assert response.status_code == 202, response.text
    job = response.json()
    assert job["status"] == "queued"
    assert response.headers["location"] == f"/v1/merges/{job['id']}"

    events = read_events(client, job["id"])
    names = [name for name, _ in events if name != ":"]
    assert names[-1] == "status"
    assert set(names[:-1]) == {"progress"} and names[:-1]
    final = events[-1][1]
    assert final["status"] == "succeeded", final
    assert final["progress"]["phase"] == "done"
    assert final["finished_at"] is not None and final["started_at"] is not None

    listing = client.get(f"/v1/merges/{job['id']}/files", params={"sha256": "true"})
    assert listing.status_code == 200
    files = {entry["name"]: entry for entry in listing.json()["files"]}
    assert {"model.safetensors", "config.json"} <= set(files)
    out_dir = Path(final["output_dir"])
    disk = (out_dir / "model.safetensors").read_bytes()
    assert files["model.safetensors"]["bytes"] == len(disk)
    assert files["model.safetensors"]["sha256"] == hashlib.sha256(disk).hexdigest()

    url = f"/v1/merges/{job['id']}/files/model.safetensors"
    whole = client.get(url)
    assert whole.status_code == 200
    assert whole.headers["accept-ranges"] == "bytes"
    assert whole.content == disk

    size = len(disk)
    first = client.get(url, headers={"Range": "bytes=0-999"})
    middle = client.get(url, headers={"Range": f"bytes=1000-{size - 101}"})
    last = client.get(url, headers={"Range": "bytes=-100"})
    for part in (first, middle, last):
        assert part.status_code == 206
    assert first.headers["content-range"] == f"bytes 0-999/{size}"
    assert last.headers["content-range"] == f"bytes {size - 100}-{size - 1}/{size}"
    assert first.content + middle.content + last.content == disk
    open_ended = client.get(url, headers={"Range": f"bytes={size - 10}-"})
    assert open_ended.status_code == 206 and open_ended.content == disk[-10:]

    beyond = client.get(url, headers={"Range": f"bytes={size}-"})
    assert beyond.status_code == 416
    assert beyond.headers["content-range"] == f"bytes */{size}"
    assert beyond.json()["error"]["code"] == "range_not_satisfiable"

    got = client.get(f"/v1/merges/{job['id']}").json()
    assert got["status"] == "succeeded" and "model.safetensors" in got["files"]


def test_download_paths_stay_inside_the_output(
    client: httpx.Client, models_root: Path, outside_root: Path
) -> None:
    job = client.post("/v1/merges", json=ties_recipe(models_root)).json()
    done = wait_for(client, job["id"])
    assert done["status"] == "succeeded"
    out_dir = Path(done["output_dir"])
    (out_dir / "escape").symlink_to(outside_root / "secret" / "config.json")
    base = f"/v1/merges/{job['id']}/files"
    for path in ("../../tureen.sqlite3", "..%2F..%2Ftureen.sqlite3", "escape", "missing.bin"):
        response = client.get(f"{base}/{path}")
        assert response.status_code == 404, path
        assert response.json()["error"]["code"] == "not_found"
    listed = {entry["name"] for entry in client.get(base).json()["files"]}
    assert "escape" not in listed


def test_files_of_an_unfinished_job_conflict(client: httpx.Client, larger_root: Path) -> None:
    body = dare_recipe(larger_root) | {"output": {"shard_size": 1_000_000}}
    job = client.post("/v1/merges", json=body).json()
    response = client.get(f"/v1/merges/{job['id']}/files")
    assert response.status_code == 409
    assert response.json()["error"]["code"] == "job_not_succeeded"
    client.delete(f"/v1/merges/{job['id']}")
    wait_for(client, job["id"])


def test_cancel_a_running_merge_leaves_no_output(
    server: LiveServer, client: httpx.Client, larger_root: Path
) -> None:
    body = dare_recipe(larger_root) | {"output": {"shard_size": 1_000_000, "name": "to-cancel"}}
    job = client.post("/v1/merges", json=body).json()
    queued = client.post("/v1/merges", json=ties_recipe(larger_root)).json()
    staging = server.settings.outputs_dir / ".to-cancel.tureen-partial"
    worker = pause_mid_merge(client, job["id"], staging)

    cancelled_queued = client.delete(f"/v1/merges/{queued['id']}")
    assert cancelled_queued.status_code == 202
    assert cancelled_queued.json()["status"] == "cancelled"

    response = client.delete(f"/v1/merges/{job['id']}")
    # The worker reads the cancel flag at most every 0.5 s; resumed sooner, a fast merge
    # could finish its last shards before its next read.
    time.sleep(0.6)
    os.kill(worker, signal.SIGCONT)
    assert response.status_code == 202
    assert response.json()["cancel_requested"] is True
    asked = time.monotonic()
    final = wait_for(client, job["id"], timeout=15)
    assert final["status"] == "cancelled"
    assert time.monotonic() - asked < 5
    assert final["output_dir"] is None and final["files"] == []
    assert not [p.name for p in server.settings.outputs_dir.iterdir() if "to-cancel" in p.name]
    again = client.delete(f"/v1/merges/{job['id']}")
    assert again.status_code == 202 and again.json()["status"] == "cancelled"


def test_idempotency_key(client: httpx.Client, models_root: Path) -> None:
    body = ties_recipe(models_root, density=0.3)
    headers = {"Idempotency-Key": "retry-42"}
    first = client.post("/v1/merges", json=body, headers=headers)
    again = client.post("/v1/merges", json=body, headers=headers)
    assert first.status_code == 202 and again.status_code == 200
    assert first.json()["id"] == again.json()["id"]
    assert again.headers["location"] == f"/v1/merges/{first.json()['id']}"

    other = client.post("/v1/merges", json=ties_recipe(models_root, density=0.4), headers=headers)
    assert other.status_code == 409
    error = other.json()["error"]
    assert error["code"] == "idempotency_conflict"
    assert error["details"]["job_id"] == first.json()["id"]
    wait_for(client, first.json()["id"])


def test_yaml_body(client: httpx.Client, models_root: Path) -> None:
    text = yaml.safe_dump(ties_recipe(models_root) | {"output": {"dtype": "bfloat16"}})
    response = client.post("/v1/merges", content=text, headers={"Content-Type": "application/yaml"})
    assert response.status_code == 202, response.text
    job = wait_for(client, response.json()["id"])
    assert job["status"] == "succeeded"
    assert job["output"]["dtype"] == "bfloat16"


def test_list_is_paginated_and_filtered(client: httpx.Client) -> None:
    page = client.get("/v1/merges", params={"limit": 2, "offset": 0}).json()
    assert page["limit"] == 2 and page["offset"] == 0
    assert len(page["items"]) == min(2, page["total"])
    everything = client.get("/v1/merges", params={"limit": 500}).json()
    assert len(everything["items"]) == everything["total"] >= 2
    succeeded = client.get("/v1/merges", params={"status": "succeeded"}).json()
    assert succeeded["items"] and {j["status"] for j in succeeded["items"]} == {"succeeded"}
    bad = client.get("/v1/merges", params={"status": "sleeping"})
    assert bad.status_code == 422
    assert bad.json()["error"]["details"]["field"] == "query.status"


def test_unknown_job_is_404(client: httpx.Client) -> None:
    for method, path in (
        ("GET", "/v1/merges/nope"),
        ("DELETE", "/v1/merges/nope"),
        ("GET", "/v1/merges/nope/events"),
        ("GET", "/v1/merges/nope/files"),
        ("GET", "/v1/merges/nope/files/model.safetensors"),
    ):
        response = client.request(method, path)
        assert response.status_code == 404, path
        assert response.json()["error"]["code"] == "not_found"


def test_metrics_count_the_jobs(client: httpx.Client) -> None:
    response = client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
    samples = {
        line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
        for line in response.text.splitlines()
        if line and not line.startswith("#")
    }
    for state in ("queued", "running", "succeeded", "failed", "cancelled"):
        listed = client.get("/v1/merges", params={"status": state}).json()["total"]
        assert samples[f'tureen_jobs{{state="{state}"}}'] == listed
    succeeded = client.get("/v1/merges", params={"status": "succeeded", "limit": 500}).json()
    assert samples["tureen_merge_duration_seconds_count"] == succeeded["total"]
    written = sum(job["bytes_written"] for job in succeeded["items"])
    assert samples["tureen_merged_bytes_total"] == written
    if succeeded["total"]:
        assert written > 0 and samples["tureen_merge_duration_seconds_sum"] > 0
    assert "# TYPE tureen_jobs gauge" in response.text
    assert "# TYPE tureen_merge_duration_seconds summary" in response.text
    assert "# TYPE tureen_merged_bytes_total counter" in response.text


def test_a_merges_log_holds_its_worker_lines_and_no_others(
    server: LiveServer, client: httpx.Client, models_root: Path
) -> None:
    first = client.post("/v1/merges", json=ties_recipe(models_root)).json()
    second = client.post("/v1/merges", json=ties_recipe(models_root, density=0.3)).json()
    for job in (first, second):
        assert wait_for(client, job["id"])["status"] == "succeeded"
    response = client.get(f"/v1/merges/{first['id']}/log")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    assert f"job {first['id']} succeeded" in response.text
    assert second["id"] not in response.text
    assert f"job {second['id']} succeeded" in client.get(f"/v1/merges/{second['id']}/log").text

    missing = client.get("/v1/merges/0123456789abcdef/log")
    assert missing.status_code == 404
    assert missing.json()["error"]["code"] == "not_found"
    with server.client(token=None) as anonymous:
        assert anonymous.get(f"/v1/merges/{first['id']}/log").status_code == 401
