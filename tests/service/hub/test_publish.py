"""Publishing an output folder with the real huggingface_hub client, to the Hub stand-in."""

from __future__ import annotations

import json
import shutil
import sqlite3
import time
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from merge_kernels.checkpoints import open_checkpoint
from service.cli import main
from service.hub import Publisher, PublishError, output_files, publish_folder
from service.jobs.models import Job, JobPublish, JobStatus, OutputOptions, PublishOptions
from service.jobs.sqlite_store import SqliteJobStore, utcnow
from service.settings import ServiceSettings
from tests.hub_server.fake_hub import FakeHub
from tests.service.hub.conftest import OTHER_TOKEN, WRITE_TOKEN

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    found: dict[str, torch.Tensor] = {}
    for shard in sorted(folder.glob("*.safetensors")):
        found.update(load_file(shard))
    return found


def test_publish_creates_a_private_repository_in_one_commit(hub: FakeHub, merged: Path) -> None:
    commit = publish_folder(merged, PublishOptions(repo_id="alice/tiny-ties"), token=WRITE_TOKEN)
    repo = hub.repos["alice/tiny-ties"]
    assert repo.private  # private unless asked otherwise
    assert repo.branches["main"] == commit.commit_sha
    head = repo.commits[commit.commit_sha]
    assert head.parent is not None and repo.commits[head.parent].title == "initial"
    assert commit.commit_url == f"{hub.url}/alice/tiny-ties/commit/{commit.commit_sha}"
    assert commit.pr_url is None
    files = hub.files_at("alice/tiny-ties", "main")
    local = {p.relative_to(merged).as_posix() for p in output_files(merged)}
    assert {"README.md", "tureen_recipe.yaml", "config.json"} <= local
    assert set(files) == local | {".gitattributes"}
    for name in local:
        assert hub.file_bytes("alice/tiny-ties", "main", name) == (merged / name).read_bytes()
    assert files["model.safetensors"].lfs  # weights went through the LFS batch API
    assert any(r.path.endswith("/info/lfs/objects/batch") for r in hub.requests)
    # The card's metadata was validated by the Hub before the upload.
    assert any(r.path == "/api/validate-yaml" for r in hub.requests)


def test_publish_to_a_branch_as_a_pull_request(hub: FakeHub, merged: Path, tmp_path: Path) -> None:
    first = publish_folder(
        merged, PublishOptions(repo_id="alice/branchy", private=False), token=WRITE_TOKEN
    )
    assert not hub.repos["alice/branchy"].private
    again = publish_folder(merged, PublishOptions(repo_id="alice/branchy"), token=WRITE_TOKEN)
    assert again.commit_sha == first.commit_sha  # the same output: no empty commit
    changed = tmp_path / "changed"
    shutil.copytree(merged, changed)
    with (changed / "README.md").open("a") as card:
        card.write("\nEvaluated on a held-out set.\n")
    on_branch = publish_folder(
        changed,
        PublishOptions(repo_id="alice/branchy", revision="v2", commit_message="second"),
        token=WRITE_TOKEN,
    )
    repo = hub.repos["alice/branchy"]
    assert repo.branches["v2"] == on_branch.commit_sha != first.commit_sha
    assert repo.branches["main"] == first.commit_sha
    assert repo.commits[on_branch.commit_sha].title == "second"
    pr = publish_folder(
        changed, PublishOptions(repo_id="alice/branchy", create_pr=True), token=WRITE_TOKEN
    )
    assert pr.pr_url == f"{hub.url}/alice/branchy/discussions/1"
    assert repo.branches["refs/pr/1"] == pr.commit_sha
    assert repo.branches["main"] == first.commit_sha  # the pull request left main alone
    assert hub.file_bytes("alice/branchy", "refs/pr/1", "README.md").endswith(b"held-out set.\n")


