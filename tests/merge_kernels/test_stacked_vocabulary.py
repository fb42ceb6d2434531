"""Stacked merges (``slices``, ``modules``) that build an output vocabulary, compared with
mergekit 0.1.5 on the same tiny checkpoints: the same tokens, the same embedding and LM head
row for every token (by token: mergekit numbers a union's new tokens differently each run),
the same other tensors and config ``vocab_size``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from merge_kernels.errors import RecipeError
from merge_kernels.recipe import parse_recipe
from merge_kernels.runner import MergeOptions, close_inputs, plan_merge
from merge_kernels.synthetic import LlamaShape, write_checkpoint
from tests.merge_kernels.stacking_helpers import load_output, mergekit_merge, tureen_merge
from tests.merge_kernels.tokenizer_models import save_tokenizer

pytest.importorskip("mergekit")

WORDS = ["<unk>", *(f"w{i}" for i in range(10))]
VOCAB_TENSORS = ("model.embed_tokens.weight", "lm_head.weight")
LAYERS = 3


def _model(
    folder: Path,
    words: list[str],
    added: list[str],
    seed: int,
    *,
    rows: int | None = None,
    tied: bool = False,
) -> str:
    size = save_tokenizer(folder, words, added)
    shape = LlamaShape(
        vocab_size=rows or size,
        hidden_size=16,
        intermediate_size=24,
        num_hidden_layers=LAYERS,
        num_attention_heads=2,
        num_key_value_heads=1,
        tie_word_embeddings=tied,
    )
    write_checkpoint(folder, shape, seed=seed, base_seed=0, delta_scale=0.3)
    return str(folder)


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """base (13 tokens); a (2 new words, one new added token); b (words reordered, "yb"
    new, "xa" shared with a alone, embedding padded to 20 rows); c (tied, a new word first,
    words reversed); d (tied, one new word)."""
    root = tmp_path_factory.mktemp("stacked-vocab")
    b_words = [*WORDS[:5], "yb", *WORDS[5:], "xa"]
    return {
        "base": _model(root / "base", WORDS, ["<s>", "</s>"], 1),
        "a": _model(root / "a", [*WORDS, "xa", "xb"], ["<s>", "</s>", "<a1>"], 2),
        "b": _model(root / "b", b_words, ["<s>", "<b1>"], 3, rows=20),
        "c": _model(root / "c", ["zc", *reversed(WORDS)], ["</s>", "<c1>"], 4, tied=True),
        "d": _model(root / "d", [*WORDS, "zd"], ["<s>", "</s>"], 5, tied=True),
    }


def _vocab(folder: Path) -> dict[str, int]:
    from transformers import AutoTokenizer

    return dict(AutoTokenizer.from_pretrained(folder).get_vocab())


def _by_token(weights: torch.Tensor, vocab: dict[str, int]) -> torch.Tensor:
    """Rows in token order (sorted text), then the padding rows."""
    rows = [weights[vocab[token]] for token in sorted(vocab)]
    return torch.stack([*rows, *weights[len(vocab) :]])


def _relative_l2(got: torch.Tensor, expected: torch.Tensor) -> float:
    scale = max(float(expected.double().norm()), 1e-30)
    return float((got.double() - expected.double()).norm()) / scale


def _both(
    document: dict[str, Any], tmp_path: Path
) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
    """Merge with both engines and compare them; tureen's tensors and vocabulary."""
    ours = tureen_merge(document, tmp_path / "tureen")
    theirs = mergekit_merge(document, tmp_path / "mergekit")
    our_vocab, their_vocab = _vocab(tmp_path / "tureen"), _vocab(tmp_path / "mergekit")
    assert set(our_vocab) == set(their_vocab)
    assert sorted(ours) == sorted(theirs)
    for name, expected in theirs.items():
        got = ours[name]
        if name not in VOCAB_TENSORS:
            assert got.shape == expected.shape, name
            assert _relative_l2(got, expected) <= 1e-6, name
            continue
        got, expected = _by_token(got, our_vocab), _by_token(expected, their_vocab)
        assert got.shape == expected.shape, name
        tokens = [*sorted(our_vocab), *(["<padding>"] * (got.shape[0] - len(our_vocab)))]
        for token, mine, oracle in zip(tokens, got, expected, strict=True):
            assert _relative_l2(mine, oracle) <= 1e-6, f"{name}, token {token!r}"
    configs = [
        json.loads((tmp_path / f / "config.json").read_text()) for f in ("tureen", "mergekit")
    ]
    assert configs[0]["vocab_size"] == configs[1]["vocab_size"]
    assert configs[0]["vocab_size"] == ours["model.embed_tokens.weight"].shape[0]
    assert configs[0]["num_hidden_layers"] == configs[1]["num_hidden_layers"]
    return ours, our_vocab


