"""The API's document needs the token; the optional docs page loads nothing from other hosts."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from starlette.testclient import TestClient

from service.app import create_app
from tests.service.api.conftest import TOKEN, make_settings

# Any absolute URL, protocol-relative ones included: the page must need no other host.
_EXTERNAL = re.compile(r"""(https?:)?//[\w.-]+""", re.IGNORECASE)
_LINKS = re.compile(r"""(?:src|href|action)\s*=\s*["']([^"']*)["']""", re.IGNORECASE)


@pytest.fixture
def make_client(tmp_path: Path, models_root: Path) -> Iterator[Any]:
    clients: list[TestClient] = []

    def make(**overrides: Any) -> TestClient:
        settings = make_settings(tmp_path / f"data{len(clients)}", [models_root], **overrides)
        client = TestClient(create_app(settings), raise_server_exceptions=False)
        clients.append(client.__enter__())
        return client

    yield make
    for client in clients:
        client.__exit__(None, None, None)


def test_the_document_needs_the_token_when_tokens_are_set(make_client: Any) -> None:
    http = make_client()
    refused = http.get("/openapi.json")
    assert refused.status_code == 401
    assert refused.json()["error"]["code"] == "unauthorized"
    assert refused.headers["www-authenticate"] == "Bearer"
    assert http.get("/openapi.json", headers={"Authorization": "Bearer wrong"}).status_code == 401
    allowed = http.get("/openapi.json", headers={"Authorization": f"Bearer {TOKEN}"})
    assert allowed.status_code == 200
    assert "/v1/merges" in allowed.json()["paths"]


def test_the_document_is_open_without_tokens(make_client: Any) -> None:
    http = make_client(api_tokens=[])
    assert http.get("/openapi.json").status_code == 200


@pytest.mark.parametrize("tokens", [[TOKEN], []], ids=["auth", "open"])
def test_no_docs_pages_by_default(make_client: Any, tokens: list[str]) -> None:
    http = make_client(api_tokens=tokens)
    headers = {"Authorization": f"Bearer {TOKEN}"}
    for path in ("/docs", "/redoc", "/docs/oauth2-redirect", "/docs/docs.js"):
        response = http.get(path, headers=headers)
        assert response.status_code == 404, path
        assert response.json()["error"]["code"] == "not_found"


def test_the_docs_page_loads_nothing_from_other_hosts(make_client: Any) -> None:
    http = make_client(docs=True)
    page = http.get("/docs")
    assert page.status_code == 200
    assert page.headers["content-type"].startswith("text/html")
    assert "default-src 'none'" in page.headers["content-security-policy"]
    links = _LINKS.findall(page.text)
    assert links, "the page should load its script and style from the service"
    for link in links:
        assert link.startswith("/") and not link.startswith("//"), link
        asset = http.get(link)
        assert asset.status_code == 200, link
        assert not _EXTERNAL.search(asset.text), (link, _EXTERNAL.search(asset.text))
    assert not _EXTERNAL.search(page.text)
    assert http.get("/redoc").status_code == 404
    # The page holds no API data; the document it reads still needs the token.
    assert http.get("/openapi.json").status_code == 401
