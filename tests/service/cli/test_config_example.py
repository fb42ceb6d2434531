"""The example config file lists every service setting with its default, and loads."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from service.cli import main
from service.config_example import example_config, setting_descriptions
from service.settings import ServiceSettings, load_settings

ROOT = Path(__file__).resolve().parents[3]
EXAMPLE = ROOT / "tureen.example.toml"


def _mentioned(text: str) -> set[str]:
    names = set()
    for line in text.splitlines():
        setting = line.removeprefix("# ").partition(" =")
        if setting[1] and setting[0].isidentifier():
            names.add(setting[0])
    return names


def test_every_setting_is_described() -> None:
    descriptions = setting_descriptions(ServiceSettings)
    undocumented = [
        name
        for name, info in ServiceSettings.model_fields.items()
        if not (info.description or descriptions.get(name))
    ]
    assert undocumented == [], "document these in ServiceSettings' Attributes section"


def test_the_example_lists_every_setting() -> None:
    assert _mentioned(example_config()) == set(ServiceSettings.model_fields)


def test_the_committed_example_is_current() -> None:
    assert EXAMPLE.read_text() == example_config(), (
        "regenerate it: tureen config example > tureen.example.toml"
    )


def test_the_example_loads_and_gives_the_defaults(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ServiceSettings.model_fields:
        monkeypatch.delenv(f"TUREEN_{name.upper()}", raising=False)
    monkeypatch.delenv("TUREEN_CONFIG", raising=False)
    monkeypatch.chdir(tmp_path)
    config = tmp_path / "tureen.toml"
    config.write_text(example_config())
    values = tomllib.loads(config.read_text())
    assert set(values) <= set(ServiceSettings.model_fields)
    assert load_settings(config_file=config) == ServiceSettings()


def test_the_command_prints_it(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["config", "example"]) == 0
    assert capsys.readouterr().out == example_config()
