"""Publishing through the REST API: a real server, worker processes, SQLite, the Hub stand-in."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from tests.hub_server.fake_hub import FakeHub
from tests.service.api.conftest import LiveServer, make_settings, read_events, wait_for
from tests.service.hub.conftest import WRITE_TOKEN, ties_document

pytestmark = [
    pytest.mark.filterwarnings("ignore::UserWarning"),
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
]

FINAL = ("succeeded", "failed", "cancelled")


@pytest.fixture
def server(
    hub: FakeHub, source_models: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> Iterator[LiveServer]:
    caplog.set_level(logging.DEBUG)  # every logger, huggingface_hub's and httpx's included
    live = LiveServer(make_settings(tmp_path / "data", [source_models])).start()
    yield live
    live.stop()


@pytest.fixture
def token_server(
    hub: FakeHub, source_models: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[LiveServer]:
    """A server whose own Hub token is HF_TOKEN (set before its workers start)."""
    monkeypatch.setenv("HF_TOKEN", WRITE_TOKEN)
    live = LiveServer(make_settings(tmp_path / "data", [source_models])).start()
    yield live
    live.stop()


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    found: dict[str, torch.Tensor] = {}
    for shard in sorted(folder.glob("*.safetensors")):
        found.update(load_file(shard))
    return found


def _everything_stored(data_dir: Path) -> bytes:
    """The job database, its WAL and every other file under the data dir but the outputs."""
    return b"".join(
        path.read_bytes()
        for path in sorted(data_dir.rglob("*"))
        if path.is_file() and "outputs" not in path.relative_to(data_dir).parts
    )


def test_publish_with_the_merge_then_merge_the_published_repository(
    server: LiveServer,
    hub: FakeHub,
    source_models: Path,
    caplog: pytest.LogCaptureFixture,
    capfd: pytest.CaptureFixture[str],
) -> None:
    body: dict[str, Any] = {
        **ties_document(source_models),
        "output": {"name": "souped", "publish": {"repo_id": "alice/souped", "private": True}},
    }
    seen: list[str] = []
    with server.client() as client:
        response = client.post("/v1/merges", json=body, headers={"X-HF-Token": WRITE_TOKEN})
        assert response.status_code == 202, response.text
        seen.append(response.text)
        job_id = response.json()["id"]
        assert response.json()["publish"]["state"] == "pending"
        assert response.json()["publish"]["token_source"] == "request"
        events = read_events(client, job_id)
        seen.append(repr(events))
        statuses = [data["status"] for name, data in events if name in ("progress", "status")]
        assert "publishing" in statuses
        assert events[-1][0] == "status"
        job = events[-1][1]
        assert job["status"] == "succeeded"
        publish = job["publish"]
        assert publish["state"] == "published", publish
        repo = hub.repos["alice/souped"]
        assert repo.private
        assert publish["commit_sha"] == repo.branches["main"]
        assert publish["commit_url"] == f"{hub.url}/alice/souped/commit/{publish['commit_sha']}"
        assert publish["attempts"] == 1
        assert repo.commits[publish["commit_sha"]].title.startswith("Upload souped: a ties merge")
        # The Hub saw the request's token; the worker process never did.
        assert any(r.authorization == f"Bearer {WRITE_TOKEN}" for r in hub.requests)
        for path in ("/v1/merges", f"/v1/merges/{job_id}", f"/v1/merges/{job_id}/files"):
            seen.append(client.get(path).text)
        output = server.settings.outputs_dir / "souped"
        for name in ("README.md", "tureen_recipe.yaml"):
            assert hub.file_bytes("alice/souped", "main", name) == (output / name).read_bytes()

        # The published repository, pinned to its commit, as the input of another merge.
        sha = publish["commit_sha"]
        again = client.post(
            "/v1/merges",
            json={
                "merge_method": "linear",
                "models": [{"model": f"alice/souped@{sha}"}, {"model": "alice/souped@main"}],
                "output": {"name": "from-hub"},
            },
            headers={"X-HF-Token": WRITE_TOKEN},
        )
        # The publish token is for publishing; reading a private input needs HF_TOKEN.
        assert again.status_code == 422
        assert again.json()["error"]["details"]["reason"] == "repo_not_found"
    stored = _everything_stored(server.settings.data_dir)
    captured = capfd.readouterr()
    logs = caplog.text + captured.out + captured.err
    assert logs  # something was logged, and not the token
    for text in (stored, "".join(seen).encode(), logs.encode()):
        assert WRITE_TOKEN.encode() not in text


def test_round_trip_through_the_hub_gives_identical_tensors(
    token_server: LiveServer, hub: FakeHub, source_models: Path
) -> None:
    server = token_server  # its own token publishes and downloads the private repository
    body: dict[str, Any] = {
        **ties_document(source_models),
        "output": {"name": "first", "publish": {"repo_id": "alice/round", "revision": "v1"}},
    }
    with server.client() as client:
        job_id = client.post("/v1/merges", json=body).json()["id"]
        job = wait_for(client, job_id, FINAL)
        assert job["publish"]["state"] == "published", job
        assert job["publish"]["token_source"] == "server"
        sha = job["publish"]["commit_sha"]
        assert hub.repos["alice/round"].branches["v1"] == sha
        second = client.post(
            "/v1/merges",
            json={
                "merge_method": "linear",
                "models": [
                    {"model": "alice/round@v1", "parameters": {"weight": 1.0}},
                    {"model": f"alice/round@{sha}", "parameters": {"weight": 1.0}},
                ],
                "output": {"name": "second"},
            },
        )
        assert second.status_code == 202, second.text
        done = wait_for(client, second.json()["id"], FINAL)
        assert done["status"] == "succeeded", done["error"]
    first = _tensors(server.settings.outputs_dir / "first")
    roundtrip = _tensors(server.settings.outputs_dir / "second")
    assert first.keys() == roundtrip.keys()
    for name, tensor in first.items():
        assert torch.equal(roundtrip[name], tensor.to(roundtrip[name].dtype)), name
    card = (server.settings.outputs_dir / "second" / "README.md").read_text()
    assert f"| model | `alice/round@v1` | {sha} |" in card
    assert card.split("---")[1].count("alice/round") == 1  # base_model lists it once


def test_upload_failure_keeps_the_output_and_the_publish_endpoint_retries(
    server: LiveServer, hub: FakeHub, source_models: Path
) -> None:
    hub.fail_commits = 1
    body: dict[str, Any] = {
        **ties_document(source_models),
        "output": {"publish": {"repo_id": "alice/flaky"}},
    }
    with server.client() as client:
        job_id = client.post("/v1/merges", json=body, headers={"X-HF-Token": WRITE_TOKEN}).json()[
            "id"
        ]
        job = wait_for(client, job_id, FINAL)
        assert job["status"] == "succeeded"
        publish = job["publish"]
        assert publish["state"] == "failed"
        assert publish["error"]["code"] == "publish_failed"
        assert publish["error"]["details"]["reason"] == "hub_error"
        assert publish["error"]["details"]["status"] == 500
        assert "retry" in publish["error"]["message"]
        flaky = hub.repos["alice/flaky"]
        assert flaky.commits[flaky.branches["main"]].title == "initial"  # nothing committed
        files = client.get(f"/v1/merges/{job_id}/files").json()["files"]
        assert "model.safetensors" in {f["name"] for f in files}

        # Retry without a token: the server has none, so the Hub refuses, and says so.
        retry = client.post(f"/v1/merges/{job_id}/publish")
        assert retry.status_code == 202, retry.text
        assert retry.json()["status"] == "publishing"
        assert retry.json()["publish"]["token_source"] == "server"
        job = wait_for(client, job_id, FINAL)
        assert job["publish"]["error"]["details"]["reason"] == "unauthorized"

        # Retry with the token, as a pull request: published, main untouched.
        retry = client.post(
            f"/v1/merges/{job_id}/publish",
            json={"repo_id": "alice/flaky", "create_pr": True},
            headers={"X-HF-Token": WRITE_TOKEN},
        )
        assert retry.status_code == 202, retry.text
        job = wait_for(client, job_id, FINAL)
        publish = job["publish"]
        assert publish["state"] == "published", publish
        assert publish["attempts"] == 3
        assert publish["pr_url"] == f"{hub.url}/alice/flaky/discussions/1"
        assert hub.repos["alice/flaky"].branches["refs/pr/1"] == publish["commit_sha"]
        assert publish["error"] is None

        # Another merge's output elsewhere, public, after the fact.
        later = client.post(
            f"/v1/merges/{job_id}/publish",
            json={"repo_id": "alice/public-copy", "private": False},
            headers={"X-HF-Token": WRITE_TOKEN},
        )
        assert later.status_code == 202
        assert wait_for(client, job_id, FINAL)["publish"]["state"] == "published"
        assert not hub.repos["alice/public-copy"].private


def test_publish_endpoint_refusals(server: LiveServer, hub: FakeHub) -> None:
    with server.client() as client:
        assert client.post("/v1/merges/nope/publish").status_code == 404
        bad = client.post("/v1/merges/nope/publish", json={"repo_id": "no-namespace"})
        assert bad.status_code == 422
        assert bad.json()["error"]["details"]["field"].endswith("repo_id")
        bad = client.post(
            "/v1/merges",
            json={
                "merge_method": "linear",
                "models": [{"model": "x/y"}],
                "output": {"publish": {"repo_id": "alice/x", "token": "hf_in_body"}},
            },
        )
        assert bad.status_code == 422
        assert "output.publish.token" in bad.json()["error"]["message"]
    with server.client(token=None) as anonymous:
        assert anonymous.post("/v1/merges/nope/publish").status_code == 401


def test_publishing_a_job_that_has_not_succeeded_is_a_conflict(
    server: LiveServer, hub: FakeHub, source_models: Path
) -> None:
    with server.client() as client:
        response = client.post(
            "/v1/merges", json={**ties_document(source_models), "output": {"name": "early"}}
        )
        job_id = response.json()["id"]
        # A worker process needs seconds to start: the merge is queued or running still.
        refused = client.post(f"/v1/merges/{job_id}/publish", json={"repo_id": "alice/early"})
        assert refused.status_code == 409
        assert refused.json()["error"]["code"] == "conflict"
        assert refused.json()["error"]["details"]["status"] in ("queued", "running")
        assert wait_for(client, job_id, FINAL)["publish"] is None
        assert "alice/early" not in hub.repos
