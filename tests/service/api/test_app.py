"""The app in-process (ASGI, no socket): methods, OpenAPI, error shape, readiness."""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import anyio
import pytest
from starlette.testclient import TestClient

from merge_kernels.registry import methods
from service.api.events import job_events
from service.api.files import RangeNotSatisfiableError, parse_range
from service.app import create_app
from service.auth import token_accepted
from service.jobs.manager import JobManager
from service.jobs.models import Job, JobStatus, OutputOptions
from service.openapi_export import openapi_yaml
from tests.service.api.conftest import make_settings, ties_recipe

OPENAPI = Path(__file__).resolve().parents[3] / "openapi.yaml"


@pytest.fixture
def app_client(tmp_path: Path, models_root: Path) -> Iterator[TestClient]:
    """The app without auth, its lifespan (real SQLite, real manager) running."""
    app = create_app(make_settings(tmp_path / "data", [models_root], api_tokens=[]))
    with TestClient(app, raise_server_exceptions=False) as http:
        yield http


def test_methods_list_every_registered_method_with_schemas(app_client: TestClient) -> None:
    response = app_client.get("/v1/methods")
    assert response.status_code == 200
    listed = {item["name"]: item for item in response.json()}
    assert set(listed) == {spec.name for spec in methods()}
    ties = listed["ties"]
    assert ties["needs_base"] is True and ties["paper"] and ties["description"]
    assert "lambda" in ties["parameters"]["properties"]
    assert {"weight", "density"} <= set(ties["model_parameters"]["properties"])
    assert ties["references"]["mergekit"]["divisor"] == "weight_sum"
    assert listed["slerp"]["parameters"]["required"] == ["t"]
    assert listed["linear"]["needs_base"] is False


def test_open_without_tokens(app_client: TestClient) -> None:
    assert app_client.get("/v1/merges").json()["total"] == 0
    assert app_client.get("/metrics").status_code == 200


def test_unexpected_errors_are_500_without_details(
    app_client: TestClient, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def broken(self: JobManager, **_: object) -> None:
        raise RuntimeError("internal secret /srv/data")

    monkeypatch.setattr(JobManager, "list", broken)
    response = app_client.get("/v1/merges")
    assert response.status_code == 500
    assert response.json()["error"]["code"] == "internal_error"
    assert "secret" not in response.text
    assert "internal secret" in caplog.text


def test_memory_budget_and_output_name_conflicts(tmp_path: Path, models_root: Path) -> None:
    tight = make_settings(tmp_path / "tight", [models_root], api_tokens=[], memory_budget_bytes=1)
    with TestClient(create_app(tight)) as http:
        response = http.post("/v1/merges", json=ties_recipe(models_root))
        assert response.status_code == 422
        error = response.json()["error"]
        assert error["code"] == "over_memory_budget"
        assert error["details"]["budget_bytes"] == 1
        assert http.get("/v1/merges").json()["total"] == 0
    roomy = make_settings(tmp_path / "roomy", [models_root], api_tokens=[])
    roomy.outputs_dir.mkdir(parents=True)
    (roomy.outputs_dir / "taken").mkdir()
    with TestClient(create_app(roomy)) as http:
        body = ties_recipe(models_root) | {"output": {"name": "taken"}}
        response = http.post("/v1/merges", json=body)
        assert response.status_code == 409
        assert response.json()["error"]["code"] == "output_exists"


def test_not_ready_before_start(tmp_path: Path) -> None:
    app = create_app(make_settings(tmp_path / "data", []))
    http = TestClient(app)  # no lifespan: no manager
    response = http.get("/readyz")
    assert response.status_code == 503
    assert response.json()["checks"]["dispatcher"] is False
    assert http.get("/healthz").status_code == 200


def test_unknown_route_and_method_use_the_error_shape(app_client: TestClient) -> None:
    missing = app_client.get("/v1/nothing")
    assert missing.status_code == 404
    assert missing.json()["error"]["code"] == "not_found"
    wrong = app_client.put("/v1/methods")
    assert wrong.status_code == 405
    assert wrong.json()["error"]["code"] == "method_not_allowed"


def test_openapi_yaml_is_up_to_date() -> None:
    assert OPENAPI.read_text(encoding="utf-8") == openapi_yaml(), (
        "openapi.yaml is stale: run `python -m service.openapi_export > openapi.yaml`"
    )


def test_openapi_documents_each_methods_parameters(app_client: TestClient) -> None:
    document = app_client.get("/openapi.json").json()
    schemas = document["components"]["schemas"]
    request = schemas["MergeRequest"]
    assert request["discriminator"]["propertyName"] == "merge_method"
    assert len(request["oneOf"]) == len(list(methods()))
    ties = schemas["TiesParameters"]["properties"]
    assert {"lambda", "trim_ties", "density", "weight"} <= set(ties)
    assert "t" in schemas["SlerpParameters"]["properties"]
    assert set(schemas["TiesModelParameters"]["properties"]) == {"weight", "density"}
    body = document["paths"]["/v1/merges"]["post"]["requestBody"]["content"]
    assert set(body) == {"application/json", "application/yaml"}
    assert "HTTPValidationError" not in schemas


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        ("bytes=0-9", (0, 9)),
        ("bytes=5-", (5, 99)),
        ("bytes=-10", (90, 99)),
        ("bytes=-1000", (0, 99)),
        ("bytes=90-1000", (90, 99)),
        ("bytes=9-3", None),
        ("bytes=0-1,5-6", None),
        ("items=0-1", None),
        ("bytes=x-1", None),
        (None, None),
    ],
)
def test_parse_range(header: str | None, expected: tuple[int, int] | None) -> None:
    parsed = parse_range(header, 100)
    assert (None if parsed is None else (parsed.start, parsed.end)) == expected


@pytest.mark.parametrize("header", ["bytes=100-", "bytes=-0", "bytes=200-300"])
def test_unsatisfiable_ranges(header: str) -> None:
    with pytest.raises(RangeNotSatisfiableError):
        parse_range(header, 100)


class _ConnectedRequest:
    async def is_disconnected(self) -> bool:
        return False


def test_events_send_progress_heartbeats_and_a_final_status() -> None:
    created = datetime.now(UTC)
    running = Job(
        id="j", status=JobStatus.RUNNING, recipe={}, output=OutputOptions(), created_at=created
    )
    states = [running] * 8 + [running.model_copy(update={"version": 1})] * 8
    states.append(running.model_copy(update={"status": JobStatus.SUCCEEDED, "version": 2}))

    def get_job(job_id: str) -> Job:
        return states.pop(0) if len(states) > 1 else states[0]

    async def collect() -> list[str]:
        stream = job_events(
            get_job,
            "j",
            _ConnectedRequest(),  # type: ignore[arg-type]
            poll_seconds=0.005,
            heartbeat_seconds=0.02,
        )
        return [message async for message in stream]

    messages = anyio.run(collect)
    kinds = [m.split("\n", 1)[0] for m in messages]
    assert kinds[0] == "event: progress" and kinds[-1] == "event: status"
    assert kinds.count("event: progress") == 2
    assert ": keepalive" in kinds
    final = json.loads(messages[-1].split("data: ", 1)[1])
    assert final["status"] == "succeeded"


def test_token_comparison() -> None:
    assert token_accepted("b", ["a", "b"])
    assert not token_accepted("c", ["a", "b"])
    assert not token_accepted("", ["a"])
    assert not token_accepted("a", [])
