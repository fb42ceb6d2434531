"""Commands whose optional dependencies are missing name the extra to install, in one line."""

from __future__ import annotations

import sys
import tomllib
from pathlib import Path

import pytest

from service.cli import main
from service.extras import EXTRA_OF_MODULE

ROOT = Path(__file__).resolve().parents[3]


def _uninstalled(monkeypatch: pytest.MonkeyPatch, module: str) -> None:
    """Make ``module`` unimportable in this process, as if it were not installed."""
    for name in [name for name in sys.modules if name.partition(".")[0] == module]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, module, None)


def test_the_demo_names_the_training_extra(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _uninstalled(monkeypatch, "trl")
    folder = tmp_path / "demo"
    assert main(["demo", "--folder", str(folder)]) == 2
    err = capsys.readouterr().err
    assert err.strip() == (
        "error: `tureen demo` needs the optional 'training' dependencies (trl is not "
        "installed); install them with: pip install -e '.[training]'"
    )
    assert not folder.exists()  # refused before any work


def test_train_names_the_training_extra(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _uninstalled(monkeypatch, "transformers")
    assert main(["train", "base", str(tmp_path / "base")]) == 2
    err = capsys.readouterr().err
    assert "pip install -e '.[training]'" in err and "transformers is not installed" in err


def test_every_extra_named_exists_in_pyproject() -> None:
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"][
        "optional-dependencies"
    ]
    for module, extra in EXTRA_OF_MODULE.items():
        packages = " ".join(extras[extra]).lower().replace("-", "_")
        assert module in packages, (module, extra)


def test_httpx_is_a_core_dependency() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert any(dependency.startswith("httpx") for dependency in project["dependencies"])
