"""Recipe warnings over HTTP (plans and jobs), and multi-document bodies refused clearly."""

from __future__ import annotations

from pathlib import Path

import httpx
import yaml

from tests.service.api.conftest import ties_recipe, wait_for


def _lenient(root: Path) -> dict[str, object]:
    body = ties_recipe(root)
    body["models"] = [{"model": str(root / "ft1")}, *body["models"][1:]]  # type: ignore[index]
    body["parameters"] = {"lambda": 1.0, "epsilon": 0.1}
    return body


def test_plans_and_jobs_carry_the_recipes_warnings(client: httpx.Client, models_root: Path) -> None:
    body = _lenient(models_root)
    plan = client.post("/v1/plans", json=body)
    assert plan.status_code == 200, plan.text
    fields = sorted(w.partition(":")[0] for w in plan.json()["warnings"])
    assert fields == ["parameters.density", "parameters.epsilon"]
    submitted = client.post("/v1/merges", json=body)
    assert submitted.status_code == 202, submitted.text
    assert submitted.json()["warnings"] == plan.json()["warnings"]
    job = wait_for(client, submitted.json()["id"])
    assert job["status"] == "succeeded" and job["warnings"] == plan.json()["warnings"]
    strict = client.post("/v1/plans", json={**body, "strict": True})
    assert strict.status_code == 422
    assert strict.json()["error"]["details"]["field"] == "parameters.epsilon"


def test_multi_document_bodies_are_planned_and_recipes_points_to_merges(
    client: httpx.Client, models_root: Path
) -> None:
    first = {**ties_recipe(models_root), "name": "one"}
    text = yaml.safe_dump_all([first, ties_recipe(models_root)])
    response = client.post("/v1/plans", content=text, headers={"Content-Type": "application/yaml"})
    assert response.status_code == 200, response.text
    assert [stage["name"] for stage in response.json()["stages"]] == ["one", None]
    response = client.post("/v1/merges", json={"recipes": [first]})
    assert response.status_code == 422
    assert response.json()["error"]["details"]["field"] == "recipes"
    assert "`merges`" in response.json()["error"]["message"]
    # one document with a name is an ordinary recipe
    single = client.post("/v1/plans", json=first)
    assert single.status_code == 200, single.text
