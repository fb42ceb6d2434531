"""The merge-quality experiment (bench/quality) end to end at toy size, so it cannot rot."""

from __future__ import annotations

import importlib.util
import json
import math
import re
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch

QUALITY = Path(__file__).resolve().parents[2] / "bench" / "quality"


def _load(name: str) -> ModuleType:
    if str(QUALITY) not in sys.path:  # the modules import one another by name, as run.py does
        sys.path.insert(0, str(QUALITY))
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
    assert results["seeds_requested"] == results["seeds_completed"] == 1
    names = [row["name"] for row in results["rows"]]
    methods = [
        "task arithmetic",
        "TIES",
        "DARE-linear",
        "DARE-TIES",
        "TSV-M",
        "ISO-C",
        "ISO-CTS",
        "consensus (TA)",
        "consensus (TIES)",
        "WUDI",
    ]
    expected = [
        "base",
        "adapter: add",
        "adapter: reverse",
        "adapter: json",
        "adapter: sentiment",
        "uniform soup",
        *methods,
        "adapter: add run 2",
        "adapter: add run 3",
        "uniform soup of the add runs",
    ]
    assert names[: len(expected)] == expected
    assert names[-1].startswith("greedy soup of the add runs (")
    for row in results["rows"]:
        assert set(row["scores"]) == set(tasks)
        assert len(row["runs"]) == 1 and row["average_std"]["exact_match"] is None
        for metrics in [*row["scores"].values(), row["average"]]:
            assert 0.0 <= metrics["exact_match"] <= 1.0
            assert 0.0 <= metrics["token_accuracy"] <= 1.0
            assert math.isfinite(metrics["loss"]) and metrics["loss"] > 0
        assert row["runs"][0]["average"] == row["average"]
        assert math.isfinite(row["vs_ties"]["noise"]) and row["vs_ties"]["noise"] >= 0
    # Merges differ from the base: each adapter moves the held-out loss.
    by_name = {row["name"]: row for row in results["rows"]}
    assert by_name["adapter: add"]["average"]["loss"] != by_name["base"]["average"]["loss"]
    for method in ("TSV-M", "ISO-C", "ISO-CTS", "consensus (TA)", "consensus (TIES)", "WUDI"):
        assert by_name[method]["average"]["loss"] != by_name["base"]["average"]["loss"]

    selection = results["seed_sets"][0]["selection"]
    assert set(selection) == set(methods)
    for method in methods:
        search = selection[method]
        assert search["chosen"] in [trial["parameters"] for trial in search["trials"]]
        assert by_name[method]["parameters"] == [search["chosen"]]
    chosen_lambda = selection["task arithmetic"]["chosen"]["lambda"]
    assert selection["DARE-linear"]["chosen"]["lambda"] == chosen_lambda
    assert selection["TSV-M"]["chosen"] == {"alpha": 0.5}
    assert selection["ISO-CTS"]["chosen"]["common_space_fraction"] == 0.8

    soup = results["greedy_soup"]
    report = soup["report"]
    assert len(report["ingredients"]) == 3 and len(report["steps"]) == 2
    assert set(soup["labels"].values()) == {"add", "add run 2", "add run 3"}
    assert len(report["kept"]) == int(names[-1].split("(")[1].split()[0])
    assert len(results["claims"]) == 13
    assert all(claim["holds"] in (True, False, None) for claim in results["claims"])
    assert set(results["seed_sets"][0]["training"]) == {"add", "reverse", "json", "sentiment"}
    assert set(soup["training"]) == {"add run 2", "add run 3"}
    assert results["timings_s"]["total"] > 0

    table = (out / "results.md").read_text()
    assert "| model | runs | add | reverse | json | sentiment | average | vs TIES |" in table
    assert all(f"| {name} |" in table for name in names)
    if importlib.util.find_spec("matplotlib") is not None:
        for plot in ("greedy_soup.png", "methods.png"):
            assert (out / plot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _run(seed: int, scores: list[float]) -> dict[str, Any]:
    tasks = ["a", "b"]
    return {
        "seed": seed,
        "parameters": {},
        "scores": {
            task: {"exact_match": value, "token_accuracy": value, "loss": 1.0 - value}
            for task, value in zip(tasks, scores, strict=True)
        },
    }


def test_seed_sets_give_mean_std_and_a_paired_noise() -> None:
    stats = _load("quality_stats")
    tasks = ["a", "b"]
    row = stats.aggregate("m", "merge", [_run(0, [0.5, 0.7]), _run(1, [0.7, 0.9])], tasks)
    assert row["scores"]["a"]["exact_match"] == pytest.approx(0.6)
    assert row["std"]["a"]["exact_match"] == pytest.approx(math.sqrt(0.02))
    assert row["average"]["exact_match"] == pytest.approx(0.7)
    assert row["average_std"]["exact_match"] == pytest.approx(math.sqrt(0.02))
    same = stats.aggregate("r", "merge", [_run(0, [0.4, 0.6]), _run(1, [0.6, 0.8])], tasks)
    # Paired: the difference is 0.1 in both seed sets, so only the test split's noise counts.
    comparison = stats.versus(row, same, examples=1000)
    assert comparison["paired"] and comparison["difference"] == pytest.approx(0.1)
    test_only = 1.96 * math.sqrt((0.7 * 0.3 + 0.6 * 0.4) / 1000)
    assert comparison["noise"] == pytest.approx(test_only)
    assert comparison["beyond_noise"]
    # Few test examples: the same gap is within the noise.
    assert not stats.versus(row, same, examples=20)["beyond_noise"]
    # Seed sets that disagree add their spread: differences +0.1 and −0.1.
    crossed = stats.aggregate("x", "merge", [_run(0, [0.4, 0.6]), _run(1, [0.8, 1.0])], tasks)
    noisy = stats.versus(row, crossed, examples=1000)
    assert noisy["difference"] == pytest.approx(0.0) and noisy["noise"] > test_only
    assert stats.binomial_half_width(0.5, 64) == pytest.approx(1.96 * 0.5 / 8)
    assert stats.binomial_half_width(1.0, 64) == 0.0


@pytest.mark.parametrize(
    ("method", "scale", "fixed"),
    [
        (
            "tsv_merge",
            "alpha",
            {"exclude_from_svd": [{"filter": "embed", "value": True}, {"value": False}]},
        ),
        (
            "iso_c",
            "scaling_factor",
            {"spectral": [{"filter": "embed", "value": False}, {"value": True}]},
        ),
        ("iso_cts", "scaling_factor", {"common_space_fraction": 0.8}),
        ("consensus", "lambda", {"use_ties": True}),
        ("wudi", "scaling_factor", {"iter_num": 5}),
    ],
)
def test_a_spectral_merge_rescaled_is_the_merge_at_that_scale(
    tmp_path: Path, method: str, scale: str, fixed: dict[str, Any]
) -> None:
    from safetensors.torch import load_file

    from merge_kernels.recipe import parse_recipe
    from merge_kernels.runner import MergeOptions, run_merge
    from merge_kernels.synthetic import LlamaShape, write_checkpoint

    lab = _load("quality_lab")
    shape = LlamaShape(vocab_size=32, hidden_size=16, intermediate_size=24, num_hidden_layers=1)
    base = write_checkpoint(tmp_path / "base", shape, seed=0)
    models = [
        {"model": str(write_checkpoint(tmp_path / f"m{i}", shape, seed=i, base_seed=0))}
        for i in (1, 2, 3)
    ]

    def merge(document: dict[str, Any], name: str) -> dict[str, Any]:
        out = tmp_path / name
        run_merge(parse_recipe(document), out, MergeOptions(device="cpu"))
        return {k: v for f in sorted(out.glob("*.safetensors")) for k, v in load_file(f).items()}

    def recipe(value: float) -> dict[str, Any]:
        return {
            "merge_method": method,
            "base_model": str(base),
            "models": models,
            "parameters": {**fixed, scale: value},
            "dtype": "float32",
        }

    merge(recipe(1.0), "unit")
    rescaled = merge(lab.rescale_recipe(base, tmp_path / "unit", 2.5), "rescaled")
    direct = merge(recipe(2.5), "direct")
    assert rescaled.keys() == direct.keys()
    for name, tensor in direct.items():
        torch.testing.assert_close(rescaled[name], tensor, rtol=1e-5, atol=1e-5)
