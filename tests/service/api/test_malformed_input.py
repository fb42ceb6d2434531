"""Malformed text, huge page offsets and empty checkpoints get clear 4xx answers, not 500s."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.service.api.conftest import LiveServer, ties_recipe, wait_for

NUL = "\x00"
SURROGATE = "\ud800"  # sent as the JSON escape \ud800: valid JSON, not encodable as UTF-8


def _post_json(client: httpx.Client, path: str, document: Any) -> httpx.Response:
    # json.dumps escapes the surrogate as \ud800, which every JSON parser accepts.
    body = json.dumps(document)
    return client.post(path, content=body, headers={"content-type": "application/json"})


def _with_text(models_root: Path, where: str, text: str) -> dict[str, Any]:
    recipe = ties_recipe(models_root)
    if where == "base_model":
        recipe["base_model"] += text
    else:
        recipe["models"][1]["model"] = f"ft{text}1"
    return recipe


@pytest.mark.parametrize("path", ["/v1/plans", "/v1/merges"])
@pytest.mark.parametrize(
    ("where", "field"), [("base_model", "base_model"), ("model", "models[1].model")]
)
@pytest.mark.parametrize("text", [NUL, SURROGATE], ids=["nul", "surrogate"])
def test_unusable_text_in_a_reference_is_named(
    client: httpx.Client, models_root: Path, path: str, where: str, field: str, text: str
) -> None:
    response = _post_json(client, path, _with_text(models_root, where, text))
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["code"] == "invalid_text"
    assert error["details"]["field"] == field
    assert field in error["message"]


def test_unusable_text_in_yaml_and_in_keys(client: httpx.Client, models_root: Path) -> None:
    base = str(models_root / "base")
    yaml_body = f'merge_method: linear\nmodels:\n  - model: "{base}\\0"\n  - model: {base}\n'
    response = client.post(
        "/v1/plans", content=yaml_body, headers={"content-type": "application/yaml"}
    )
    assert response.status_code == 422, response.text
    assert response.json()["error"]["details"]["field"] == "models[0].model"
    recipe = ties_recipe(models_root) | {f"bad{NUL}key": 1}
    response = _post_json(client, "/v1/merges", recipe)
    assert response.status_code == 422, response.text
    assert response.json()["error"]["code"] == "invalid_text"


@pytest.mark.parametrize("text", [NUL, SURROGATE], ids=["nul", "surrogate"])
def test_unusable_text_in_a_training_body(client: httpx.Client, text: str) -> None:
    body = {"kind": "lora", "base_model": f"tiny{text}", "data": {"train": "t.jsonl"}}
    response = _post_json(client, "/v1/trainings", body)
    assert response.status_code == 422, response.text
    assert response.json()["error"]["details"]["field"] == "base_model"


@pytest.mark.parametrize("path", ["/v1/merges", "/v1/trainings"])
@pytest.mark.parametrize("offset", [2**63, 2**70])
def test_offsets_past_sqlite_integers_are_refused(
    client: httpx.Client, path: str, offset: int
) -> None:
    response = client.get(path, params={"offset": offset})
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["code"] == "invalid_request"
    assert "offset" in error["details"]["field"]
    largest = client.get(path, params={"offset": 2**63 - 1})
    assert largest.status_code == 200, largest.text
    assert largest.json()["items"] == []


def test_odd_file_names_in_a_download_path_are_not_found(
    client: httpx.Client, models_root: Path
) -> None:
    job = client.post("/v1/merges", json=ties_recipe(models_root)).json()
    assert wait_for(client, job["id"])["status"] == "succeeded"
    for name in ("model%00.safetensors", "model%ED%A0%80.safetensors", "%00", "a%C0%AF"):
        response = client.get(f"/v1/merges/{job['id']}/files/{name}")
        assert response.status_code == 404, (name, response.text)
        assert response.json()["error"]["code"] == "not_found"


def test_a_checkpoint_without_tensors_is_a_plan_problem(
    tmp_path_factory: pytest.TempPathFactory, server: LiveServer, client: httpx.Client
) -> None:
    empty = server.settings.inputs_dir / "empty-header"
    empty.mkdir(parents=True)
    (empty / "model.safetensors").write_bytes(len(b"{}").to_bytes(8, "little") + b"{}")
    recipe = {"merge_method": "linear", "models": [{"model": "empty-header"}] * 2}
    for path in ("/v1/plans", "/v1/merges"):
        response = client.post(path, json=recipe)
        assert response.status_code == 422, response.text
        error = response.json()["error"]
        assert error["code"] == "incompatible_checkpoints"
        assert "has no tensors" in error["message"]
