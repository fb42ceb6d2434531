"""Multi-document files (mergekit-multimerge): order, names, refusals, running and resuming."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from safetensors.torch import load_file

from merge_kernels.errors import RecipeError
from merge_kernels.multi_merge import MultiMerge, load_merge_file, parse_multi_merge
from merge_kernels.multi_merge_run import plan_multi_merge, run_multi_merge
from merge_kernels.recipe import Recipe
from merge_kernels.runner import MergeOptions
from merge_kernels.synthetic import LlamaShape, write_checkpoint

SHAPE = LlamaShape(
    vocab_size=16,
    hidden_size=8,
    intermediate_size=12,
    num_hidden_layers=1,
    num_attention_heads=2,
    num_key_value_heads=1,
)


def doc(name: str | None, base: str, *models: str, method: str = "task_arithmetic") -> Any:
    document: dict[str, Any] = {
        "merge_method": method,
        "base_model": base,
        "models": [{"model": m, "parameters": {"weight": 0.5}} for m in models],
    }
    if name is not None:
        document["name"] = name
    return document


def parse(documents: list[Any], tmp_path: Path) -> MultiMerge:
    return parse_multi_merge(documents, intermediate_dir=tmp_path / "parts", base_dir=tmp_path)


def test_merges_run_in_dependency_order_whatever_the_file_order(tmp_path: Path) -> None:
    merges = parse(
        [
            doc(None, "org/base", "step-b"),
            doc("step-a", "org/base", "org/x"),
            doc("step-b", "org/base", "step-a", "org/y"),
        ],
        tmp_path,
    )
    assert [s.index for s in merges.steps] == [1, 2, 0]
    final = merges.steps[-1]
    assert final.final and final.needs == ("step-b",)
    assert str(final.recipe.models[0].model) == str(tmp_path / "parts" / "step-b")  # type: ignore[index]
    assert merges.steps[1].needs == ("step-a",)
    assert merges.output_of(merges.steps[0], tmp_path / "out") == tmp_path / "parts" / "step-a"
    assert merges.output_of(final, tmp_path / "out") == tmp_path / "out"


def test_references_in_every_form_are_replaced(tmp_path: Path) -> None:
    merges = parse(
        [
            doc("one", "org/base", "org/x"),
            {
                "merge_method": "ties",
                "base_model": {"path": "one"},
                "models": [
                    {"model": "one+org/adapter", "parameters": {"density": 0.5}},
                    {"model": {"base": "one", "adapter": "org/other"}},
                ],
                "tokenizer_source": "base",
                "parameters": {"density": 0.3},
            },
        ],
        tmp_path,
    )
    final = merges.steps[-1].recipe
    one = str(tmp_path / "parts" / "one")
    assert str(final.base_model) == one
    assert [str(m.model) for m in final.models or []] == [
        f"{one}+org/adapter",
        f"{one}+org/other",
    ]
    assert final.tokenizer_source == "base"


@pytest.mark.parametrize(
    ("documents", "field", "words"),
    [
        (
            [doc("a", "org/base", "b"), doc("b", "org/base", "a"), doc(None, "org/base", "a")],
            "documents[0].name",
            "'a' -> 'b' -> 'a'",
        ),
        ([doc("a", "org/base", "a"), doc(None, "org/base", "a")], "documents[0].name", "cycle"),
        (
            [doc("step-one", "org/base", "org/x"), doc(None, "org/base", "step-on")],
            "documents[1].models[0].model",
            "did you mean 'step-one'",
        ),
        (
            [doc("a", "org/base", "org/x"), doc("a", "org/base", "org/y")],
            "documents[1].name",
            "already the name of documents[0]",
        ),
        (
            [doc(None, "org/base", "org/x"), doc(None, "org/base", "org/y")],
            "documents[1].name",
            "only the final merge may go unnamed",
        ),
        (
            [doc("a", "org/base", "org/x"), doc("b", "org/base", "org/y")],
            "name",
            "documents[0] ('a'), documents[1] ('b')",
        ),
        (
            [doc("a/b", "org/base", "org/x"), doc(None, "org/base", "org/y")],
            "documents[0].name",
            "cannot name a merge",
        ),
        (
            [doc("a", "org/base", "org/x"), doc(None, "org/base", "a@main")],
            "documents[1].models[0].model",
            "has no revisions",
        ),
        (
            [doc("a", "org/base", "org/x"), {**doc(None, "org/base", "a"), "merge_method": "tie"}],
            "documents[1].merge_method",
            "did you mean 'ties'",
        ),
    ],
)
def test_bad_files_are_refused_naming_the_document(
    tmp_path: Path, documents: list[Any], field: str, words: str
) -> None:
    with pytest.raises(RecipeError) as caught:
        parse(documents, tmp_path)
    assert caught.value.field == field
    assert words in caught.value.message


def test_every_document_named_the_final_is_the_one_nobody_reads(tmp_path: Path) -> None:
    merges = parse([doc("last", "org/base", "first"), doc("first", "org/base", "org/x")], tmp_path)
    assert [(s.name, s.final) for s in merges.steps] == [("first", False), ("last", True)]


def test_a_single_named_document_is_an_ordinary_recipe(tmp_path: Path) -> None:
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(doc("only", "org/base", "org/x")))
    loaded = load_merge_file(path)
    assert isinstance(loaded, Recipe) and loaded.name == "only"


def _checkpoints(root: Path) -> None:
    write_checkpoint(root / "base", SHAPE, seed=0)
    write_checkpoint(root / "x", SHAPE, seed=1, base_seed=0, delta_scale=0.5)
    write_checkpoint(root / "y", SHAPE, seed=2, base_seed=0, delta_scale=0.5)


def test_a_file_merges_its_intermediates_then_the_final_and_keeps_them(tmp_path: Path) -> None:
    _checkpoints(tmp_path)
    path = tmp_path / "merges.yaml"
    path.write_text(
        yaml.safe_dump_all(
            [
                {
                    "merge_method": "task_arithmetic",
                    "base_model": "./base",
                    "models": [{"model": "soup", "parameters": {"weight": 0.5}}],
                    "parameters": {"density": 0.5},  # ignored, with a warning
                },
                {
                    "name": "soup",
                    "merge_method": "linear",
                    "models": [{"model": "./x"}, {"model": "./y"}],
                },
            ]
        )
    )
    merges = load_merge_file(path)
    assert isinstance(merges, MultiMerge)
    assert merges.intermediate_dir == tmp_path / "merges-intermediates"
    assert merges.warnings() and merges.warnings()[0].startswith("documents[0]: parameters.density")
    options = MergeOptions(base_dir=tmp_path)
    report = plan_multi_merge(merges, tmp_path / "out", options)
    assert [entry["waits_for"] for entry in report["merges"]] == [[], ["soup"]]
    assert report["merges"][1]["plan"] is None and report["merges"][0]["plan"]["ok"]
    results = run_multi_merge(merges, tmp_path / "out", options)
    assert [(r.step.name, r.reused) for r in results] == [("soup", False), (None, False)]
    tensors = {n: load_file(tmp_path / n / "model.safetensors") for n in ("base", "x", "y")}
    final = load_file(tmp_path / "out" / "model.safetensors")
    for name, merged in final.items():
        soup = (tensors["x"][name] + tensors["y"][name]) / 2
        expected = tensors["base"][name] + 0.5 * (soup - tensors["base"][name])
        assert torch.allclose(merged, expected, atol=1e-6), name
    # the card and the saved recipe name the intermediate by its document, not its folder
    card = (tmp_path / "out" / "README.md").read_text()
    saved = yaml.safe_load((tmp_path / "out" / "tureen_recipe.yaml").read_text())
    assert "intermediates" not in card and "| model | `soup` |" in card
    assert saved["models"] == [{"model": "soup", "parameters": {"weight": 0.5}}]
    assert results[1].result.provenance[1]["reference"] == "soup"
    # planned again, every merge can be planned now; run again, the intermediate is kept
    assert all(e["plan"] is not None for e in plan_multi_merge(merges, None, options)["merges"])
    again = run_multi_merge(merges, tmp_path / "again", options)
    assert [(r.step.name, r.reused) for r in again] == [("soup", True), (None, False)]
    assert load_file(tmp_path / "again" / "model.safetensors").keys() == final.keys()
