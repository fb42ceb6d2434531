"""``tureen merge``: mistakes in the command line are refused before any work, in one line."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from service.cli import main


@pytest.fixture(scope="module")
def example(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("example")
    assert main(["example", str(folder), "--hidden", "32", "--layers", "1"]) == 0
    return folder / "recipe.yaml"


def _leftovers(folder: Path) -> list[str]:
    return sorted(path.name for path in folder.iterdir() if path.name.startswith("."))


def test_an_existing_output_folder_is_refused_before_merging(
    example: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("earlier work")
    assert main(["merge", str(example), str(out), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "already exists" in err and "--overwrite" in err and "Traceback" not in err
    assert [path.name for path in out.iterdir()] == ["keep.txt"]
    assert _leftovers(tmp_path) == []  # no staging folder: nothing was merged


def test_overwrite_replaces_the_folder_with_the_finished_merge(
    example: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("earlier work")
    assert main(["merge", str(example), str(out), "--quiet", "--overwrite"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert "model.safetensors" in summary["files"]
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").is_file()
    assert _leftovers(tmp_path) == []


@pytest.mark.parametrize("device", ["tpu", "cuda:x", "gpu"])
def test_an_unknown_device_is_a_usage_error(
    example: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], device: str
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["merge", str(example), str(tmp_path / "out"), "--device", device])
    assert exit_info.value.code == 2
    assert "use cpu, cuda or cuda:N" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
@pytest.mark.parametrize("command", ["merge", "plan"])
def test_cuda_without_cuda_says_so_and_leaves_nothing(
    example: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], command: str
) -> None:
    argv = [command, str(example), "--device", "cuda"]
    if command == "merge":
        argv.insert(2, str(tmp_path / "out"))
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "CUDA is not available" in err and "--device cpu" in err
    assert list(tmp_path.iterdir()) == []


def test_the_installed_command_prints_no_traceback_for_a_user_error(
    example: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    out.mkdir()
    done = subprocess.run(
        [sys.executable, "-m", "service.cli", "merge", str(example), str(out), "--quiet"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 2
    assert "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines() == [
        f"error: output folder {out} already exists; choose another OUT_DIR, remove it, "
        "or pass --overwrite to replace it once the new merge is complete"
    ]


def test_an_unwritable_output_place_is_one_line(
    example: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    assert main(["merge", str(example), str(blocker / "out"), "--quiet"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and len(err.strip().splitlines()) == 1
