"""Tiny checkpoints built on the fly: a random Llama, PEFT LoRA adapters, a fake Hub cache.

Nothing here downloads anything: models are built from a config with random weights.
"""

from __future__ import annotations

import copy
import hashlib
import os
import shutil
from pathlib import Path
from typing import Any

import torch

VOCAB = 128
HIDDEN = 32


def tiny_llama(seed: int = 0, dtype: torch.dtype = torch.float32) -> Any:
    """A 2-layer LlamaForCausalLM (hidden 32, vocab 128) with random weights."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        hidden_size=HIDDEN,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=VOCAB,
        max_position_embeddings=64,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model: Any = LlamaForCausalLM(config)
    return model.to(dtype)


def save_tiny_gpt2(folder: Path, *, seed: int = 0) -> Any:
    """Save a 2-layer GPT-2 (Conv1D layers, weights stored in x out, with biases)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(n_embd=HIDDEN, n_layer=2, n_head=4, vocab_size=VOCAB, n_positions=64)
    torch.manual_seed(seed)
    model = GPT2LMHeadModel(config)
    model.save_pretrained(folder)
    return model


def save_tiny_llama(
    folder: Path,
    *,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    max_shard_size: str | None = None,
) -> Any:
    """Save a tiny Llama with safetensors into ``folder`` (sharded when ``max_shard_size``).

    Returns:
        The model that was saved.
    """
    model = tiny_llama(seed, dtype)
    kwargs: dict[str, Any] = {}
    if max_shard_size is not None:
        kwargs["max_shard_size"] = max_shard_size
    model.save_pretrained(folder, **kwargs)
    return model


def save_pickle_copy(model: Any, folder: Path) -> dict[str, torch.Tensor]:
    """Save ``model``'s state dict as ``pytorch_model.bin`` plus config.json into ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    torch.save(state, folder / "pytorch_model.bin")
    model.config.to_json_file(folder / "config.json")
    return state


def make_lora_adapter(
    base_model: Any, folder: Path, *, seed: int = 1, **lora_kwargs: Any
) -> dict[str, torch.Tensor]:
    """Train-free LoRA: wrap a copy of ``base_model`` with PEFT, randomise, save the adapter.

    Every trainable parameter (LoRA factors, which PEFT starts at zero for ``lora_B``,
    ``modules_to_save`` copies, trained biases) is perturbed randomly, so the merge really
    changes the weights.

    Args:
        base_model: the base model (left untouched).
        folder: where ``save_pretrained`` writes the adapter.
        seed: seed for the random adapter values.
        **lora_kwargs: ``peft.LoraConfig`` arguments.

    Returns:
        The state dict of PEFT's ``merge_and_unload()`` result: the reference to match.
    """
    from peft import LoraConfig, get_peft_model

    model = copy.deepcopy(base_model)
    peft_model = get_peft_model(model, LoraConfig(**lora_kwargs))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in peft_model.parameters():
            if param.requires_grad:
                noise = torch.randn(param.shape, generator=generator, dtype=torch.float32)
                param.copy_((param.float() + 0.1 * noise).to(param.dtype))
    peft_model.save_pretrained(str(folder))
    merged = peft_model.merge_and_unload()
    return {k: v.detach().clone() for k, v in merged.state_dict().items()}


def build_hub_cache(
    cache: Path, repo_id: str, source: Path, *, revision: str = "main", commit: str | None = None
) -> str:
    """Lay out ``source``'s files as a Hugging Face hub cache entry for ``repo_id``.

    Writes ``models--org--name/blobs/<sha256>``, ``snapshots/<commit>/<file>`` symlinks to
    the blobs, and ``refs/<revision>`` holding the commit, as huggingface_hub does.

    Returns:
        The commit SHA.
    """
    commit = commit or hashlib.sha1(f"{repo_id}@{revision}".encode()).hexdigest()
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / commit
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    snapshot.mkdir(parents=True, exist_ok=True)
    for path in sorted(source.iterdir()):
        if not path.is_file():
            continue
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        blob = repo / "blobs" / digest
        if not blob.exists():
            shutil.copyfile(path, blob)
        link = snapshot / path.name
        if link.is_symlink() or link.exists():
            link.unlink()
        os.symlink(os.path.relpath(blob, snapshot), link)
    refs = repo / "refs" / revision
    refs.parent.mkdir(parents=True, exist_ok=True)
    refs.write_text(commit)
    return commit
