"""Non-finite numbers over HTTP: refused with 422 naming the field; overflow fails the job."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from tests.service.api.conftest import LiveServer, ties_recipe, wait_for

_PLACEHOLDER = "__VALUE__"


def _with_placeholder(root: Path, where: str) -> tuple[dict[str, Any], str]:
    """A TIES recipe with the placeholder at ``where``, and the field the error must name."""
    body = ties_recipe(root)
    if where == "weight":
        body["models"][0]["parameters"]["weight"] = _PLACEHOLDER
        return body, "models[0].parameters.weight"
    if where == "lambda":
        body["parameters"]["lambda"] = _PLACEHOLDER
        return body, "parameters.lambda"
    if where == "density_gradient":
        body["models"][1]["parameters"]["density"] = [0.5, _PLACEHOLDER]
        return body, "models[1].parameters.density"
    body["parameters"]["weight"] = [{"filter": "mlp", "value": _PLACEHOLDER}, {"value": 1.0}]
    return body, "parameters.weight"


WHERE = ("weight", "lambda", "density_gradient", "weight_filtered")


@pytest.mark.parametrize("route", ["/v1/merges", "/v1/plans"])
@pytest.mark.parametrize("spelling", ["NaN", "Infinity", "-Infinity", "1e999"])
@pytest.mark.parametrize("where", WHERE)
def test_json_non_finite_parameters_are_422_naming_the_field(
    client: httpx.Client, models_root: Path, route: str, spelling: str, where: str
) -> None:
    body, field = _with_placeholder(models_root, where)
    text = json.dumps(body).replace(f'"{_PLACEHOLDER}"', spelling)
    response = client.post(route, content=text, headers={"Content-Type": "application/json"})
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["code"] == "invalid_recipe"
    assert error["details"]["field"] == field
    assert "finite number" in error["message"]
    assert "valid boolean" not in response.text


@pytest.mark.parametrize("spelling", [".nan", ".inf", "-.inf"])
@pytest.mark.parametrize("where", WHERE)
def test_yaml_non_finite_parameters_are_422_naming_the_field(
    client: httpx.Client, models_root: Path, spelling: str, where: str
) -> None:
    body, field = _with_placeholder(models_root, where)
    text = yaml.safe_dump(body).replace(_PLACEHOLDER, spelling)
    response = client.post("/v1/merges", content=text, headers={"Content-Type": "application/yaml"})
    assert response.status_code == 422, response.text
    assert response.json()["error"]["details"]["field"] == field


@pytest.mark.parametrize(("value", "words"), [(True, "not the boolean"), ([], "empty list")])
def test_a_boolean_or_empty_weight_is_422(
    client: httpx.Client, models_root: Path, value: Any, words: str
) -> None:
    body = ties_recipe(models_root)
    body["models"][0]["parameters"]["weight"] = value
    response = client.post("/v1/merges", json=body)
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["details"]["field"] == "models[0].parameters.weight"
    assert words in error["message"]


def test_an_overflowing_merge_fails_naming_the_tensor(
    server: LiveServer, client: httpx.Client, models_root: Path
) -> None:
    body = ties_recipe(models_root) | {"output": {"name": "overflowing"}}
    body["parameters"]["lambda"] = 1e308
    response = client.post("/v1/merges", json=body)
    assert response.status_code == 202, response.text
    job = wait_for(client, response.json()["id"])
    assert job["status"] == "failed"
    assert job["error"]["code"] == "non_finite_output"
    assert job["error"]["details"]["tensor"] == "model.embed_tokens.weight"
    assert "model.embed_tokens.weight" in job["error"]["message"]
    assert job["output_dir"] is None
    assert not (server.settings.outputs_dir / "overflowing").exists()


def test_allow_non_finite_lets_the_merge_succeed(client: httpx.Client, models_root: Path) -> None:
    body = ties_recipe(models_root) | {"allow_non_finite": True}
    body["parameters"]["lambda"] = 1e308
    response = client.post("/v1/merges", json=body)
    assert response.status_code == 202, response.text
    assert wait_for(client, response.json()["id"])["status"] == "succeeded"