@pytest.mark.parametrize(
    ("token", "repo_id", "reason"),
    [
        ("hf_not_a_token", "alice/refused", "unauthorized"),
        (OTHER_TOKEN, "alice/refused", "forbidden"),
        (None, "alice/refused", "unauthorized"),
    ],
)
def test_refusals_name_the_reason(
    hub: FakeHub, merged: Path, token: str | None, repo_id: str, reason: str
) -> None:
    with pytest.raises(PublishError) as info:
        publish_folder(merged, PublishOptions(repo_id=repo_id), token=token)
    assert info.value.details["reason"] == reason
    if token:
        assert token not in info.value.message
    assert "alice/refused" not in hub.repos


def test_private_publishing_to_a_public_repository_is_refused(hub: FakeHub, merged: Path) -> None:
    hub.create_repo("alice/public-one", private=False)
    with pytest.raises(PublishError, match="is public") as info:
        publish_folder(
            merged, PublishOptions(repo_id="alice/public-one", private=True), token=WRITE_TOKEN
        )
    assert info.value.details["reason"] == "visibility"
    assert len(hub.repos["alice/public-one"].commits) == 1


def test_a_card_the_hub_refuses_fails_before_uploading(
    hub: FakeHub, merged: Path, tmp_path: Path
) -> None:
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "model.safetensors").write_bytes((merged / "model.safetensors").read_bytes())
    (broken / "README.md").write_text("---\nbase_model:\n- /srv/models/local\n---\n# x\n")
    with pytest.raises(PublishError) as info:
        publish_folder(broken, PublishOptions(repo_id="alice/broken"), token=WRITE_TOKEN)
    assert info.value.details["reason"] == "invalid_model_card"
    assert not any(r.method == "PUT" for r in hub.requests)


