"""Tiny Llama checkpoints with tiny tokenizers of their own, built on the fly.

Each model gets a BPE tokenizer (``tokenizer.json`` + ``tokenizer_config.json``) built with
the ``tokenizers`` library from a word list and added tokens, and random weights whose
embedding rows match the tokenizer (or a padded ``vocab_size``).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

HIDDEN = 16


def save_tokenizer(
    folder: Path,
    words: Sequence[str],
    added: Sequence[str] = (),
    *,
    chat_template: str | None = None,
) -> int:
    """Write a BPE tokenizer of ``words`` (ids in order) plus special ``added`` tokens.

    Returns:
        The number of tokens (words and added tokens).
    """
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers

    tokenizer = Tokenizer(
        models.BPE(vocab={word: i for i, word in enumerate(words)}, merges=[], unk_token=words[0])
    )
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()  # type: ignore[assignment]
    tokenizer.add_special_tokens([AddedToken(a, special=True, normalized=False) for a in added])
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(folder / "tokenizer.json"))
    config: dict[str, Any] = {"tokenizer_class": "PreTrainedTokenizerFast", "unk_token": words[0]}
    if added:
        config["bos_token"] = added[0]
    if chat_template is not None:
        config["chat_template"] = chat_template
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return int(tokenizer.get_vocab_size(with_added_tokens=True))


def save_model(
    folder: Path,
    words: Sequence[str],
    added: Sequence[str] = (),
    *,
    seed: int = 0,
    vocab_size: int | None = None,
    tied: bool = False,
    chat_template: str | None = None,
) -> Path:
    """Save a one-layer Llama with its own tokenizer into ``folder``.

    Args:
        words: the tokenizer's regular tokens, in id order.
        added: special tokens added after them.
        vocab_size: embedding rows (default: the tokenizer's size); larger pads the embedding.
        tied: tie the LM head to the embeddings (no ``lm_head.weight`` is saved).
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    size = save_tokenizer(folder, words, added, chat_template=chat_template)
    config = LlamaConfig(
        hidden_size=HIDDEN,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        vocab_size=vocab_size or size,
        max_position_embeddings=32,
        tie_word_embeddings=tied,
    )
    torch.manual_seed(seed)
    model: Any = LlamaForCausalLM(config)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.normal_()
    model.save_pretrained(folder)
    return folder
