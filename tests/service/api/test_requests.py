"""Requests the service must refuse (auth, validation, path escapes, size) and plans."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from tests.service.api.conftest import TOKEN, LiveServer, ties_recipe


def _total(client: httpx.Client) -> int:
    total: int = client.get("/v1/merges").json()["total"]
    return total


def test_auth_is_required_except_for_health(server: LiveServer, models_root: Path) -> None:
    with server.client(token=None) as anonymous, server.client(token="wrong") as wrong:
        for http in (anonymous, wrong):
            for method, path in (
                ("GET", "/v1/merges"),
                ("POST", "/v1/plans"),
                ("GET", "/v1/methods"),
                ("GET", "/metrics"),
                ("GET", "/v1/merges/x/files/model.safetensors"),
            ):
                response = http.request(method, path, json=ties_recipe(models_root))
                assert response.status_code == 401, (method, path)
                assert response.headers["www-authenticate"] == "Bearer"
                assert response.json()["error"]["code"] == "unauthorized"
                assert TOKEN not in response.text
        assert anonymous.get("/healthz").json() == {"status": "ok"}
        ready = anonymous.get("/readyz")
        assert ready.status_code == 200
        assert ready.json() == {
            "status": "ready",
            "checks": {"database": True, "data_dir": True, "dispatcher": True},
        }
        basic = anonymous.get("/v1/merges", headers={"Authorization": f"Basic {TOKEN}"})
        assert basic.status_code == 401


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"parameters": {"densty": 0.2}}, "parameters.densty"),
        ({"merge_method": "average"}, "merge_method"),
        ({"base_model": None}, "base_model"),
        ({"seed": -1}, "seed"),
        ({"models": []}, "models"),
        ({"output": {"name": "../up"}}, "output.name"),
        ({"output": {"shard_size": 10}}, "output.shard_size"),
        ({"colour": "blue"}, "colour"),
    ],
)
def test_invalid_recipe_names_the_field_and_creates_no_job(
    client: httpx.Client, models_root: Path, change: dict[str, Any], field: str
) -> None:
    before = _total(client)
    for path in ("/v1/merges", "/v1/plans"):
        response = client.post(path, json=ties_recipe(models_root) | change)
        assert response.status_code == 422, response.text
        error = response.json()["error"]
        assert error["code"] == "invalid_recipe"
        assert error["details"]["field"] == field
        assert field in error["message"]
    assert _total(client) == before


def test_per_model_parameter_error_names_the_model(client: httpx.Client, models_root: Path) -> None:
    body = ties_recipe(models_root)
    body["models"][1]["parameters"]["density"] = 3.0
    response = client.post("/v1/merges", json=body)
    assert response.status_code == 422
    assert response.json()["error"]["details"]["field"].startswith("models[1].parameters.density")


def test_malformed_structure_is_422_not_500(client: httpx.Client, models_root: Path) -> None:
    body = ties_recipe(models_root)
    del body["models"]
    body["slices"] = [{"sources": [["not", "a", "mapping"]]}]
    response = client.post("/v1/plans", json=body)
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["code"] == "invalid_recipe"
    assert error["details"]["field"].startswith("slices[0]")


def test_undecodable_bodies(client: httpx.Client) -> None:
    before = _total(client)
    cases = [
        (b"{not json", "application/json", 422, "invalid_body"),
        (b"[1, 2]", "application/json", 422, "invalid_recipe"),
        (b"a: &x [1]\nb: *x\n", "application/yaml", 422, "invalid_body"),
        (b"merge_method: ties", "text/plain", 415, "unsupported_media_type"),
        (b"[" * 100_00 + b"]" * 100_00, "application/json", 422, "invalid_body"),
    ]
    for body, media_type, status, code in cases:
        response = client.post("/v1/merges", content=body, headers={"Content-Type": media_type})
        assert response.status_code == status, (body[:20], response.text)
        assert response.json()["error"]["code"] == code
    assert _total(client) == before


def test_body_over_the_limit_is_413_even_when_chunked(server: LiveServer) -> None:
    limit = server.settings.max_body_bytes
    payload = b'{"merge_method": "ties", "pad": "' + b"x" * limit + b'"}'

    def chunks() -> Iterator[bytes]:
        for start in range(0, len(payload), 4096):
            yield payload[start : start + 4096]

    with server.client() as http:
        declared = http.post(
            "/v1/merges", content=payload, headers={"Content-Type": "application/json"}
        )
        assert declared.status_code == 413
        assert declared.json()["error"]["code"] == "payload_too_large"
        chunked = http.post(
            "/v1/plans", content=chunks(), headers={"Content-Type": "application/json"}
        )
        assert chunked.status_code == 413
        assert chunked.json()["error"]["code"] == "payload_too_large"


def test_checkpoint_paths_outside_the_allowed_roots_are_refused(
    server: LiveServer, client: httpx.Client, models_root: Path, outside_root: Path
) -> None:
    secret = outside_root / "secret"
    link = models_root / "escape-link"
    if not link.exists():
        link.symlink_to(secret, target_is_directory=True)
    dotdot = os.path.relpath(secret, server.settings.inputs_dir)
    assert dotdot.startswith("../")
    through_root = f"{models_root}/../{secret.parent.name}/secret"
    before = _total(client)
    for reference in (str(secret), dotdot, through_root, str(link), {"path": str(secret)}):
        body = ties_recipe(models_root)
        body["models"][0]["model"] = reference
        for path in ("/v1/plans", "/v1/merges"):
            response = client.post(path, json=body)
            assert response.status_code == 422, (reference, response.text)
            error = response.json()["error"]
            assert error["code"] == "path_not_allowed", error
            assert "--allow-root" in error["message"]
            assert "secret" not in str(error["details"].get("resolved", ""))
    assert _total(client) == before


def test_missing_and_incompatible_checkpoints(client: httpx.Client, models_root: Path) -> None:
    missing = ties_recipe(models_root)
    missing["models"][0]["model"] = str(models_root / "no-such-model")
    response = client.post("/v1/merges", json=missing)
    assert response.status_code == 422
    assert response.json()["error"]["code"] == "not_found"

    odd = ties_recipe(models_root)
    odd["models"][1]["model"] = str(models_root / "odd")
    for path in ("/v1/merges", "/v1/plans"):
        response = client.post(path, json=odd)
        assert response.status_code == 422
        error = response.json()["error"]
        assert error["code"] == "incompatible_checkpoints"
        assert error["details"]["problems"]
        assert any("shape" in problem for problem in error["details"]["problems"])


def test_plan_reads_headers_only(
    server: LiveServer, client: httpx.Client, models_root: Path
) -> None:
    body = ties_recipe(models_root, models=3) | {"output": {"shard_size": 1_000_000}}
    response = client.post("/v1/plans", json=body)
    assert response.status_code == 200, response.text
    report = response.json()
    assert report["ok"] is True and report["problems"] == []
    assert report["merge_method"] == "ties"
    assert [item["role"] for item in report["inputs"]] == ["base", "model", "model", "model"]
    assert report["output"]["tensors"] > 0 and report["output"]["bytes"] > 0
    assert report["peak_memory_bytes_estimate"] > 0

    relative = {  # relative references are relative to data_dir/inputs
        "merge_method": "linear",
        "models": [{"model": "tiny-a"}, {"model": "tiny-b"}],
    }
    missing = client.post("/v1/plans", json=relative)
    assert missing.status_code == 422
    assert missing.json()["error"]["code"] == "not_found"
    inputs = server.settings.inputs_dir
    for name, target in (("tiny-a", "ft1"), ("tiny-b", "ft2")):
        if not (inputs / name).exists():
            (inputs / name).symlink_to(models_root / target, target_is_directory=True)
    found = client.post("/v1/plans", json=relative)
    assert found.status_code == 200, found.text
    assert [item["reference"] for item in found.json()["inputs"]] == ["tiny-a", "tiny-b"]

    as_yaml = client.post(
        "/v1/plans",
        content=yaml.safe_dump(ties_recipe(models_root)),
        headers={"Content-Type": "application/yaml"},
    )
    assert as_yaml.status_code == 200 and as_yaml.json()["ok"] is True
