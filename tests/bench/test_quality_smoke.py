"""The merge-quality experiment (bench/quality) end to end at toy size, so it cannot rot."""

from __future__ import annotations

import importlib.util
import json
import math
import re
import sys
from pathlib import Path
from types import ModuleType

import pytest

QUALITY = Path(__file__).resolve().parents[2] / "bench" / "quality"


def _load(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, QUALITY / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def test_tasks_answers_are_right_and_splits_disjoint(tmp_path: Path) -> None:
    tasks = _load("quality_tasks")
    by_name = {task.name: task for task in tasks.TASKS}
    assert len(by_name) == 4
    for task in tasks.TASKS:
        paths = tasks.write_splits(tmp_path / task.name, task, tasks.SplitSizes(30, 10, 10), 0)
        splits = {
            split: [json.loads(line) for line in path.read_text().splitlines()]
            for split, path in paths.items()
        }
        assert [len(rows) for rows in splits.values()] == [30, 10, 10]
        prompts = [row["prompt"] for rows in splits.values() for row in rows]
        assert len(set(prompts)) == 50, task.name
        assert all(p.startswith("<|im_start|>user\n") for p in prompts)
        assert all(p.endswith("<|im_end|>\n<|im_start|>assistant\n") for p in prompts)
    for row in tasks.records(by_name["add"], 20, 1):
        a, b = re.findall(r"\d+", row["prompt"])
        assert row["completion"] == str(int(a) + int(b))
    for row in tasks.records(by_name["reverse"], 20, 1):
        words = row["prompt"].split(": ", 1)[1].split("<|im_end|>")[0].split()
        assert row["completion"].split() == words[::-1]
    for row in tasks.records(by_name["json"], 20, 1):
        source = row["prompt"].split("To JSON: ", 1)[1].split("<|im_end|>")[0]
        pairs = dict(item.split("=") for item in source.split("; "))
        assert json.loads(row["completion"]) == {
            k: int(v) if k in tasks.NUMBER_KEYS else v for k, v in pairs.items()
        }
    labels = {row["completion"] for row in tasks.records(by_name["sentiment"], 60, 1)}
    assert labels == {"positive", "negative"}
    assert tasks.records(by_name["json"], 5, 3) == tasks.records(by_name["json"], 5, 3)


@pytest.mark.slow
def test_quick_run_writes_the_table_the_json_and_the_plot(tmp_path: Path) -> None:
    run = _load("run")
    out = tmp_path / "results"
    assert run.main(["--quick", "--device", "cpu", "--out", str(out)]) == 0

    text = (out / "results.json").read_text()
    assert str(tmp_path) not in text and "tureen-quality-" not in text  # no scratch paths
    results = json.loads(text)
    tasks = [task["name"] for task in results["tasks"]]
    assert tasks == ["add", "reverse", "json", "sentiment"]
    names = [row["name"] for row in results["rows"]]
    expected = [
        "base",
        "adapter: add",
        "adapter: reverse",
        "adapter: json",
        "adapter: sentiment",
        "adapter: add run 2",
        "adapter: add run 3",
        "uniform soup",
        "task arithmetic",
        "TIES",
        "DARE-linear",
        "DARE-TIES",
        "uniform soup of the add runs",
    ]
    assert names[: len(expected)] == expected
    assert names[-1].startswith("greedy soup of the add runs (")
    for row in results["rows"]:
        assert set(row["scores"]) == set(tasks)
        for metrics in [*row["scores"].values(), row["average"]]:
            assert 0.0 <= metrics["exact_match"] <= 1.0
            assert 0.0 <= metrics["token_accuracy"] <= 1.0
            assert math.isfinite(metrics["loss"]) and metrics["loss"] > 0
    # Merges differ from the base: each adapter moves the held-out loss.
    by_name = {row["name"]: row for row in results["rows"]}
    assert by_name["adapter: add"]["average"]["loss"] != by_name["base"]["average"]["loss"]

    for method in ("task arithmetic", "TIES", "DARE-linear", "DARE-TIES"):
        search = results["selection"][method]
        assert search["chosen"] in [trial["parameters"] for trial in search["trials"]]
        assert by_name[method]["parameters"] == search["chosen"]
    dare = results["selection"]["DARE-linear"]["chosen"]
    assert dare["lambda"] == results["selection"]["task arithmetic"]["chosen"]["lambda"]

    soup = results["greedy_soup"]
    report = soup["report"]
    assert len(report["ingredients"]) == 3 and len(report["steps"]) == 2
    assert set(soup["labels"].values()) == {"add", "add run 2", "add run 3"}
    assert len(report["kept"]) == int(names[-1].split("(")[1].split()[0])
    assert len(results["claims"]) == 6
    assert all(claim["holds"] in (True, False, None) for claim in results["claims"])
    assert set(results["training"]) == {
        "add",
        "reverse",
        "json",
        "sentiment",
        "add run 2",
        "add run 3",
    }
    assert results["timings_s"]["total"] > 0

    table = (out / "results.md").read_text()
    assert "| model | add | reverse | json | sentiment | average |" in table
    assert all(f"| {name} |" in table for name in names)
    if importlib.util.find_spec("matplotlib") is not None:
        assert (out / "greedy_soup.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
