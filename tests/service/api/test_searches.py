"""``/v1/searches`` on a real server: a TIES search run, followed, re-merged, paused across
a server restart, cancelled and refused."""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from service.jobs.sqlite_store import SqliteJobStore
from tests.hub_server.fake_hub import FakeHub, use_fake_hub
from tests.merge_kernels.search.conftest import (
    TiesWorld,
    ties_world,  # noqa: F401  (a fixture)
)
from tests.service.api.conftest import FINISHED, LiveServer, make_settings

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # the Hub client's

HUB_TOKEN = "hf_search_token_5c0e7a91d3b24f68"
BUDGET = 10  # about 0.1 s per evaluation: room to pause midway
FILES = {"report.json", "scores.svg", "best_recipe.yaml", "evaluation.json", "README.md"}


def spec(world: TiesWorld, name: str, strategy: str = "cmaes") -> dict[str, Any]:
    document = world.spec(strategy, BUDGET)
    document["output"] = {"name": name}
    return document


def wait(http: httpx.Client, job_id: str, statuses: tuple[str, ...] = FINISHED) -> dict[str, Any]:
    deadline = time.monotonic() + 60
    while True:
        job: dict[str, Any] = http.get(f"/v1/searches/{job_id}").json()
        if job["status"] in statuses:
            return job
        assert time.monotonic() < deadline, f"search {job_id} still {job['status']}"
        time.sleep(0.05)


def events(http: httpx.Client, job_id: str) -> list[tuple[str, Any]]:
    found: list[tuple[str, Any]] = []
    name = "message"
    with http.stream("GET", f"/v1/searches/{job_id}/events", timeout=60) as response:
        assert response.status_code == 200
        for line in response.iter_lines():
            if line.startswith("event: "):
                name = line.removeprefix("event: ")
            elif line.startswith("data: "):
                found.append((name, json.loads(line.removeprefix("data: "))))
    return found


def scored_indices(log: str) -> list[int]:
    """The candidates the worker scored, in order, from the job's log."""
    return [int(index) for index in re.findall(r"search: candidate (\d+) scored", log)]


def outcome(report: dict[str, Any]) -> tuple[Any, ...]:
    rows = [(row["point"], row["score"]) for row in report["evaluations"]]
    return rows, report["best"], report["best_recipe"]


@pytest.fixture(scope="module")
def world(ties_world: TiesWorld) -> TiesWorld:  # noqa: F811  (the fixture imported above)
    """Tiny Llamas: a far base, three fine-tunes near a target, validation and test data."""
    return ties_world


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("search-data")


def start(data_dir: Path, world: TiesWorld) -> LiveServer:
    return LiveServer(make_settings(data_dir, [world.root], max_body_bytes=1 << 20)).start()


@pytest.fixture(scope="module")
def server(data_dir: Path, world: TiesWorld) -> Iterator[LiveServer]:
    live = start(data_dir, world)
    yield live
    live.stop()


@pytest.fixture(scope="module")
def http(server: LiveServer) -> Iterator[httpx.Client]:
    with server.client() as client:
        yield client


@pytest.fixture(scope="module")
def finished(http: httpx.Client, world: TiesWorld) -> dict[str, Any]:
    """An uninterrupted search, followed over SSE to its end."""
    response = http.post("/v1/searches", json=spec(world, "whole"))
    assert response.status_code == 202, response.text
    job = response.json()
    assert response.headers["Location"] == f"/v1/searches/{job['id']}"
    stream = events(http, job["id"])
    return {"job": job, "events": stream}


def test_a_search_runs_reports_over_sse_and_writes_the_winner(
    finished: dict[str, Any], http: httpx.Client
) -> None:
    stream = finished["events"]
    name, final = stream[-1]
    assert name == "status" and final["status"] == "succeeded", final
    progress = [data["progress"] for event, data in stream if event == "progress"]
    done = [p["evaluations_done"] for p in progress if p["evaluations_done"] is not None]
    assert done and max(done) == BUDGET and done == sorted(done)
    assert all(p["evaluations_total"] == BUDGET for p in progress if p["evaluations_done"])
    report = final["report"]
    scores = [row["score"] for row in report["evaluations"]]
    assert len(scores) == BUDGET and report["stopped_by"] == "evaluations"
    assert report["best"]["score"] == min(scores)  # held-out loss: lower is better
    assert final["progress"]["best_score"] == report["best"]["score"]
    assert final["best_recipe"] == report["best_recipe"]
    assert report["written_validation_score"] == pytest.approx(report["best"]["score"], rel=1e-6)
    listing = http.get(f"/v1/searches/{final['id']}/files").json()
    names = {entry["name"] for entry in listing["files"]}
    assert names >= FILES and any(n.endswith(".safetensors") for n in names)
    svg = http.get(f"/v1/searches/{final['id']}/files/scores.svg")
    assert svg.status_code == 200 and svg.text.startswith("<svg")
    best_file = http.get(f"/v1/searches/{final['id']}/files/best_recipe.yaml").text
    assert best_file == report["best_recipe"]
    # One job system: the search is not a merge, and is listed with the searches.
    assert http.get(f"/v1/merges/{final['id']}").status_code == 404
    assert [item["id"] for item in http.get("/v1/searches").json()["items"]] == [final["id"]]


def test_the_best_recipe_remerged_reproduces_the_reported_score(
    finished: dict[str, Any], http: httpx.Client, world: TiesWorld
) -> None:
    report = finished["events"][-1][1]["report"]
    recipe = yaml.safe_load(report["best_recipe"])
    recipe["evaluator"] = finished["job"]["spec"]["evaluator"]
    recipe["output"] = {"name": "remerged"}
    body = yaml.safe_dump(recipe)
    response = http.post("/v1/merges", content=body, headers={"Content-Type": "application/yaml"})
    assert response.status_code == 202, response.text
    job_id = response.json()["id"]
    deadline = time.monotonic() + 60
    while (merge := http.get(f"/v1/merges/{job_id}").json())["status"] not in FINISHED:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert merge["status"] == "succeeded", merge["error"]
    assert merge["evaluation"]["merge"]["score"] == pytest.approx(report["best"]["score"], rel=1e-6)


