"""``tureen search SPEC OUT --state FILE``: progress lines, the summary, and a resume."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

from service.cli import main as cli
from tests.merge_kernels.search.conftest import TiesWorld


def test_search_command_runs_prints_progress_and_resumes_from_its_state(
    ties_world: TiesWorld, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    spec = tmp_path / "search.yaml"
    document = ties_world.spec("grid", 4)
    shutil.copy(ties_world.validation, tmp_path / "valid.jsonl")
    document["evaluator"]["data"] = "valid.jsonl"  # relative to the spec's folder
    spec.write_text(yaml.safe_dump(document))
    state = tmp_path / "state.json"
    assert cli(["search", str(spec), str(tmp_path / "first"), "--state", str(state)]) == 0
    out, err = capsys.readouterr()
    first = json.loads(out)
    assert err.count("(best ") == 4 and "[4/4] done" in err
    assert first["evaluations"] == 4 and first["stopped_by"] == "evaluations"
    assert Path(first["best_recipe"]).is_file()

    # The state as a run killed after two evaluations leaves it: the run resumes there.
    saved = json.loads(state.read_text())
    saved["evaluations"] = saved["evaluations"][:2]
    saved["strategy"]["next"] = 2
    saved["status"], saved["report"] = "running", None
    state.write_text(json.dumps(saved))
    assert cli(["search", str(spec), str(tmp_path / "second"), "--state", str(state)]) == 0
    out, err = capsys.readouterr()
    second = json.loads(out)
    assert "[2/4] resuming: 2 evaluation(s) already scored" in err
    assert err.count("(best ") == 2  # only the two points left are scored
    assert second["best"] == first["best"]
    # Finished: the same command again only reports.
    assert cli(["search", str(spec), str(tmp_path / "second"), "--state", str(state)]) == 0
    assert json.loads(capsys.readouterr().out)["best"] == first["best"]


def test_search_command_errors_name_the_field(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    spec = tmp_path / "search.yaml"
    spec.write_text(yaml.safe_dump({"recipe": {"merge_method": "ties"}, "strategy": "grid"}))
    assert cli(["search", str(spec), str(tmp_path / "out")]) == 2
    assert "error: budget: Field required" in capsys.readouterr().err
