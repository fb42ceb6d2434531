"""Tiny causal LMs with a character tokenizer, and ingredients that help or hurt.

A "target" Llama with confident random weights writes the held-out completions, so a model
scores well exactly when it is close to the target. Ingredients are the target plus
independent noise: averaging several of them cancels noise (the soup helps), while an
ingredient with much larger noise hurts any soup it joins.
"""

from __future__ import annotations

import json
import random
import string
from pathlib import Path
from typing import Any

import torch

ALPHABET = string.ascii_lowercase + string.digits + " "
SPECIALS = ["<pad>", "<s>", "</s>", "<unk>"]


def char_tokenizer() -> Any:
    """A character-level fast tokenizer built locally (no download)."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate([*SPECIALS, *ALPHABET])}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    core.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", vocab["<s>"])]
    )
    from tokenizers import decoders

    core.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
    )


def target_model(seed: int = 0) -> Any:
    """A 2-layer Llama whose random weights give confident, input-dependent predictions."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=len(SPECIALS) + len(ALPHABET),
        max_position_embeddings=64,
        tie_word_embeddings=False,
        initializer_range=0.3,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    torch.manual_seed(seed)
    model: Any = LlamaForCausalLM(config)
    return model.eval()


def perturbed(model: Any, scale: float, seed: int) -> Any:
    """A copy of ``model`` with Gaussian noise of ``scale`` × each tensor's std added."""
    import copy

    generator = torch.Generator().manual_seed(seed)
    noisy = copy.deepcopy(model)
    with torch.no_grad():
        for tensor in noisy.state_dict().values():
            if tensor.is_floating_point() and tensor.numel() > 1:
                std = float(tensor.std()) or 1.0
                tensor.add_(torch.randn(tensor.shape, generator=generator) * std * scale)
    return noisy


def save(model: Any, tokenizer: Any, folder: Path) -> Path:
    """Save a model and the tokenizer as a safetensors checkpoint folder."""
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def write_held_out(
    model: Any, tokenizer: Any, path: Path, *, count: int, seed: int, plain_only: bool = False
) -> Path:
    """Prompts of random characters; completions are the target's greedy continuations.

    With ``plain_only`` the continuation is the model's own unconstrained greedy choice and
    records where it picks a special token are skipped, so the target reproduces every
    completion exactly; otherwise special tokens are excluded from the choice.
    """
    rng = random.Random(seed)
    lines: list[str] = []
    with torch.no_grad():
        while len(lines) < count:
            prompt = "".join(rng.choice(ALPHABET[:-1]) for _ in range(rng.randint(4, 8)))
            ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
            produced = []
            for _ in range(3):
                logits = model(input_ids=ids).logits[0, -1]
                if not plain_only:
                    logits[: len(SPECIALS)] = float("-inf")
                token = int(logits.argmax())
                produced.append(token)
                ids = torch.cat([ids, torch.tensor([[token]])], dim=1)
            if plain_only and min(produced) < len(SPECIALS):
                continue
            completion = tokenizer.decode(produced)
            if completion.strip() != completion:
                continue  # exact match compares stripped text
            lines.append(json.dumps({"prompt": prompt, "completion": completion}))
    path.write_text("\n".join(lines) + "\n")
    return path
