"""Known keys where mergekit ignores them: a warning saying where they act, as mergekit merges.

mergekit 0.1.5 drops every key outside its schema; tureen accepts the keys it knows there
(with a warning, an error under ``strict: true``), merges exactly what mergekit merges, and
still refuses misspellings. ``revision:`` beside a Hub model is read (see
:mod:`merge_kernels.misplaced_keys`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from huggingface_hub import constants
from safetensors.torch import load_file

from merge_kernels.errors import RecipeError
from merge_kernels.recipe import parse_recipe
from merge_kernels.runner import MergeOptions, run_merge
from merge_kernels.synthetic import LlamaShape, write_checkpoint
from tests.merge_kernels.checkpoints.tiny_models import build_hub_cache


def sce(**overrides: Any) -> dict[str, Any]:
    document: dict[str, Any] = {
        "merge_method": "sce",
        "base_model": "org/base",
        "models": [{"model": "org/a"}, {"model": "org/b"}],
        "parameters": {"select_topk": 0.5},
    }
    document.update(overrides)
    return document


def task_arithmetic(**overrides: Any) -> dict[str, Any]:
    return sce(merge_method="task_arithmetic", parameters={"lambda": 1.0}, **overrides)


def passthrough_slices(source: dict[str, Any]) -> dict[str, Any]:
    return {
        "merge_method": "passthrough",
        "slices": [
            {"sources": [{**source, "layer_range": [0, 1]}]},
            {"sources": [{"model": "org/a", "layer_range": [1, 2]}]},
        ],
    }


# (document with the stray key, the same document without it, warned field, message parts)
MISPLACED = [
    (
        sce(pad_to_multiple_of=8),
        sce(),
        "pad_to_multiple_of",
        ["at the top level", "no effect (mergekit ignores it too)", "under `tokenizer:`"],
    ),
    (
        sce(select_topk=0.1),
        sce(),
        "select_topk",
        ["at the top level", "under `parameters:` for sce to use it"],
    ),
    (sce(int8_mask=True), sce(), "int8_mask", ["under `parameters:` for sce to use it"]),
    (sce(normalize=True), sce(), "normalize", ["sce does not use it anywhere"]),
    (sce(tokens={"<x>": {"source": "org/a"}}), sce(), "tokens", ["under `tokenizer:`"]),
    (sce(source="base"), sce(), "source", ["`tokenizer_source:`"]),
    (sce(revision="v1"), sce(), "revision", ["`org/name@revision`"]),
    (
        task_arithmetic(models=[{"model": "org/a", "weight": 0.3}, {"model": "org/b"}]),
        task_arithmetic(),
        "models[0].weight",
        ["in models[0]", "under `models[0].parameters:` for task_arithmetic to use it"],
    ),
    (
        sce(models=[{"model": "org/a", "select_topk": 0.2}, {"model": "org/b"}]),
        sce(),
        "models[0].select_topk",
        ["under `parameters:` for sce"],
    ),
    (
        sce(models=[{"model": "org/a", "dtype": "bfloat16"}, {"model": "org/b"}]),
        sce(),
        "models[0].dtype",
        ["at the top level of the recipe"],
    ),
    (
        sce(parameters={"select_topk": 0.5, "pad_to_multiple_of": 8}),
        sce(),
        "parameters.pad_to_multiple_of",
        ["in parameters", "under `tokenizer:`"],
    ),
    (
        sce(tokenizer={"source": "base", "chat_template": "chatml"}),
        sce(tokenizer={"source": "base"}),
        "tokenizer.chat_template",
        ["in tokenizer", "at the top level"],
    ),
    (
        passthrough_slices({"model": "org/a", "scale": 0.5}),
        passthrough_slices({"model": "org/a"}),
        "slices[0].sources[0].scale",
        ["in slices[0].sources[0]", "`slices[0].sources[0].parameters:`"],
    ),
    (
        {**passthrough_slices({"model": "org/a"}), "tokens": {}},
        passthrough_slices({"model": "org/a"}),
        "tokens",
        ["under `tokenizer:`"],
    ),
]


@pytest.mark.parametrize(
    ("document", "clean", "field", "parts"), MISPLACED, ids=[case[2] for case in MISPLACED]
)
def test_a_known_key_where_mergekit_ignores_it_warns_and_changes_nothing(
    document: dict[str, Any], clean: dict[str, Any], field: str, parts: list[str]
) -> None:
    recipe = parse_recipe(document)
    warned = [w for w in recipe.warnings() if w.startswith(f"{field}: ")]
    assert len(warned) == 1, recipe.warnings()
    for part in parts:
        assert part in warned[0]
    # Nothing was moved to where it would act: the recipe is the one without the key.
    expected = parse_recipe(clean)
    assert recipe.model_dump() == expected.model_dump()
    assert recipe.fingerprint() == expected.fingerprint()
    assert [w for w in recipe.warnings() if w not in warned] == expected.warnings()
    with pytest.raises(RecipeError) as caught:
        parse_recipe({**document, "strict": True})
    assert caught.value.field == field
    assert "strict: true" in caught.value.message


def test_the_input_document_is_not_changed() -> None:
    document = sce(models=[{"model": "org/a", "weight": 0.3, "revision": "v1"}], int8_mask=True)
    before = repr(document)
    parse_recipe(document)
    assert repr(document) == before


@pytest.mark.parametrize(
    ("document", "field", "named"),
    [
        (sce(parameters={"densty": 0.2}), "parameters.densty", "did you mean 'density'?"),
        (sce(parameters={"lamda": 0.2}), "parameters.lamda", "did you mean 'lambda'?"),
        (
            sce(models=[{"model": "org/a", "parameters": {"weigth": 1}}, {"model": "org/b"}]),
            "models[0].parameters.weigth",
            "did you mean 'weight'?",
        ),
        (sce(merge_method="sec"), "merge_method", "did you mean 'sce'?"),
        (sce(dype="float32"), "dype", "did you mean 'dtype'?"),
        (sce(select_topc=0.1), "select_topc", "unknown key"),
        (
            sce(models=[{"model": "org/a", "paramters": {}}, {"model": "org/b"}]),
            "models[0].paramters",
            "did you mean 'parameters'?",
        ),
        (sce(tokenizer={"sorce": "base"}), "tokenizer.sorce", "did you mean 'source'?"),
    ],
)
def test_misspellings_stay_errors_with_a_suggestion(
    document: dict[str, Any], field: str, named: str
) -> None:
    with pytest.raises(RecipeError) as caught:
        parse_recipe(document)
    assert caught.value.field == field
    assert named in caught.value.message


def test_a_parameter_no_method_has_is_named_with_what_the_method_takes() -> None:
    with pytest.raises(RecipeError) as caught:
        parse_recipe(sce(parameters={"select_topk": 0.1, "smooth": False}))
    assert caught.value.field == "parameters.smooth"
    message = caught.value.message
    assert "'smooth'" in message and "no merge method takes it" in message
    assert "did you mean" not in message
    assert "sce takes: int8_mask, select_among, select_topk" in message


def test_revision_beside_a_hub_model_is_read() -> None:
    recipe = parse_recipe(sce(models=[{"model": "org/a", "revision": "v1"}, {"model": "org/b"}]))
    assert recipe.models is not None and recipe.models[0].model == "org/a@v1"
    (warning,) = recipe.warnings()
    assert warning.startswith("models[0].revision: ")
    assert "reads org/a at revision 'v1'" in warning and "`model: org/a@v1`" in warning
    # The same merge as mergekit's spelling of a revision.
    spelled = parse_recipe(sce(models=[{"model": "org/a@v1"}, {"model": "org/b"}]))
    assert recipe.fingerprint() == spelled.fingerprint()
    with pytest.raises(RecipeError, match="strict: true") as caught:
        parse_recipe(sce(models=[{"model": "org/a", "revision": "v1"}], strict=True))
    assert caught.value.field == "models[0].revision"


def test_revision_in_slices_and_object_forms_is_read() -> None:
    recipe = parse_recipe(passthrough_slices({"model": {"repo": "org/a"}, "revision": "dpo-v0"}))
    assert recipe.slices is not None
    assert str(recipe.slices[0].sources[0].model) == "org/a@dpo-v0"
    assert str(recipe.slices[1].sources[0].model) == "org/a"
    assert recipe.warnings()[0].startswith("slices[0].sources[0].revision: ")


def test_a_revision_contradicting_the_name_is_refused_naming_both() -> None:
    with pytest.raises(RecipeError) as caught:
        parse_recipe(sce(models=[{"model": "org/a@v2", "revision": "v1"}, {"model": "org/b"}]))
    assert caught.value.field == "models[0].revision"
    assert "'v1'" in caught.value.message and "'v2'" in caught.value.message
    same = parse_recipe(sce(models=[{"model": "org/a@v1", "revision": "v1"}, {"model": "org/b"}]))
    assert same.models is not None and same.models[0].model == "org/a@v1"


@pytest.mark.parametrize("revision", ["a b", True, ["v1"]])
def test_a_revision_that_names_nothing_is_refused(revision: object) -> None:
    with pytest.raises(RecipeError) as caught:
        parse_recipe(sce(models=[{"model": "org/a", "revision": revision}, {"model": "org/b"}]))
    assert caught.value.field == "models[0].revision"


def test_revision_beside_a_local_folder_or_an_adapter_has_no_effect(tmp_path: Path) -> None:
    folder = tmp_path / "local"
    folder.mkdir()
    document = sce(
        models=[
            {"model": str(folder), "revision": "v1"},
            {"model": "org/b+org/lora", "revision": "v1"},
        ]
    )
    recipe = parse_recipe(document)
    assert recipe.models is not None
    assert [entry.model for entry in recipe.models] == [str(folder), "org/b+org/lora"]
    first, second = recipe.warnings()
    assert first.startswith("models[0].revision: ") and "a local folder has no revisions" in first
    assert second.startswith("models[1].revision: ") and "`org/name@revision`" in second
    assert "mergekit ignores it too" in first and "mergekit ignores it too" in second


SHAPE = LlamaShape(
    vocab_size=32,
    hidden_size=16,
    intermediate_size=24,
    num_hidden_layers=2,
    num_attention_heads=2,
    num_key_value_heads=1,
)


def _merge(document: dict[str, Any], out: Path) -> dict[str, torch.Tensor]:
    run_merge(parse_recipe(document), out, MergeOptions())
    return load_file(str(out / "model.safetensors"))


def test_stray_keys_merge_what_the_recipe_without_them_merges(tmp_path: Path) -> None:
    a = write_checkpoint(tmp_path / "a", SHAPE, seed=1)
    b = write_checkpoint(tmp_path / "b", SHAPE, seed=2)
    clean = {"merge_method": "linear", "models": [{"model": str(a)}, {"model": str(b)}]}
    stray = {
        **clean,
        "models": [{"model": str(a), "weight": 3.0}, {"model": str(b)}],
        "pad_to_multiple_of": 64,
        "normalize": False,
    }
    acting = {
        **clean,
        "models": [{"model": str(a), "parameters": {"weight": 3.0}}, clean["models"][1]],
    }
    ours, expected = _merge(stray, tmp_path / "stray"), _merge(clean, tmp_path / "clean")
    assert ours.keys() == expected.keys()
    assert all(torch.equal(ours[name], expected[name]) for name in ours)
    assert ours["model.embed_tokens.weight"].shape[0] == SHAPE.vocab_size  # not padded
    weighted = _merge(acting, tmp_path / "acting")
    assert not torch.equal(weighted["model.norm.weight"], ours["model.norm.weight"])


def test_a_read_revision_merges_that_revision(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = tmp_path / "hf-home" / "hub"
    cache.mkdir(parents=True)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    main = write_checkpoint(tmp_path / "main", SHAPE, seed=1)
    tagged = write_checkpoint(tmp_path / "tagged", SHAPE, seed=2)
    build_hub_cache(cache, "tiny-org/model", main)
    build_hub_cache(cache, "tiny-org/model", tagged, revision="v1")
    document = {
        "merge_method": "passthrough",
        "models": [{"model": "tiny-org/model", "revision": "v1"}],
    }
    merged = _merge(document, tmp_path / "out")
    expected = load_file(str(tagged / "model.safetensors"))
    assert all(torch.equal(merged[name], expected[name]) for name in expected)


def test_mergekit_object_references_and_their_revisions() -> None:
    # mergekit reads `{path, revision}`; it ignores `revision` beside `model` in the object.
    read = parse_recipe(sce(base_model={"model": {"path": "org/base", "revision": "v1"}}))
    assert read.base_model == "org/base@v1" and read.warnings() == []
    beside = parse_recipe(sce(base_model={"model": "org/base", "revision": "v1"}))
    assert beside.base_model == "org/base@v1"
    (warning,) = beside.warnings()
    assert warning.startswith("base_model.revision: ") and "`base_model: org/base@v1`" in warning
    lora = parse_recipe(
        sce(models=[{"model": {"model": "org/a", "lora": {"path": "org/l", "revision": "v2"}}}])
    )
    assert lora.models is not None and lora.models[0].model == "org/a+org/l@v2"
    with pytest.raises(RecipeError) as caught:
        parse_recipe(sce(base_model={"model": "org/base@v3", "revision": "v1"}))
    assert caught.value.field == "base_model.revision"
    with pytest.raises(RecipeError, match="not supported") as caught:
        parse_recipe(sce(base_model={"model": "org/base", "override_architecture": "X"}))
    assert caught.value.field == "base_model.override_architecture"
