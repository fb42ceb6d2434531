"""A third job kind, registered here, runs end to end through the shared job machinery.

The toy kind brings only what a kind brings (its spec, a submit route, a worker entry
point, its routes' texts); the store, the dispatcher, real worker processes and the shared
list, get, cancel, events, log and files routes are the ones merges and trainings use.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import APIRouter
from pydantic import BaseModel, ConfigDict

from service.api.deps import Authenticated, ManagerDep
from service.api.job_routes import (
    OPERATIONS,
    PAUSE_OPERATIONS,
    JobRoutes,
    Operation,
    add_job_routes,
)
from service.api.schemas import JobList
from service.jobs.kinds import JobKind, register_kind, unregister_kind
from service.jobs.models import Job, JobStatus, OutputOptions
from service.jobs.sqlite_store import utcnow
from service.jobs.worker import discard_staging
from tests.service.api.conftest import FINISHED, LiveServer, make_settings
from tests.service.jobs.toy_worker import toy_command

TOY = JobKind(
    name="toy",
    noun="toy job",
    output_noun="toy output",
    log_folder="toys",
    output_root=lambda settings: settings.data_dir / "toys",
    standby_command=toy_command,
    discard=discard_staging,
    concurrency=lambda settings: 2,
    metric_family="tureen_toys",
)


class ToySpec(BaseModel):
    """The toy kind's request body."""

    model_config = ConfigDict(extra="forbid")

    text: str
    steps: int = 3
    hold: str | None = None
    name: str | None = None


def toy_router() -> APIRouter:
    router = APIRouter(prefix="/v1/toys", tags=["toys"], dependencies=[Authenticated])

    @router.post("", status_code=202, response_model=Job)
    def submit_toy(spec: ToySpec, manager: ManagerDep) -> Job:
        recipe = spec.model_dump(exclude={"name"})
        job = Job(
            id=uuid.uuid4().hex,
            kind=TOY.name,
            status=JobStatus.QUEUED,
            recipe=recipe,
            output=OutputOptions(name=spec.name),
            created_at=utcnow(),
        )
        return manager.enqueue(job)[0]

    names = OPERATIONS + PAUSE_OPERATIONS
    texts = {name: Operation(f"{name}_toy", f"{name} a toy", f"Toy {name}.") for name in names}
    add_job_routes(
        router,
        JobRoutes(
            kind=TOY.name,
            noun=TOY.noun,
            job_model=Job,
            list_model=JobList,
            view=lambda job: job,
            id_description="The toy job id.",
            events_description="Toy events.",
            operations=texts,
            order=names,
        ),
    )
    return router


@pytest.fixture(scope="module")
def toy_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    register_kind(TOY)  # before the app's manager is made, as a kind module's import does
    try:
        settings = make_settings(tmp_path_factory.mktemp("toys"), [], standby_worker=False)
        live = LiveServer(settings)
        live.app.include_router(toy_router())
        live.start()
        yield live
        live.stop()
    finally:
        unregister_kind(TOY.name)


@pytest.fixture
def client(toy_server: LiveServer) -> Iterator[httpx.Client]:
    with toy_server.client() as http:
        yield http


def wait_toy(client: httpx.Client, job_id: str, statuses: tuple[str, ...] = FINISHED) -> Any:
    deadline = time.monotonic() + 60
    while True:
        job = client.get(f"/v1/toys/{job_id}").json()
        if job["status"] in statuses:
            return job
        assert time.monotonic() < deadline, f"toy job {job_id} still {job['status']}"
        time.sleep(0.05)


