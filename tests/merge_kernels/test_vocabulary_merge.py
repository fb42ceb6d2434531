"""Merges that build an output vocabulary, compared with mergekit 0.1.5 run on the same
tiny checkpoints: the same tokens (and ids, where mergekit's are deterministic), the same
embedding and LM head row for every token, the same config ``vocab_size``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from merge_kernels.recipe import parse_recipe
from merge_kernels.runner import run_merge
from tests.merge_kernels.tokenizer_models import save_model

WORDS = ["<unk>", *(f"w{i}" for i in range(10))]
VOCAB_TENSORS = ("model.embed_tokens.weight", "lm_head.weight")


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """base (13 tokens), a (tied, 2 new words, 1 new added token), b (words reordered, one
    new word, 2 new added tokens, embedding padded to 20 rows), c (tied, words reversed
    after a new one, 1 new added token)."""
    root = tmp_path_factory.mktemp("vocab-models")
    save_model(root / "base", WORDS, ["<s>", "</s>"], seed=0)
    save_model(root / "a", [*WORDS, "xa", "xb"], ["<s>", "</s>", "<a1>"], seed=1, tied=True)
    b_words = [*WORDS[:5], "yb", *WORDS[5:]]
    save_model(root / "b", b_words, ["<s>", "<b1>", "<b2>"], seed=2, vocab_size=20)
    c_words = ["zc", *reversed(WORDS)]
    save_model(root / "c", c_words, ["</s>", "<c1>"], seed=3, tied=True)
    return root


def _vocab(folder: Path) -> dict[str, int]:
    from transformers import AutoTokenizer

    return dict(AutoTokenizer.from_pretrained(folder).get_vocab())


def _mergekit(config: dict[str, Any], out: Path) -> Path:
    from mergekit.config import MergeConfiguration
    from mergekit.merge import MergeOptions
    from mergekit.merge import run_merge as mergekit_merge

    mergekit_merge(MergeConfiguration.model_validate(config), str(out), MergeOptions(quiet=True))
    return out


def _tureen(config: dict[str, Any], out: Path) -> Path:
    run_merge(parse_recipe(config), out)
    return out


def _relative_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / max(float(b.norm()), 1e-12))


def _by_token(weights: torch.Tensor, vocab: dict[str, int]) -> torch.Tensor:
    """Rows in token order (sorted text), then the padding rows."""
    rows = [weights[vocab[token]] for token in sorted(vocab)]
    return torch.stack([*rows, *weights[len(vocab) :]])


def _compare(ours: Path, theirs: Path, *, same_ids: bool) -> dict[str, int]:
    our_vocab, their_vocab = _vocab(ours), _vocab(theirs)
    assert set(our_vocab) == set(their_vocab)
    if same_ids:
        assert our_vocab == their_vocab
    our_weights = load_file(ours / "model.safetensors")
    their_weights = load_file(theirs / "model.safetensors")
    assert sorted(our_weights) == sorted(their_weights)
    for name, theirs_tensor in their_weights.items():
        if name in VOCAB_TENSORS:
            a, b = _by_token(our_weights[name], our_vocab), _by_token(theirs_tensor, their_vocab)
        else:
            a, b = our_weights[name], theirs_tensor
        assert a.shape == b.shape, name
        assert _relative_l2(a, b) < 1e-6, name
    our_config = json.loads((ours / "config.json").read_text())
    their_config = json.loads((theirs / "config.json").read_text())
    assert our_config["vocab_size"] == their_config["vocab_size"]
    assert our_config["vocab_size"] == our_weights["model.embed_tokens.weight"].shape[0]
    return our_vocab


def _linear(models: Path, **extra: Any) -> dict[str, Any]:
    return {
        "merge_method": "linear",
        "base_model": str(models / "base"),
        "models": [
            {"model": str(models / name), "parameters": {"weight": weight}}
            for name, weight in (("base", 0.5), ("a", 0.3), ("b", 0.2))
        ],
        "dtype": "float32",
        **extra,
    }


def test_union_matches_mergekit_token_for_token(models: Path, tmp_path: Path) -> None:
    config = _linear(models, tokenizer_source="union")
    vocab = _compare(
        _tureen(config, tmp_path / "ours"), _mergekit(config, tmp_path / "theirs"), same_ids=False
    )
    # The base keeps its ids; new tokens follow in input order: words, then added tokens.
    expected_new = ["xa", "xb", "yb", "<a1>", "<b1>", "<b2>"]
    assert [t for t, _ in sorted(vocab.items(), key=lambda item: item[1])][13:] == expected_new


def test_base_source_with_a_task_vector_method_matches_mergekit(
    models: Path, tmp_path: Path
) -> None:
    config = {
        "merge_method": "task_arithmetic",
        "base_model": str(models / "base"),
        "models": [
            {"model": str(models / "a"), "parameters": {"weight": 0.7}},
            {"model": str(models / "b"), "parameters": {"weight": 0.4}},
        ],
        "dtype": "float32",
        "tokenizer_source": "base",
    }
    vocab = _compare(
        _tureen(config, tmp_path / "ours"), _mergekit(config, tmp_path / "theirs"), same_ids=True
    )
    assert len(vocab) == 13


def test_model_source_matches_mergekit(models: Path, tmp_path: Path) -> None:
    config = _linear(models, tokenizer_source=str(models / "b"))
    vocab = _compare(
        _tureen(config, tmp_path / "ours"), _mergekit(config, tmp_path / "theirs"), same_ids=True
    )
    assert vocab["yb"] == 5


def test_token_overrides_and_padding_match_mergekit(models: Path, tmp_path: Path) -> None:
    base, a = str(models / "base"), str(models / "a")
    config = _linear(
        models,
        tokenizer={
            "source": "union",
            "tokens": {
                "<a1>": {"source": {"kind": "model_token", "model": base, "token": "<s>"}},
                "w3": {"source": {"kind": "zero"}, "force": True},
                "xa": {"source": {"kind": "model_token", "model": a, "token_id": 2}},
                "</s>": {"source": base, "force": True},
            },
            "pad_to_multiple_of": 8,
        },
    )
    ours = _tureen(config, tmp_path / "ours")
    vocab = _compare(ours, _mergekit(config, tmp_path / "theirs"), same_ids=False)
    weights = load_file(ours / "model.safetensors")["model.embed_tokens.weight"]
    assert weights.shape[0] == 24  # 19 tokens padded to a multiple of 8
    assert torch.equal(weights[vocab["w3"]], torch.zeros(weights.shape[1]))
    assert torch.allclose(weights[19:], weights[:19].mean(dim=0).expand(5, -1))


def test_recipe_refuses_both_tokenizer_forms_and_unknown_override_models() -> None:
    from merge_kernels.errors import RecipeError

    base = {"merge_method": "linear", "models": [{"model": "org/a"}, {"model": "org/b"}]}
    with pytest.raises(RecipeError) as both:
        parse_recipe({**base, "tokenizer_source": "union", "tokenizer": {"source": "base"}})
    assert both.value.field == "tokenizer"
    with pytest.raises(RecipeError) as unknown:
        parse_recipe({**base, "tokenizer": {"tokens": {"x": {"source": "org/c"}}}})
    assert unknown.value.field == "tokenizer.tokens.x.source"
    with pytest.raises(RecipeError) as forced:
        parse_recipe({**base, "tokenizer": {"tokens": {"x": {"force": True}}}})
    assert forced.value.field == "tokenizer.tokens.x"


def test_tied_models_union_matches_mergekit(models: Path, tmp_path: Path) -> None:
    config = {
        "merge_method": "linear",
        "base_model": str(models / "a"),
        "models": [
            {"model": str(models / "a"), "parameters": {"weight": 0.6}},
            {"model": str(models / "c"), "parameters": {"weight": 0.4}},
        ],
        "dtype": "float32",
        "tokenizer_source": "union",
    }
    ours = _tureen(config, tmp_path / "ours")
    _compare(ours, _mergekit(config, tmp_path / "theirs"), same_ids=False)
    assert "lm_head.weight" not in load_file(ours / "model.safetensors")


def test_tokenizer_file_linked_outside_the_roots_is_refused(models: Path, tmp_path: Path) -> None:
    import shutil

    from merge_kernels.checkpoints.confinement import PathOutsideRootsError
    from merge_kernels.runner import MergeOptions

    root = tmp_path / "root"
    for name in ("base", "a"):
        shutil.copytree(models / name, root / name)
    outside = tmp_path / "outside.json"
    shutil.move(root / "a" / "tokenizer.json", outside)
    (root / "a" / "tokenizer.json").symlink_to(outside)
    recipe = parse_recipe(
        {
            "merge_method": "linear",
            "base_model": str(root / "base"),
            "models": [{"model": str(root / "base")}, {"model": str(root / "a")}],
            "tokenizer_source": "union",
        }
    )
    with pytest.raises(PathOutsideRootsError):
        run_merge(recipe, tmp_path / "out", MergeOptions(allowed_roots=(root,)))
