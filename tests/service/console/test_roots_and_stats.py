"""``/v1/roots`` (the console's checkpoint picker) and ``/v1/merges/{id}/tensor-stats``."""

from __future__ import annotations

import math
from datetime import UTC, datetime
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from merge_kernels.checkpoints.opening import open_checkpoint
from service.api.routes import tensor_stats
from service.api.routes.tensor_stats import compute_stats, layer_label
from service.jobs.models import Job, JobStatus, OutputOptions
from service.jobs.sqlite_store import SqliteJobStore
from tests.service.api.conftest import LiveServer, ties_recipe, wait_for


def test_roots_list_the_inputs_folder_then_the_allowed_roots(
    server: LiveServer, models_root: Path
) -> None:
    with server.client() as client:
        roots = client.get("/v1/roots").json()
    assert [root["name"] for root in roots] == ["inputs", str(models_root)]
    assert roots[0]["prefix"] == ""
    assert roots[1]["prefix"] == f"{models_root}/"


def test_entries_mark_checkpoints_and_name_them_as_recipes_do(
    server: LiveServer, models_root: Path
) -> None:
    with server.client() as client:
        top = client.get("/v1/roots/1/entries").json()
        nested = client.get("/v1/roots/1/entries", params={"path": "larger"}).json()
        empty_inputs = client.get("/v1/roots/0/entries")
    by_name = {entry["name"]: entry for entry in top["entries"]}
    assert by_name["base"]["checkpoint"] is True
    assert by_name["base"]["reference"] == f"{models_root}/base"
    assert by_name["larger"] == {
        "name": "larger",
        "kind": "folder",
        "bytes": None,
        "checkpoint": False,
        "reference": f"{models_root}/larger",
    }
    assert {entry["reference"] for entry in nested["entries"]} == {
        f"{models_root}/larger/{name}" for name in ("base", "ft1", "ft2")
    }
    assert empty_inputs.status_code == 200


@pytest.fixture
def links_out(models_root: Path, tmp_path: Path) -> Path:
    """A folder outside the root, and links to it from inside the root."""
    outside = tmp_path / "secret"
    outside.mkdir()
    (outside / "config.json").write_text("{}")
    (models_root / "escape").symlink_to(outside, target_is_directory=True)
    (models_root / "base" / "peek").symlink_to(outside / "config.json")
    yield outside
    (models_root / "escape").unlink()
    (models_root / "base" / "peek").unlink()


@pytest.mark.parametrize(
    "path",
    [
        "..",
        "../..",
        "base/../..",
        "/etc",
        "escape",
        "escape/..",
        "base/peek",
        "nowhere",
        "0" * 3000,
    ],
)
def test_paths_out_of_the_root_are_refused_alike(
    server: LiveServer, links_out: Path, path: str
) -> None:
    with server.client() as client:
        response = client.get("/v1/roots/1/entries", params={"path": path})
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "not_found"
    assert str(links_out) not in response.text


def test_links_out_of_the_root_are_not_listed(server: LiveServer, links_out: Path) -> None:
    with server.client() as client:
        top = client.get("/v1/roots/1/entries").json()
        base = client.get("/v1/roots/1/entries", params={"path": "base"}).json()
    assert "escape" not in {entry["name"] for entry in top["entries"]}
    assert "peek" not in {entry["name"] for entry in base["entries"]}
    assert "config.json" in {entry["name"] for entry in base["entries"]}


def test_roots_need_the_token_and_an_existing_root(server: LiveServer) -> None:
    with server.client(token=None) as anonymous, server.client() as client:
        assert anonymous.get("/v1/roots").status_code == 401
        assert anonymous.get("/v1/roots/1/entries").status_code == 401
        assert client.get("/v1/roots/7/entries").status_code == 404


def test_the_console_page_and_assets_are_served_with_a_strict_policy(server: LiveServer) -> None:
    with server.client(token=None) as anonymous:
        page = anonymous.get("/")
        script = anonymous.get("/console/static/console.js")
        missing = anonymous.get("/console/static/..%2Fapp.py")
        unchanged = anonymous.get(
            "/console/static/console.js", headers={"If-None-Match": script.headers["etag"]}
        )
    assert page.status_code == 200
    assert "script-src 'self'" in page.headers["content-security-policy"]
    assert "unsafe-inline" not in page.headers["content-security-policy"]
    assert script.headers["content-type"].startswith("text/javascript")
    assert missing.status_code == 404
    assert unchanged.status_code == 304