def _row(
    tensors: dict[str, torch.Tensor], vocab: dict[str, int], name: str, token: str
) -> torch.Tensor:
    return tensors[name][vocab[token]]


def _source_row(folder: str, name: str, token: str) -> torch.Tensor:
    from tokenizers import Tokenizer

    index = Tokenizer.from_file(str(Path(folder) / "tokenizer.json")).token_to_id(token)
    return load_output(Path(folder))[name][index]


def test_frankenmerge_takes_embeddings_from_the_first_slice_and_head_from_the_last(
    models: dict[str, str], tmp_path: Path
) -> None:
    document = {
        "merge_method": "passthrough",
        "dtype": "float32",
        "slices": [
            {"sources": [{"model": models["base"], "layer_range": [0, 2]}]},
            {"sources": [{"model": models["b"], "layer_range": [1, 3]}]},
        ],
        "tokenizer_source": "union",
    }
    ours, vocab = _both(document, tmp_path)
    embed, head = VOCAB_TENSORS
    # the embeddings are base's alone: a token base lacks gets zeros, even one b has
    assert torch.equal(_row(ours, vocab, embed, "w3"), _source_row(models["base"], embed, "w3"))
    assert not _row(ours, vocab, embed, "yb").any()
    # the LM head is b's alone: its rows follow b's token order
    assert torch.equal(_row(ours, vocab, head, "yb"), _source_row(models["b"], head, "yb"))
    assert torch.equal(_row(ours, vocab, head, "w7"), _source_row(models["b"], head, "w7"))
    assert not _row(ours, vocab, head, "</s>").any()


def _two_slices(models: dict[str, str], method: str, **extra: Any) -> dict[str, Any]:
    """Embeddings from base, a and b (first slice); the LM head from base and c (last)."""
    return {
        "merge_method": method,
        "base_model": models["base"],
        "dtype": "float32",
        "slices": [
            {
                "sources": [
                    {"model": models["base"], "layer_range": [0, 2]},
                    {"model": models["a"], "layer_range": [0, 2], "parameters": {"weight": 0.3}},
                    {"model": models["b"], "layer_range": [1, 3], "parameters": {"weight": 0.5}},
                ]
            },
            {
                "sources": [
                    {"model": models["base"], "layer_range": [2, 3]},
                    {"model": models["c"], "layer_range": [0, 1], "parameters": {"weight": 0.6}},
                ]
            },
        ],
        "parameters": {"weight": 0.2},
        **extra,
    }


def test_linear_slices_fill_missing_tokens_from_each_slice_s_models(
    models: dict[str, str], tmp_path: Path
) -> None:
    ours, vocab = _both(_two_slices(models, "linear", tokenizer_source="union"), tmp_path)
    embed, head = VOCAB_TENSORS
    # "xa" is in a and b (first slice) but not base: their mean fills base's row
    a, b = (_source_row(models[m], embed, "xa") for m in ("a", "b"))
    expected = (0.2 * (a + b) / 2 + 0.3 * a + 0.5 * b) / (0.2 + 0.3 + 0.5)
    assert torch.allclose(_row(ours, vocab, embed, "xa"), expected, atol=1e-6)
    # c's new word is not in the first slice's models at all, so it embeds as zeros
    assert not _row(ours, vocab, embed, "zc").any()
    # c is tied: its LM head rows are its embedding rows, here only c has "zc"
    assert torch.allclose(_row(ours, vocab, head, "zc"), _source_row(models["c"], embed, "zc"))


def test_task_arithmetic_modules_with_overrides_and_padding_match_mergekit(
    models: dict[str, str], tmp_path: Path
) -> None:
    document = _two_slices(
        models,
        "task_arithmetic",
        tokenizer={
            "source": "union",
            "tokens": {
                "<a1>": {
                    "source": {"kind": "model_token", "model": models["base"], "token": "<s>"}
                },
                "w3": {"source": {"kind": "zero"}, "force": True},
                "xb": {"source": {"kind": "model_token", "model": models["base"], "token_id": 2}},
                "w5": {"source": models["base"], "force": True},
            },
            "pad_to_multiple_of": 8,
        },
    )
    document["modules"] = {"default": {"slices": document.pop("slices")}}
    ours, vocab = _both(document, tmp_path)
    embed = ours["model.embed_tokens.weight"]
    assert embed.shape[0] % 8 == 0 and embed.shape[0] > len(vocab)
    assert not embed[vocab["w3"]].any()
    assert torch.allclose(
        embed[len(vocab) :], embed[: len(vocab)].mean(dim=0).expand(embed.shape[0] - len(vocab), -1)
    )