def test_push_command_then_use_the_repository_as_a_merge_input(
    hub: FakeHub,
    merged: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("HF_TOKEN", WRITE_TOKEN)
    code = main(["push", str(merged), "alice/pushed", "--public", "--revision", "release"])
    assert code == 0
    captured = capsys.readouterr()
    result = json.loads(captured.out)
    assert WRITE_TOKEN not in captured.out + captured.err
    assert result["repo_id"] == "alice/pushed"
    assert hub.repos["alice/pushed"].branches["release"] == result["commit_sha"]
    assert not hub.repos["alice/pushed"].private
    # The published repository as an input: downloaded through the Hub, identical tensors.
    with open_checkpoint(f"alice/pushed@{result['commit_sha']}") as checkpoint:
        assert checkpoint.revision == result["commit_sha"]
        local = _tensors(merged)
        assert set(checkpoint.entries()) == set(local)
        for name, tensor in local.items():
            assert torch.equal(checkpoint.read(name), tensor), name
    card = yaml.safe_load((merged / "README.md").read_text().split("---")[1])
    assert card["library_name"] == "transformers"


def test_push_command_refusals_are_one_clear_line(
    hub: FakeHub, merged: Path, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    assert main(["push", str(merged), "not a repo id"]) == 2
    assert "repo_id" in capsys.readouterr().err
    assert main(["push", str(tmp_path / "missing"), "alice/x"]) == 2
    assert "no files to publish" in capsys.readouterr().err


def _job(store: SqliteJobStore, publish: JobPublish) -> Job:
    job = Job(
        id="j1",
        status=JobStatus.PUBLISHING,
        recipe={"merge_method": "ties"},
        output=OutputOptions(publish=publish.options),
        created_at=utcnow(),
        publish=publish,
    )
    return store.create(job)[0]


def test_a_request_token_lost_with_its_server_is_never_replaced(tmp_path: Path) -> None:
    store = SqliteJobStore(tmp_path / "jobs.sqlite3")
    settings = ServiceSettings(data_dir=tmp_path, hf_token="server-token-should-not-be-used")
    publisher = Publisher(store, settings, lambda job: tmp_path / "outputs" / job.id)
    earlier = Publisher.initial(PublishOptions(repo_id="alice/x"), "request-token")
    _job(store, earlier.model_copy(update={"requested_at": utcnow() - timedelta(hours=1)}))
    publisher.poll()  # a publisher started after the request: the token is gone
    job = store.get("j1")
    assert job is not None and job.publish is not None
    assert job.status is JobStatus.SUCCEEDED
    assert job.publish.state == "failed"
    assert job.publish.error is not None
    assert job.publish.error.details["reason"] == "token_lost"
    assert "X-HF-Token" in job.publish.error.message
    store.close()


def test_an_old_database_gains_the_publish_column(tmp_path: Path) -> None:
    path = tmp_path / "old.sqlite3"
    store = SqliteJobStore(path)
    store.create(
        Job(
            id="old",
            status=JobStatus.SUCCEEDED,
            recipe={"merge_method": "ties"},
            output=OutputOptions(),
            created_at=utcnow(),
        )
    )
    store.close()
    with sqlite3.connect(path) as db:  # the table as a version without publishing made it
        db.execute("ALTER TABLE jobs DROP COLUMN publish")
    reopened = SqliteJobStore(path)
    job = reopened.get("old")
    assert job is not None and job.publish is None
    updated = reopened.update(
        "old", publish=Publisher.initial(PublishOptions(repo_id="alice/x"), None)
    )
    assert updated.publish is not None and updated.publish.token_source == "server"
    reopened.close()


def test_a_publication_left_by_a_stopped_server_resumes_with_the_server_token(
    hub: FakeHub, merged: Path, tmp_path: Path
) -> None:
    store = SqliteJobStore(tmp_path / "jobs.sqlite3")
    settings = ServiceSettings(data_dir=tmp_path, hf_token=WRITE_TOKEN)
    publisher = Publisher(store, settings, lambda job: merged)
    left = Publisher.initial(PublishOptions(repo_id="alice/resumed"), None)
    _job(store, left.model_copy(update={"requested_at": utcnow() - timedelta(hours=1)}))
    publisher.start()
    try:
        deadline = time.monotonic() + 30
        while (job := store.get("j1")) is not None and job.status is JobStatus.PUBLISHING:
            assert time.monotonic() < deadline, job.publish
            time.sleep(0.05)
    finally:
        publisher.stop()
    assert job is not None and job.publish is not None
    assert job.status is JobStatus.SUCCEEDED
    assert job.publish.state == "published", job.publish
    assert job.publish.commit_sha == hub.repos["alice/resumed"].branches["main"]
    assert (
        hub.repos["alice/resumed"]
        .commits[job.publish.commit_sha]
        .title.startswith("Upload j1: a ties merge")
    )
    assert any(r.authorization == f"Bearer {WRITE_TOKEN}" for r in hub.requests)
    store.close()


def test_the_token_of_a_merge_that_failed_is_forgotten(tmp_path: Path) -> None:
    store = SqliteJobStore(tmp_path / "jobs.sqlite3")
    publisher = Publisher(store, ServiceSettings(data_dir=tmp_path), lambda job: tmp_path)
    _job(store, Publisher.initial(PublishOptions(repo_id="alice/x"), "request-token"))
    store.update("j1", status=JobStatus.FAILED)  # the merge failed: nothing to publish
    publisher.remember("j1", "request-token")
    assert "j1" in publisher._tokens
    publisher.poll()
    assert "j1" not in publisher._tokens
    publisher.stop()
    store.close()


def test_push_without_a_token_says_the_token_is_missing(
    hub: FakeHub,
    merged: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    assert main(["push", str(merged), "alice/no-token"]) == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1] == (
        "error: no Hugging Face token: set HF_TOKEN to a token with write access to alice, "
        "or log in with `hf auth login`"
    )
    assert "alice/no-token" not in hub.repos
    assert not any(r.method in ("POST", "PUT") for r in hub.requests)
