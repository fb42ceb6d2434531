"""Bodies the document allows, the server accepts; bodies it refuses, the server refuses too."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import jsonschema_rs
import pytest
import yaml

from tests.service.api.conftest import ties_recipe

OPENAPI = Path(__file__).resolve().parents[3] / "openapi.yaml"


@pytest.fixture(scope="module")
def document() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load(OPENAPI.read_text(encoding="utf-8"))
    return loaded


def _allows(document: dict[str, Any], schema: dict[str, Any], value: object) -> bool:
    root = {**schema, "components": document["components"]}
    return bool(jsonschema_rs.Draft202012Validator(root).is_valid(value))


def _body_schema(document: dict[str, Any], path: str) -> dict[str, Any]:
    content = document["paths"][path]["post"]["requestBody"]["content"]
    schema: dict[str, Any] = content["application/json"]["schema"]
    return schema


@pytest.mark.parametrize(
    "recipe",
    [
        {"merge_method": "dare_linear"},
        {"merge_method": "dare_linear", "models": None},
        {"merge_method": "linear", "models": []},
        {"merge_method": "ties", "models": [{"model": "ft1"}]},  # no base model
        {"merge_method": "ties", "base_model": None, "models": [{"model": "ft1"}]},
    ],
)
def test_recipes_the_server_refuses_are_outside_the_document(
    document: dict[str, Any], client: httpx.Client, recipe: dict[str, Any]
) -> None:
    assert not _allows(document, _body_schema(document, "/v1/merges"), recipe)
    assert client.post("/v1/plans", json=recipe).status_code == 422


def test_complete_recipes_are_inside_the_document(
    document: dict[str, Any], client: httpx.Client, models_root: Path
) -> None:
    recipe = ties_recipe(models_root)
    assert _allows(document, _body_schema(document, "/v1/merges"), recipe)
    assert client.post("/v1/plans", json=recipe).status_code == 200
    sources = [{"model": m["model"], "layer_range": [0, 2]} for m in recipe["models"]]
    mergekit_form = {
        "merge_method": "ties",
        "slices": [{"base_model": recipe["base_model"], "sources": sources}],
        "parameters": {"density": 0.5},
    }
    assert _allows(document, _body_schema(document, "/v1/merges"), mergekit_form)
    assert client.post("/v1/plans", json=mergekit_form).status_code == 200, "slices"


@pytest.mark.parametrize(
    ("repo_id", "valid"),
    [("0", False), ("name-only", False), ("a--b/c", False), ("org/m.git", False), ("o/m", True)],
)
def test_publish_repo_ids_agree(
    document: dict[str, Any], client: httpx.Client, repo_id: str, valid: bool
) -> None:
    schema = {"$ref": "#/components/schemas/PublishOptions"}
    assert _allows(document, schema, {"repo_id": repo_id}) is valid
    response = client.post("/v1/merges/no-such-job/publish", json={"repo_id": repo_id})
    # A valid body gets as far as looking the job up.
    assert response.status_code == (404 if valid else 422), response.text


@pytest.mark.parametrize(("name", "valid"), [("", False), ("-x", False), ("run-1", True)])
def test_training_output_names_agree(
    document: dict[str, Any], client: httpx.Client, name: str, valid: bool
) -> None:
    body: dict[str, Any] = {"kind": "lora", "base_model": "no-such-base"}
    body |= {"data": {"train": "t.jsonl"}, "output": {"name": name}}
    assert _allows(document, _body_schema(document, "/v1/trainings"), body) is valid
    error = client.post("/v1/trainings", json=body).json()["error"]
    # A valid name gets as far as the (missing) base model.
    assert error["details"]["field"] == ("base_model" if valid else "output.name")


@pytest.mark.parametrize(
    ("path", "methods"),
    [
        ("/v1/merges", "GET, POST"),
        ("/v1/merges/some-id", "DELETE, GET"),
        ("/v1/trainings/some-id", "DELETE, GET"),
        ("/v1/plans", "POST"),
    ],
)
def test_a_method_not_allowed_lists_every_allowed_one(
    client: httpx.Client, path: str, methods: str
) -> None:
    response = client.options(path)
    assert response.status_code == 405
    assert response.headers["allow"] == methods
    assert response.json()["error"]["code"] == "method_not_allowed"
