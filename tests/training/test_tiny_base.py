"""The tiny base: builds in seconds with no download, loads with transformers, deterministic."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from tests.training.conftest import BASE_SPEC
from training.tiny_base import EOS_TOKEN, PAD_TOKEN, TinyBaseSpec, build_tiny_base


def test_loads_with_transformers_and_tokenizes_plainly(tiny_base: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast

    tokenizer = AutoTokenizer.from_pretrained(tiny_base)
    assert isinstance(tokenizer, PreTrainedTokenizerFast)
    assert (tokenizer.pad_token, tokenizer.eos_token) == (PAD_TOKEN, EOS_TOKEN)
    assert tokenizer.pad_token_id != tokenizer.eos_token_id
    for text in ("reverse hello =", " olleh", "add 12 37 =", " 49", "title ab cd =", " Ab Cd"):
        ids = tokenizer(text)["input_ids"]
        assert tokenizer.decode(ids) == text
    digits = tokenizer.convert_ids_to_tokens(tokenizer(" 1234")["input_ids"])
    assert digits[-4:] == ["1", "2", "3", "4"]  # one token per digit
    model = AutoModelForCausalLM.from_pretrained(tiny_base)
    assert model.config.model_type == "llama"
    assert model.config.vocab_size == len(tokenizer)
    assert model.config.eos_token_id == tokenizer.eos_token_id
    report = json.loads((tiny_base / "pretraining.json").read_text())
    losses = report["losses"]
    assert len(losses) == BASE_SPEC.pretrain_steps
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.5


def test_same_seed_same_base(tmp_path: Path) -> None:
    spec = TinyBaseSpec(pretrain_steps=3, corpus_lines=100)
    build_tiny_base(tmp_path / "a", spec)
    build_tiny_base(tmp_path / "b", spec)
    build_tiny_base(tmp_path / "c", TinyBaseSpec(pretrain_steps=3, corpus_lines=100, seed=1))
    a, b, c = (load_file(tmp_path / n / "model.safetensors") for n in "abc")
    assert all(torch.equal(a[name], b[name]) for name in a)
    assert not torch.equal(a["model.embed_tokens.weight"], c["model.embed_tokens.weight"])
    assert (tmp_path / "a" / "tokenizer.json").read_bytes() == (
        tmp_path / "b" / "tokenizer.json"
    ).read_bytes()
    assert not list(tmp_path.glob(".*"))