def _expected(output: Path, base: Path) -> dict[str, float]:
    merged = load_file(str(output / "model.safetensors"))
    reference = load_file(str(base / "model.safetensors"))
    return {
        name: float(
            torch.linalg.norm(tensor - reference[name]) / torch.linalg.norm(reference[name])
        )
        for name, tensor in merged.items()
    }


def test_tensor_stats_are_relative_l2_per_tensor_and_layer(
    server: LiveServer, models_root: Path
) -> None:
    with server.client() as client:
        job = client.post("/v1/merges", json=ties_recipe(models_root)).json()
        assert wait_for(client, job["id"])["status"] == "succeeded"
        answer = client.get(
            f"/v1/merges/{job['id']}/tensor-stats", params={"base": str(models_root / "base")}
        )
        again = client.get(
            f"/v1/merges/{job['id']}/tensor-stats", params={"base": str(models_root / "base")}
        )
    assert answer.status_code == 200
    stats = answer.json()
    expected = _expected(server.settings.outputs_dir / job["id"], models_root / "base")
    got = {item["name"]: item["relative_l2"] for item in stats["tensors"]}
    assert got.keys() == expected.keys()
    for name, value in expected.items():
        assert got[name] == pytest.approx(value, rel=1e-5), name
    assert [layer["label"] for layer in stats["layers"]] == ["0", "1", "other"]
    assert all(layer["relative_l2"] > 0 for layer in stats["layers"])
    assert again.json() == stats
    cached = list((server.settings.data_dir / "cache" / "tensor-stats").glob("*.json"))
    assert cached  # the second answer came from here


def test_tensor_stats_refuse_bases_outside_the_roots_and_unfinished_jobs(
    server: LiveServer, models_root: Path, tmp_path: Path
) -> None:
    store = SqliteJobStore(server.settings.database_path)
    try:
        failed, _ = store.create(
            Job(
                id="stats-failed",
                status=JobStatus.FAILED,
                recipe={"merge_method": "ties"},
                output=OutputOptions(),
                created_at=datetime.now(UTC),
            )
        )
    finally:
        store.close()
    with server.client() as client:
        job = client.post("/v1/merges", json=ties_recipe(models_root)).json()
        wait_for(client, job["id"])
        unfinished = client.get(f"/v1/merges/{failed.id}/tensor-stats", params={"base": "x/y"})
        outside = client.get(f"/v1/merges/{job['id']}/tensor-stats", params={"base": str(tmp_path)})
        missing = client.get("/v1/merges/nope/tensor-stats", params={"base": "x/y"})
    assert unfinished.status_code == 409
    assert unfinished.json()["error"]["code"] == "job_not_succeeded"
    assert outside.status_code == 422
    assert outside.json()["error"]["code"] in ("not_found", "path_not_allowed")
    assert missing.status_code == 404


def test_tensor_stats_read_large_tensors_in_blocks_to_the_same_result(
    models_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with open_checkpoint(models_root / "base") as base:
        whole_block = compute_stats("j", models_root / "ft1", base, "base")
        monkeypatch.setattr(tensor_stats, "BLOCK_BYTES", 256)  # a few rows per block
        blocked = compute_stats("j", models_root / "ft1", base, "base")
    for whole, parts in zip(whole_block.tensors, blocked.tensors, strict=True):
        assert whole.relative_l2 is not None and parts.relative_l2 is not None
        assert math.isclose(whole.relative_l2, parts.relative_l2, rel_tol=1e-9)


def test_layer_labels() -> None:
    assert layer_label("model.layers.12.mlp.up_proj.weight") == "12"
    assert layer_label("transformer.h.3.attn.c_attn.weight") == "3"
    assert layer_label("model.embed_tokens.weight") == "other"
    assert layer_label("lm_head.weight") == "other"