def test_the_winner_is_published_like_a_merge(
    finished: dict[str, Any],
    http: httpx.Client,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    job_id = finished["job"]["id"]
    hub = FakeHub({HUB_TOKEN: ["alice"]}).start()
    try:
        use_fake_hub(hub, monkeypatch, tmp_path / "hf-home")
        response = http.post(
            f"/v1/searches/{job_id}/publish",
            json={"repo_id": "alice/ties-search"},
            headers={"X-HF-Token": HUB_TOKEN},
        )
        assert response.status_code == 202, response.text
        job = wait(http, job_id, ("succeeded", "failed"))
        assert job["publish"]["state"] == "published", job["publish"]
        output = Path(job["output_dir"])
        for name in ("report.json", "scores.svg", "best_recipe.yaml", "README.md"):
            assert hub.file_bytes("alice/ties-search", "main", name) == (output / name).read_bytes()
    finally:
        hub.stop()


def test_pause_restart_and_resume_end_as_an_uninterrupted_search(
    finished: dict[str, Any],
    server: LiveServer,
    http: httpx.Client,
    data_dir: Path,
    world: TiesWorld,
) -> None:
    expected = finished["events"][-1][1]["report"]
    job_id = http.post("/v1/searches", json=spec(world, "paused")).json()["id"]
    deadline = time.monotonic() + 60
    while (http.get(f"/v1/searches/{job_id}").json()["progress"]["evaluations_done"] or 0) < 2:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert http.post(f"/v1/searches/{job_id}/pause").status_code == 202
    paused = wait(http, job_id, ("paused", *FINISHED))
    assert paused["status"] == "paused"
    server.stop()  # the server goes away with the paused search
    store = SqliteJobStore(server.settings.database_path)
    try:
        state = store.search_state(job_id)
    finally:
        store.close()
    assert state is not None
    kept = len(state["evaluations"])
    assert 2 <= kept < BUDGET
    again = start(data_dir, world)
    try:
        with again.client() as client:
            assert client.get(f"/v1/searches/{job_id}").json()["status"] == "paused"
            assert client.post(f"/v1/searches/{job_id}/resume").status_code == 202
            job = wait(client, job_id)
            assert job["status"] == "succeeded", job["error"]
            log = client.get(f"/v1/searches/{job_id}/log").text
    finally:
        again.stop()
    assert outcome(job["report"]) == outcome(expected)
    # Each point scored once: the first run up to the pause, the second from there on.
    assert scored_indices(log) == list(range(BUDGET))


@pytest.fixture(scope="module")
def second(data_dir: Path, world: TiesWorld) -> Iterator[httpx.Client]:
    """A server on the data dir after the restart test (the first one is stopped by then)."""
    live = start(data_dir, world)
    with live.client() as client:
        yield client
    live.stop()


def test_cancel_drops_the_search_and_its_state(
    second: httpx.Client, world: TiesWorld, data_dir: Path
) -> None:
    job_id = second.post("/v1/searches", json=spec(world, "cancelled")).json()["id"]
    deadline = time.monotonic() + 60
    while (second.get(f"/v1/searches/{job_id}").json()["progress"]["evaluations_done"] or 0) < 1:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert second.delete(f"/v1/searches/{job_id}").status_code == 202
    job = wait(second, job_id)
    assert job["status"] == "cancelled" and job["report"] is None
    store = SqliteJobStore(data_dir / "tureen.sqlite3")
    try:
        assert store.search_state(job_id) is None
    finally:
        store.close()
    assert not (data_dir / "searches" / "cancelled").exists()
    # Only a succeeded search's winner is published (as a merge's output is).
    publish = second.post(f"/v1/searches/{job_id}/publish", json={"repo_id": "me/ties-search"})
    assert publish.status_code == 409, publish.text


def test_a_spec_error_is_a_422_naming_the_field(second: httpx.Client, world: TiesWorld) -> None:
    document = spec(world, "bad")
    document["budget"] = {"evaluations": 0}
    response = second.post("/v1/searches", json=document)
    assert response.status_code == 422, response.text
    assert response.json()["error"]["details"]["field"] == "budget.evaluations"
    document = spec(world, "bad")
    document["recipe"]["parameters"] = {"lambda": 1.0}
    for model in document["recipe"]["models"]:
        model["parameters"]["density"] = 0.5
    response = second.post("/v1/searches", json=document)
    assert response.status_code == 422 and response.json()["error"]["details"]["field"] == "recipe"


@pytest.mark.parametrize("where", ["base_model", "evaluator.data", "test.data"])
def test_a_path_outside_the_roots_is_refused(
    where: str,
    second: httpx.Client,
    world: TiesWorld,
    tmp_path: Path,
) -> None:
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (outside / "data.jsonl").write_text(world.validation.read_text())
    document = spec(world, "escape")
    if where == "base_model":
        document["recipe"]["base_model"] = str(outside)
    elif where == "evaluator.data":
        document["evaluator"]["data"] = str(outside / "data.jsonl")
    else:
        document["test"]["data"] = str(outside / "data.jsonl")
    before = second.get("/v1/searches").json()["total"]
    response = second.post("/v1/searches", json=document)
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["code"] in {"path_not_allowed", "not_found", "invalid_recipe"}, error
    if where != "base_model":
        assert error["details"]["field"] == where, error
    assert second.get("/v1/searches").json()["total"] == before
