"""``tureen plan`` and ``tureen merge`` refuse non-finite parameters and overflowing merges."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from merge_kernels.synthetic import LlamaShape, write_checkpoint

SHAPE = LlamaShape(hidden_size=32, intermediate_size=64, num_hidden_layers=2, vocab_size=96)


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("models")
    write_checkpoint(root / "base", SHAPE, seed=0)
    write_checkpoint(root / "ft1", SHAPE, seed=1, base_seed=0, delta_scale=0.05)
    return root


def _tureen(*args: str) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "service.cli", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)


def _write(models: Path, weight: str, folder: Path) -> Path:
    document = {
        "merge_method": "task_arithmetic",
        "base_model": str(models / "base"),
        "models": [{"model": str(models / "ft1"), "parameters": {"weight": "__W__"}}],
    }
    path = folder / "recipe.yaml"
    path.write_text(yaml.safe_dump(document).replace("__W__", weight).replace("'", ""))
    return path


@pytest.mark.parametrize("command", ["plan", "merge"])
@pytest.mark.parametrize("weight", [".nan", ".inf", "[0.5, -.inf]"])
def test_non_finite_weights_exit_2_naming_the_field(
    models: Path, tmp_path: Path, command: str, weight: str
) -> None:
    recipe = _write(models, weight, tmp_path)
    args = [command, str(recipe)] + ([str(tmp_path / "out")] if command == "merge" else [])
    result = _tureen(*args)
    assert result.returncode == 2, result.stderr
    assert "models[0].parameters.weight: must be a finite number" in result.stderr
    assert not (tmp_path / "out").exists()


def test_an_overflowing_merge_exits_2_naming_the_tensor(models: Path, tmp_path: Path) -> None:
    result = _tureen(
        "merge", str(_write(models, "1e300", tmp_path)), str(tmp_path / "out"), "--quiet"
    )
    assert result.returncode == 2, result.stderr
    assert "'model.embed_tokens.weight'" in result.stderr
    assert "allow_non_finite" in result.stderr
    assert not (tmp_path / "out").exists()