def test_tied_models_named_tokenizer_matches_mergekit(
    models: dict[str, str], tmp_path: Path
) -> None:
    document = {
        "merge_method": "linear",
        "base_model": models["c"],
        "dtype": "float32",
        "slices": [
            {
                "sources": [
                    {"model": models["c"], "layer_range": [0, 2]},
                    {"model": models["d"], "layer_range": [1, 3]},
                ]
            },
            {"sources": [{"model": models["d"], "layer_range": [2, 3]}]},
        ],
        "parameters": {"weight": 0.5},
        "tokenizer_source": models["d"],
    }
    ours, vocab = _both(document, tmp_path)
    assert "lm_head.weight" not in ours
    assert "zd" in vocab and "zc" not in vocab


def test_an_override_from_a_model_the_tensor_is_not_merged_from_is_refused(
    models: dict[str, str],
) -> None:
    # "xb" is missing from the last slice's models, so its LM head row needs a's row
    document = _two_slices(
        models,
        "linear",
        tokenizer={"tokens": {"xb": {"source": models["a"]}}},
    )
    with pytest.raises(RecipeError) as refused:
        close_inputs(plan_merge(parse_recipe(document), MergeOptions())[1])
    assert refused.value.field == "tokenizer.tokens.xb.source"
    assert "slices[1]" in str(refused.value) and "lm_head.weight" in str(refused.value)


def test_plan_shows_the_aligned_tensors_and_their_models(models: dict[str, str]) -> None:
    recipe = parse_recipe(_two_slices(models, "linear", tokenizer_source="union"))
    plan, inputs = plan_merge(recipe, MergeOptions())
    close_inputs(inputs)
    assert not plan.problems
    aligned = plan.report()["layer_map"]["vocabulary_rows"]
    assert [(item["tensor"], item["slice"]) for item in aligned] == [
        ("model.embed_tokens.weight", "slices[0]"),
        ("lm_head.weight", "slices[1]"),
    ]
    embed, head = aligned
    assert [m["model"] for m in embed["models"]] == [models["base"], models["a"], models["b"]]
    assert [m["model"] for m in head["models"]] == [models["base"], models["c"]]
    # the union of base, a, b and c: base's 13 tokens, xa xb yb zc, <a1> <b1> <c1>; each
    # model's own rows are the tokens it has (b: 11 words, yb, xa, <s>, <b1>)
    assert embed["rows"] == head["rows"] == 20
    assert [m["own_rows"] for m in embed["models"]] == [13, 16, 15]
    assert [m["own_rows"] for m in head["models"]] == [13, 14]
    assert all(m["own_rows"] + m["filled_rows"] == 20 for m in embed["models"])


def test_embeddings_under_another_name_are_refused_when_rows_move(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    folders = []
    for name, extra in (("first", []), ("second", ["new"])):
        folder = tmp_path / name
        rows = save_tokenizer(folder, [*WORDS, *extra])
        tensors = {"model.tok_embeddings.weight": torch.ones(rows, 4)}
        tensors |= {f"model.layers.{i}.w.weight": torch.ones(4, 4) for i in range(2)}
        save_file(tensors, folder / "model.safetensors")
        config = {"model_type": "custom", "num_hidden_layers": 2, "vocab_size": rows}
        (folder / "config.json").write_text(json.dumps(config))
        folders.append(str(folder))
    recipe = parse_recipe(
        {
            "merge_method": "passthrough",
            "slices": [
                {"sources": [{"model": folders[0], "layer_range": [0, 1]}]},
                {"sources": [{"model": folders[1], "layer_range": [1, 2]}]},
            ],
            "tokenizer_source": "union",
        }
    )
    plan, inputs = plan_merge(recipe, MergeOptions())
    close_inputs(inputs)
    assert len(plan.problems) == 1
    assert "no embedding tensor named model.embed_tokens.weight" in plan.problems[0]
    assert "tokenizer_source: base" in plan.problems[0]


def test_an_override_no_aligned_tensor_needs_is_not_checked(
    models: dict[str, str], tmp_path: Path
) -> None:
    # b lacks "</s>", but b feeds only the middle layers: the override is never used
    source = {"kind": "model_token", "model": models["b"], "token": "</s>"}
    document = {
        "merge_method": "passthrough",
        "dtype": "float32",
        "slices": [
            {"sources": [{"model": models["base"], "layer_range": [0, 1]}]},
            {"sources": [{"model": models["b"], "layer_range": [1, 2]}]},
            {"sources": [{"model": models["a"], "layer_range": [2, 3]}]},
        ],
        "tokenizer": {"source": "union", "tokens": {"</s>": {"source": source}}},
    }
    ours, vocab = _both(document, tmp_path)
    head = _row(ours, vocab, "lm_head.weight", "</s>")
    assert torch.equal(head, _source_row(models["a"], "lm_head.weight", "</s>"))
