"""Greedy soups as service jobs, and a client-driven greedy soup over the plain merge API."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from merge_kernels.candidates import Candidate, is_better
from service.evaluation.config import build_evaluator
from tests.service.api.conftest import LiveServer, make_settings, wait_for
from tests.service.evaluation.conftest import HARMFUL, HELPFUL, SoupWorld


@pytest.fixture(scope="module")
def soup_server(
    tmp_path_factory: pytest.TempPathFactory, soup_world: SoupWorld
) -> Iterator[LiveServer]:
    live = LiveServer(make_settings(tmp_path_factory.mktemp("data"), [soup_world.root])).start()
    yield live
    live.stop()


@pytest.fixture
def client(soup_server: LiveServer) -> Iterator[httpx.Client]:
    with soup_server.client() as http:
        yield http


def test_a_greedy_soup_job_reports_every_step(client: httpx.Client, soup_world: SoupWorld) -> None:
    response = client.post("/v1/merges", json=soup_world.recipe())
    assert response.status_code == 202, response.text
    job = wait_for(client, response.json()["id"], timeout=120)
    assert job["status"] == "succeeded", job["error"]
    report = job["evaluation"]
    assert len(report["ingredients"]) == len(HELPFUL) + 1
    assert len(report["steps"]) == len(HELPFUL)
    assert all(Path(r).name != HARMFUL for r in report["kept"])
    assert report["final_score"] <= report["best_single"]["score"]
    files = {f["name"] for f in client.get(f"/v1/merges/{job['id']}/files").json()["files"]}
    assert {"model.safetensors", "evaluation.json", "README.md"} <= files
    card = client.get(f"/v1/merges/{job['id']}/files/README.md").text
    assert "## Evaluation" in card


def test_a_scored_linear_merge_job_compares_against_its_inputs(
    client: httpx.Client, soup_world: SoupWorld
) -> None:
    document = soup_world.recipe()
    document["merge_method"] = "linear"
    job = wait_for(client, client.post("/v1/merges", json=document).json()["id"], timeout=120)
    assert job["status"] == "succeeded", job["error"]
    report = job["evaluation"]
    assert len(report["inputs"]) == len(HELPFUL) + 1
    assert report["merge"]["score"] is not None


@pytest.mark.parametrize(
    ("evaluator", "field"),
    [
        (None, "evaluator"),
        ({"type": "held_out", "data": "/etc/hostname"}, "evaluator.data"),
        ({"type": "http", "url": "http://192.0.2.1/score"}, "evaluator.url"),
        ({"type": "held_out", "data": "x.jsonl", "metric": "bleu"}, "evaluator"),
    ],
)
def test_bad_evaluators_are_refused_before_queueing(
    client: httpx.Client, soup_world: SoupWorld, evaluator: Any, field: str
) -> None:
    document = soup_world.recipe(evaluator=evaluator)
    if evaluator is None:
        del document["evaluator"]
    response = client.post("/v1/merges", json=document)
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["code"] == "invalid_recipe"
    assert error["details"]["field"].startswith(field)


def test_a_client_driven_greedy_soup_over_plain_merges(
    client: httpx.Client, soup_world: SoupWorld
) -> None:
    """What a script does when it runs the loop itself: one small linear merge per candidate.

    The README shows the same loop; the candidate is read from the job's output folder.
    """
    evaluator = build_evaluator({"type": "held_out", "data": str(soup_world.held_out)})

    def score(models: list[str]) -> float:
        body = {"merge_method": "linear", "models": [{"model": m} for m in models]}
        job = wait_for(client, client.post("/v1/merges", json=body).json()["id"])
        assert job["status"] == "succeeded", job["error"]
        candidate = Candidate("client", 0, models, folder=Path(job["output_dir"]))
        return evaluator.evaluate(candidate).value

    ingredients = [str(soup_world.root / n) for n in (*HELPFUL, HARMFUL)]
    alone = {m: score([m]) for m in ingredients}
    ranked = sorted(ingredients, key=alone.__getitem__)  # a loss: lower is better
    soup, best = [ranked[0]], alone[ranked[0]]
    for model in ranked[1:]:
        candidate = score([*soup, model])
        if is_better(candidate, best, higher_is_better=False, allow_equal=False):
            soup, best = [*soup, model], candidate
    assert str(soup_world.root / HARMFUL) not in soup
    assert best < min(alone.values())
    # The service's own greedy soup keeps the same ingredients.
    job = wait_for(
        client, client.post("/v1/merges", json=soup_world.recipe()).json()["id"], timeout=120
    )
    assert job["evaluation"]["kept"] == soup
    assert json.dumps(job["evaluation"])


def test_small_jobs_reuse_a_warm_worker(client: httpx.Client, soup_world: SoupWorld) -> None:
    body = {"merge_method": "linear", "models": [{"model": str(soup_world.root / "ing0")}]}
    pids = []
    for _ in range(3):
        job = wait_for(client, client.post("/v1/merges", json=body).json()["id"])
        assert job["status"] == "succeeded", job["error"]
        pids.append(job["worker_pid"])
    assert len(set(pids)) < 3  # a worker that ran a small job took another


def test_without_reuse_every_job_has_a_fresh_worker(tmp_path: Path, soup_world: SoupWorld) -> None:
    settings = make_settings(tmp_path / "data", [soup_world.root], standby_worker=False)
    live = LiveServer(settings).start()
    try:
        body = {"merge_method": "linear", "models": [{"model": str(soup_world.root / "ing0")}]}
        with live.client() as http:
            jobs = [wait_for(http, http.post("/v1/merges", json=body).json()["id"]) for _ in "ab"]
        assert [j["status"] for j in jobs] == ["succeeded", "succeeded"]
        assert jobs[0]["worker_pid"] != jobs[1]["worker_pid"]
    finally:
        live.stop()


def test_an_http_evaluator_on_another_machine_downloads_candidates(
    tmp_path: Path, soup_world: SoupWorld
) -> None:
    """The evaluator never reads the candidate's path: it downloads it from tureen's API."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    import torch
    from safetensors.torch import load, load_file

    from tests.service.api.conftest import TOKEN

    target = load_file(soup_world.target / "model.safetensors")
    downloads: list[str] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            candidate = body["candidate"]
            assert "model.safetensors" in candidate["files"]
            url = candidate["url"] + "model.safetensors"
            downloads.append(url)
            got = httpx.get(url, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=30)
            got.raise_for_status()
            tensors = load(got.content)
            distance = sum(float((tensors[n].float() - t).pow(2).sum()) for n, t in target.items())
            data = json.dumps({"score": -(distance**0.5)}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args: object) -> None:
            pass

    evaluator = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=evaluator.serve_forever, daemon=True).start()
    live = LiveServer(make_settings(tmp_path / "data", [soup_world.root]))
    live.settings.public_url = live.url  # known once the server's socket is bound
    live.start()
    try:
        with live.client() as http:
            document = soup_world.recipe(
                evaluator={"type": "http", "url": f"http://127.0.0.1:{evaluator.server_port}/"}
            )
            job = wait_for(http, http.post("/v1/merges", json=document).json()["id"], timeout=120)
            assert job["status"] == "succeeded", job["error"]
            assert len(downloads) == job["evaluation"]["evaluations"]
            prefix = f"{live.url}/v1/merges/{job['id']}/candidates/"
            assert all(u.startswith(prefix) for u in downloads)
            assert downloads[-1] == prefix + "final/files/model.safetensors"
            assert all(Path(r).name != HARMFUL for r in job["evaluation"]["kept"])
            # Candidates are gone once scored, and never served to anyone without the token.
            with live.client(token=None) as anonymous:
                assert anonymous.get(downloads[0]).status_code == 401
            gone = http.get(downloads[0])
            assert gone.status_code == 409 and gone.json()["error"]["code"] == "job_not_running"
    finally:
        live.stop()
        evaluator.shutdown()
    assert torch.is_tensor(next(iter(target.values())))
