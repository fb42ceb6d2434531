"""Service settings: sources and their precedence, list parsing, derived paths, secrecy."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from pydantic import ValidationError

from service.settings import ConfigFileError, ServiceSettings, load_settings


@pytest.fixture(autouse=True)
def _clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ServiceSettings.model_fields:
        monkeypatch.delenv(f"TUREEN_{name.upper()}", raising=False)
    monkeypatch.delenv("TUREEN_CONFIG", raising=False)


def test_defaults_and_derived_paths(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    settings = load_settings()
    assert settings.host == "127.0.0.1"
    assert settings.port == 8000
    assert settings.workers == 1
    assert settings.api_tokens == []
    assert settings.memory_budget_bytes is None
    assert settings.data_dir == tmp_path.resolve() / "tureen-data"  # made absolute
    assert settings.database_path == settings.data_dir / "tureen.sqlite3"
    assert settings.outputs_dir == settings.data_dir / "outputs"
    assert settings.input_roots == (settings.data_dir / "inputs",)


def test_environment_lists_are_comma_separated(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TUREEN_API_TOKENS", "alpha, beta,,")
    monkeypatch.setenv("TUREEN_ALLOW_ROOTS", "/models,/scratch/../srv")
    monkeypatch.setenv("TUREEN_WORKERS", "3")
    monkeypatch.setenv("TUREEN_MEMORY_BUDGET_BYTES", "1000000")
    settings = load_settings()
    assert settings.api_tokens == ["alpha", "beta"]
    assert settings.allow_roots == [Path("/models"), Path("/srv")]
    assert settings.workers == 3
    assert settings.memory_budget_bytes == 1_000_000
    monkeypatch.setenv("TUREEN_API_TOKENS", '["a,b", "c"]')  # JSON for tokens with commas
    assert load_settings().api_tokens == ["a,b", "c"]


@pytest.mark.parametrize("suffix", [".toml", ".yaml", ".json"])
def test_config_file_then_environment_then_arguments(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, suffix: str
) -> None:
    values = {"port": 9000, "workers": 2, "api_tokens": ["from-file"], "device": "cuda"}
    path = tmp_path / f"tureen{suffix}"
    if suffix == ".toml":
        path.write_text('port = 9000\nworkers = 2\napi_tokens = ["from-file"]\ndevice = "cuda"\n')
    elif suffix == ".yaml":
        path.write_text("port: 9000\nworkers: 2\napi_tokens: [from-file]\ndevice: cuda\n")
    else:
        path.write_text(json.dumps(values))
    monkeypatch.setenv("TUREEN_WORKERS", "4")
    settings = load_settings(path, device="cpu")
    assert settings.port == 9000  # file
    assert settings.api_tokens == ["from-file"]  # file
    assert settings.workers == 4  # environment beats file
    assert settings.device == "cpu"  # arguments beat everything
    monkeypatch.setenv("TUREEN_CONFIG", str(path))
    assert load_settings().port == 9000


def test_bad_config_files_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigFileError, match="cannot read"):
        load_settings(tmp_path / "missing.toml")
    broken = tmp_path / "broken.toml"
    broken.write_text("port = = 1")
    with pytest.raises(ConfigFileError, match="not valid toml"):
        load_settings(broken)
    listed = tmp_path / "list.json"
    listed.write_text("[1, 2]")
    with pytest.raises(ConfigFileError, match="mapping"):
        load_settings(listed)
    unknown = tmp_path / "unknown.json"
    unknown.write_text('{"wokers": 2}')
    with pytest.raises(ValidationError, match="wokers"):
        load_settings(unknown)


def test_tokens_never_shown(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TUREEN_API_TOKENS", "s3cret-token")
    settings = load_settings()
    assert "s3cret-token" not in repr(settings)
    assert "s3cret-token" not in str(settings)
    assert "s3cret-token" not in json.dumps(settings.redacted())
    assert settings.redacted()["api_tokens"] == ["***"]
    with pytest.raises(ValidationError) as caught:
        load_settings(api_tokens=[{"s3cret-token": 1}])
    assert "s3cret-token" not in str(caught.value)


def test_invalid_values_are_refused() -> None:
    with pytest.raises(ValidationError, match="workers"):
        load_settings(workers=0)
    with pytest.raises(ValidationError, match="port"):
        load_settings(port=70000)
