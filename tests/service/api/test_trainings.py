"""``/v1/trainings`` on a real server: a LoRA training end to end, merged by its job id."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from safetensors.torch import load_file

from tests.service.api.conftest import FINISHED, LiveServer, make_settings
from training.tasks import write_task
from training.tiny_base import TinyBaseSpec, build_tiny_base


@pytest.fixture(scope="module")
def training_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    """A server whose inputs hold a tiny base and the ``add`` task's data."""
    data_dir = tmp_path_factory.mktemp("training-data")
    inputs = data_dir / "inputs"
    build_tiny_base(inputs / "tiny-base", TinyBaseSpec(pretrain_steps=20, corpus_lines=500))
    write_task(inputs / "add", "add", train=96, heldout=32, seed=0)
    live = LiveServer(make_settings(data_dir, [])).start()
    yield live
    live.stop()


@pytest.fixture
def client(training_server: LiveServer) -> Iterator[httpx.Client]:
    with training_server.client() as http:
        yield http


def lora_request(**changes: Any) -> dict[str, Any]:
    request: dict[str, Any] = {
        "kind": "lora",
        "base_model": "tiny-base",
        "data": {"train": "add/train.jsonl", "eval": "add/heldout.jsonl"},
        "lora": {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj", "up_proj"]},
        "training": {"max_steps": 20, "learning_rate": 0.01, "batch_size": 16},
    }
    request.update(changes)
    return request


def wait_for_training(client: httpx.Client, job_id: str, timeout: float = 120) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        job: dict[str, Any] = client.get(f"/v1/trainings/{job_id}").json()
        if job["status"] in FINISHED:
            return job
        assert time.monotonic() < deadline, f"training {job_id} still {job['status']}"
        time.sleep(0.1)


def training_events(client: httpx.Client, job_id: str) -> list[tuple[str, Any]]:
    events: list[tuple[str, Any]] = []
    name = "message"
    with client.stream("GET", f"/v1/trainings/{job_id}/events", timeout=120) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        for line in response.iter_lines():
            if line.startswith("event: "):
                name = line.removeprefix("event: ")
            elif line.startswith("data: "):
                events.append((name, json.loads(line.removeprefix("data: "))))
    return events


def test_a_lora_training_end_to_end_then_merged_by_job_id(
    client: httpx.Client, training_server: LiveServer
) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    submitted = client.post("/v1/trainings", json=lora_request())
    assert submitted.status_code == 202, submitted.text
    job = submitted.json()
    assert submitted.headers["Location"] == f"/v1/trainings/{job['id']}"
    assert job["status"] == "queued" and job["kind"] == "lora"

    events = training_events(client, job["id"])
    steps = [data["progress"]["steps_done"] for name, data in events if name == "progress"]
    assert events[-1][0] == "status"
    done = events[-1][1]
    assert done["status"] == "succeeded", done
    assert any(step for step in steps if step), steps
    assert done["steps"] == 20 and done["progress"]["phase"] == "done"
    assert done["progress"]["steps_done"] == 20 and done["progress"]["loss"] > 0
    before, after = done["held_out"]["before"], done["held_out"]["after"]
    assert after["loss"] < before["loss"] and after["examples"] == 32
    assert done["adapter_reference"] == f"trainings/{job['id']}"
    metrics = client.get("/metrics").text
    succeeded = next(
        line
        for line in metrics.splitlines()
        if line.startswith('tureen_trainings{state="succeeded"}')
    )
    assert float(succeeded.split()[-1]) >= 1
    inputs = training_server.settings.inputs_dir
    adapter = inputs / done["adapter_reference"]
    assert Path(done["adapter_dir"]) == adapter.resolve()

    files = client.get(f"/v1/trainings/{job['id']}/files", params={"sha256": "true"}).json()
    names = {entry["name"] for entry in files["files"]}
    assert {"adapter_config.json", "adapter_model.safetensors", "training_report.json"} <= names
    config = client.get(f"/v1/trainings/{job['id']}/files/adapter_config.json")
    assert config.status_code == 200 and config.json()["r"] == 4
    head = client.get(
        f"/v1/trainings/{job['id']}/files/adapter_model.safetensors", headers={"Range": "bytes=0-7"}
    )
    assert head.status_code == 206 and len(head.content) == 8
    listed = client.get("/v1/trainings", params={"status": "succeeded"}).json()
    assert job["id"] in [item["id"] for item in listed["items"]]

    # The adapter is a merge input at once: base + trainings/<job id>, relative to inputs.
    merge = client.post(
        "/v1/merges",
        json={
            "merge_method": "task_arithmetic",
            "base_model": "tiny-base",
            "models": [{"model": f"tiny-base+{done['adapter_reference']}"}],
            "dtype": "float32",
        },
    )
    assert merge.status_code == 202, merge.text
    merge_id = merge.json()["id"]
    deadline = time.monotonic() + 60
    while (merged := client.get(f"/v1/merges/{merge_id}").json())["status"] not in FINISHED:
        assert time.monotonic() < deadline
        time.sleep(0.1)
    assert merged["status"] == "succeeded", merged
    written = load_file(Path(merged["output_dir"]) / "model.safetensors")
    base = AutoModelForCausalLM.from_pretrained(inputs / "tiny-base", dtype=torch.float32)
    expected = PeftModel.from_pretrained(base, adapter).merge_and_unload().state_dict()
    for name, tensor in written.items():
        assert torch.allclose(tensor, expected[name], atol=1e-6, rtol=0), name


def test_cancel_a_running_training_leaves_no_adapter(
    client: httpx.Client, training_server: LiveServer
) -> None:
    job = client.post(
        "/v1/trainings",
        json=lora_request(training={"max_steps": 100000, "batch_size": 4}, output={"name": "long"}),
    ).json()
    deadline = time.monotonic() + 120
    while not (client.get(f"/v1/trainings/{job['id']}").json()["progress"]["steps_done"] or 0):
        assert time.monotonic() < deadline, "the training never started stepping"
        time.sleep(0.1)
    cancelled = client.delete(f"/v1/trainings/{job['id']}")
    assert cancelled.status_code == 202 and cancelled.json()["cancel_requested"] is True
    final = wait_for_training(client, job["id"], timeout=30)
    assert final["status"] == "cancelled" and final["adapter_reference"] is None
    trainings = training_server.settings.inputs_dir / "trainings"
    assert not (trainings / "long").exists()
    assert not list(trainings.glob(".long*"))
    files = client.get(f"/v1/trainings/{job['id']}/files")
    assert files.status_code == 409 and files.json()["error"]["code"] == "job_not_succeeded"
    log = client.get(f"/v1/trainings/{job['id']}/log")
    assert log.status_code == 200 and log.headers["content-type"].startswith("text/plain")
    assert f"training {job['id']} cancelled" in log.text


@pytest.mark.parametrize(
    ("body", "status", "field", "message"),
    [
        (lora_request(kind="ppo"), 422, "kind", "lora"),
        (lora_request(output_dir="/tmp/x"), 422, "output_dir", "output.name"),
        (lora_request(lora={"r": 0}), 422, "lora.r", "greater than or equal to 1"),
        (lora_request(base_model="/etc"), 422, "base_model", "folder the service may read"),
        (lora_request(base_model="add"), 422, "base_model", "not a local model folder"),
        (lora_request(kind="dpo"), 422, None, "expected a JSON object"),
        (lora_request(output={"name": "../up"}), 422, "output.name", "letters, digits"),
    ],
)
def test_invalid_requests_are_refused_before_any_job(
    client: httpx.Client, body: dict[str, Any], status: int, field: str | None, message: str
) -> None:
    before = client.get("/v1/trainings").json()["total"]
    response = client.post("/v1/trainings", json=body)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert message in error["message"]
    if field is not None:
        assert error["details"]["field"] == field
    assert client.get("/v1/trainings").json()["total"] == before


def test_yaml_body_name_conflicts_auth_and_unknown_jobs(
    client: httpx.Client, training_server: LiveServer
) -> None:
    (training_server.settings.inputs_dir / "trainings" / "taken").mkdir(parents=True)
    yaml_body = (
        "kind: lora\nbase_model: tiny-base\ndata: {train: add/train.jsonl}\noutput: {name: taken}\n"
    )
    taken = client.post(
        "/v1/trainings", content=yaml_body, headers={"Content-Type": "application/yaml"}
    )
    assert taken.status_code == 409 and taken.json()["error"]["code"] == "output_exists"
    with training_server.client(token=None) as anonymous:
        assert anonymous.get("/v1/trainings").status_code == 401
        assert anonymous.get("/v1/trainings/" + "0" * 32 + "/log").status_code == 401
    missing = client.get("/v1/trainings/" + "0" * 32)
    assert missing.status_code == 404
    missing_log = client.get("/v1/trainings/" + "0" * 32 + "/log")
    assert missing_log.status_code == 404 and missing_log.json()["error"]["code"] == "not_found"
