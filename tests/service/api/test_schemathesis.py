"""Property-based checks of the served API against the committed ``openapi.yaml``.

Schemathesis generates requests from the document (bounded and deterministic) and sends
them to a real server with every check on: every response must be a documented status with
a body and headers that conform to the document, none may be a server error, invalid data
must be refused and valid data accepted, and a method a path lacks must get a 405 whose
``Allow`` lists the methods it has.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.config import SchemathesisConfig

from tests.service.api.conftest import TOKEN, LiveServer, ties_recipe, wait_for

OPENAPI = Path(__file__).resolve().parents[3] / "openapi.yaml"

# Bounded and deterministic: a fixed seed, at most 25 generated requests per operation, and
# no coverage phase for POST bodies (a union over every method is too large for it). Every
# check runs. Bodies that name checkpoints or data files are refused with 422 when those do
# not exist, which no schema can state: only there may schema-valid data get a 422.
_NO_COVERAGE = {"coverage": {"enabled": False}}
CONFIG = SchemathesisConfig.from_dict(
    {
        "seed": 20240601,
        "generation": {"max-examples": 25},
        "operations": [
            {
                "include-path-regex": "^/v1/(merges|plans|trainings)$",
                "include-method": "POST",
                "phases": _NO_COVERAGE,
                "checks": {
                    "positive_data_acceptance": {
                        "expected-statuses": ["2xx", "401", "404", "409", "422"]
                    },
                    # A generated invalid body may also be larger than the body limit.
                    "negative_data_rejection": {
                        "expected-statuses": [
                            *("400", "401", "403", "404", "405", "406", "409", "413"),
                            *("415", "422", "428", "429", "5xx"),
                        ]
                    },
                },
            },
            {"include-method": "POST", "phases": _NO_COVERAGE},
        ],
    }
)

schema = schemathesis.openapi.from_path(OPENAPI, config=CONFIG)


@pytest.fixture(scope="module")
def served(server: LiveServer, models_root: Path) -> LiveServer:
    """The shared server with one finished job, so listings return real records."""
    with server.client() as http:
        job = http.post("/v1/merges", json=ties_recipe(models_root)).json()
        assert wait_for(http, job["id"])["status"] == "succeeded"
    return server


@schema.parametrize()
@settings(
    max_examples=25,
    derandomize=True,
    deadline=None,
    suppress_health_check=list(HealthCheck),
)
def test_api_conforms_to_openapi(case: schemathesis.Case[Any], served: LiveServer) -> None:
    case.call_and_validate(
        base_url=served.url,
        headers={"Authorization": f"Bearer {TOKEN}"},
        timeout=30,
    )


def test_refusals_conform_too(served: LiveServer) -> None:
    with httpx.Client(base_url=served.url) as anonymous:
        response = anonymous.get("/v1/merges")
    assert response.status_code == 401
    assert set(response.json()) == {"error"}
