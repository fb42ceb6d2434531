"""``POST /v1/merges`` on a data dir whose disk is full: 507 ``insufficient_space``."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from service.app import create_app
from tests.service.api.conftest import TOKEN, make_settings, ties_recipe
from tests.service.tmpfs import small_tmpfs


@pytest.fixture
def full_disk(tmp_path: Path) -> Iterator[Path]:
    """A 4 MiB tmpfs, nearly filled (needs the right to mount; skipped without it)."""
    with small_tmpfs(tmp_path / "disk", "4m") as folder:
        yield folder


def test_submitting_on_a_full_disk_is_507_with_the_numbers(
    full_disk: Path, models_root: Path
) -> None:
    settings = make_settings(full_disk / "data", [models_root])
    with TestClient(create_app(settings)) as http:
        (full_disk / "filler").write_bytes(b"\0" * (3 << 20))
        response = http.post(
            "/v1/merges",
            json=ties_recipe(models_root),
            headers={"Authorization": f"Bearer {TOKEN}"},
        )
    assert response.status_code == 507, response.text
    error = response.json()["error"]
    assert error["code"] == "insufficient_space"
    assert error["details"]["free_bytes"] < 1 << 20
    assert error["details"]["needed_bytes"] > 0
    assert "free some space" in error["message"]