def test_a_toy_job_runs_through_the_shared_routes(
    client: httpx.Client, toy_server: LiveServer
) -> None:
    response = client.post("/v1/toys", json={"text": "hello", "name": "greeting"})
    assert response.status_code == 202, response.text
    job_id = response.json()["id"]
    assert response.json()["kind"] == "toy"
    events: list[tuple[str, Any]] = []
    name = "message"
    with client.stream("GET", f"/v1/toys/{job_id}/events", timeout=60) as stream:
        for line in stream.iter_lines():
            if line.startswith("event: "):
                name = line.removeprefix("event: ")
            elif line.startswith("data: "):
                events.append((name, json.loads(line.removeprefix("data: "))))
    assert events[-1][0] == "status" and events[-1][1]["status"] == "succeeded"
    assert all(kind == "progress" for kind, _ in events[:-1])
    done = client.get(f"/v1/toys/{job_id}").json()
    assert done["status"] == "succeeded" and done["progress"]["steps_done"] == 3
    output = toy_server.settings.data_dir / "toys" / "greeting"
    assert done["output_dir"] == str(output.resolve())
    files = client.get(f"/v1/toys/{job_id}/files", params={"sha256": "true"}).json()
    assert [f["name"] for f in files["files"]] == ["result.txt"]
    assert client.get(f"/v1/toys/{job_id}/files/result.txt").content == b"hello"
    assert client.get(f"/v1/toys/{job_id}/files/nope.txt").status_code == 404
    assert f"toy job {job_id} started" in client.get(f"/v1/toys/{job_id}/log").text
    listed = client.get("/v1/toys", params={"status": "succeeded"}).json()
    assert job_id in [item["id"] for item in listed["items"]]
    # The name is taken among toy outputs only; a finished job cancels to itself.
    taken = client.post("/v1/toys", json={"text": "again", "name": "greeting"})
    assert taken.status_code == 409 and "toy output folder" in taken.json()["error"]["message"]
    assert client.delete(f"/v1/toys/{job_id}").json()["status"] == "succeeded"
    # Kinds do not see each other's jobs.
    assert client.get(f"/v1/merges/{job_id}").status_code == 404
    assert client.get(f"/v1/trainings/{job_id}").status_code == 404
    assert job_id not in [item["id"] for item in client.get("/v1/merges").json()["items"]]
    assert 'tureen_toys{state="succeeded"}' in client.get("/metrics").text


def test_a_running_toy_job_is_cancelled_by_its_worker(client: httpx.Client, tmp_path: Path) -> None:
    hold = tmp_path / "never"
    job_id = client.post("/v1/toys", json={"text": "x", "hold": str(hold)}).json()["id"]
    wait_toy(client, job_id, ("running",))
    assert client.get(f"/v1/toys/{job_id}/files").status_code == 409
    assert client.delete(f"/v1/toys/{job_id}").status_code == 202
    assert wait_toy(client, job_id)["status"] == "cancelled"


def test_a_running_toy_job_pauses_and_resumes(
    client: httpx.Client, toy_server: LiveServer, tmp_path: Path
) -> None:
    hold = tmp_path / "release"
    job_id = client.post("/v1/toys", json={"text": "later", "hold": str(hold)}).json()["id"]
    wait_toy(client, job_id, ("running",))
    asked = client.post(f"/v1/toys/{job_id}/pause")
    assert asked.status_code == 202 and asked.json()["pause_requested"] is True
    paused = wait_toy(client, job_id, ("paused",))
    assert paused["worker_pid"] is None and paused["attempts"] == 1
    # Paused, it is not claimed again though a slot is free; it is not a merge either.
    time.sleep(0.5)
    assert client.get(f"/v1/toys/{job_id}").json()["status"] == "paused"
    assert client.post(f"/v1/merges/{job_id}/pause").status_code == 404
    assert client.post(f"/v1/toys/{job_id}/resume").json()["status"] == "queued"
    wait_toy(client, job_id, ("running",))
    hold.touch()
    done = wait_toy(client, job_id)
    assert done["status"] == "succeeded" and done["attempts"] == 2
    text = client.get(f"/v1/toys/{job_id}/files/result.txt").text
    assert text == "later"
    manager = toy_server.app.state.manager
    assert manager.get(job_id, kind="toy").pause_requested is False
