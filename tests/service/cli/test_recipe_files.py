"""``tureen plan`` and ``tureen merge``: warnings on stderr, multi-document recipe files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from merge_kernels.synthetic import LlamaShape, write_checkpoint
from service.cli import main

SHAPE = LlamaShape(
    vocab_size=16,
    hidden_size=8,
    intermediate_size=12,
    num_hidden_layers=1,
    num_attention_heads=2,
    num_key_value_heads=1,
)


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("recipes")
    write_checkpoint(root / "base", SHAPE, seed=0)
    write_checkpoint(root / "x", SHAPE, seed=1, base_seed=0)
    write_checkpoint(root / "y", SHAPE, seed=2, base_seed=0)
    return root


def test_plan_and_merge_print_warnings_on_stderr(
    folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    recipe = tmp_path / "ties.yaml"
    recipe.write_text(
        yaml.safe_dump(
            {
                "merge_method": "ties",
                "base_model": str(folder / "base"),
                "models": [{"model": str(folder / "x")}, {"model": str(folder / "y")}],
                "parameters": {"int8_mask": True, "filter_wise": False},
            }
        )
    )
    assert main(["plan", str(recipe)]) == 0
    captured = capsys.readouterr()
    assert "warning: parameters.density: not given for models[0], models[1]" in captured.err
    assert "warning: parameters.filter_wise: ties does not use" in captured.err
    warned = json.loads(captured.out)["warnings"]
    assert sorted(w.partition(":")[0] for w in warned) == [
        "parameters.density",
        "parameters.filter_wise",
    ]
    assert main(["merge", str(recipe), str(tmp_path / "out"), "--quiet"]) == 0
    assert captured.err.count("warning:") == capsys.readouterr().err.count("warning:") == 2
    strict = tmp_path / "strict.yaml"
    strict.write_text(recipe.read_text() + "strict: true\n")
    assert main(["plan", str(strict)]) == 2
    assert "strict: true makes this an error" in capsys.readouterr().err


def test_a_multi_document_file_is_planned_and_merged(
    folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    recipe = tmp_path / "two.yaml"
    recipe.write_text(
        yaml.safe_dump_all(
            [
                {
                    "name": "soup",
                    "merge_method": "linear",
                    "models": [{"model": str(folder / "x")}, {"model": str(folder / "y")}],
                },
                {
                    "merge_method": "slerp",
                    "base_model": str(folder / "base"),
                    "models": [{"model": "soup"}],
                    "parameters": {"t": 0.5},
                },
            ]
        )
    )
    parts = tmp_path / "two-intermediates"
    assert main(["plan", str(recipe)]) == 0
    captured = capsys.readouterr()
    assert f"intermediate merges go to {parts}/<name>" in captured.err
    report = json.loads(captured.out)
    assert [m["waits_for"] for m in report["merges"]] == [[], ["soup"]]
    assert main(["merge", str(recipe), str(tmp_path / "out"), "--quiet"]) == 0
    captured = capsys.readouterr()
    assert f"documents[0] ('soup'): merging into {parts / 'soup'}" in captured.err
    summary = json.loads(captured.out)
    assert [m["name"] for m in summary["merges"]] == ["soup", None]
    assert (parts / "soup" / "model.safetensors").is_file()
    assert (tmp_path / "out" / "model.safetensors").is_file()
    elsewhere = tmp_path / "elsewhere"
    args = ["merge", str(recipe), str(tmp_path / "out2"), "--quiet"]
    assert main([*args, "--intermediate-dir", str(elsewhere)]) == 0
    assert (elsewhere / "soup" / "model.safetensors").is_file()
