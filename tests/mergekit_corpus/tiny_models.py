"""Map a published mergekit config onto tiny local checkpoints.

Every model a config names (``org/name``, a Windows or POSIX path, ``base+adapter``) becomes
a folder of a tiny Llama checkpoint: one shared base plus a small, sparse, seeded delta per
reference, with as many layers as the config's largest ``layer_range`` needs, a tiny
``tokenizers`` vocabulary (distinct extra tokens per model when the config merges
vocabularies), and a PEFT LoRA adapter in safetensors for the adapter side of ``a+b``.
The config's references are then rewritten to those folders. Everything is derived from the
reference text, so the same config always maps to the same bytes.
"""

from __future__ import annotations

import copy
import hashlib
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import Whitespace

from merge_kernels.synthetic import LlamaShape

BASE_VOCAB = 48
EXTRA_TOKENS = 3
DEFAULT_LAYERS = 4
DELTA_SCALE = 0.02
KEEP_PROBABILITY = 0.6
LORA_RANK = 2
_DTYPES = {
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
}
_NOT_MODELS = {"union", "base"}


@dataclass(frozen=True)
class ModelSpec:
    """What one tiny checkpoint looks like (its folder name is derived from it)."""

    reference: str
    layers: int
    dtype: torch.dtype
    extra_tokens: int
    pure_base: bool

    def folder_name(self) -> str:
        key = f"{self.reference}|{self.layers}|{self.dtype}|{self.extra_tokens}|{self.pure_base}"
        return hashlib.sha256(key.encode()).hexdigest()[:16]


def _seed(text: str) -> int:
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:4], "little")


def shape_for(layers: int, vocab_size: int) -> LlamaShape:
    """The tiny Llama shape every corpus checkpoint uses."""
    return LlamaShape(
        vocab_size=vocab_size,
        hidden_size=16,
        intermediate_size=24,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
    )


def _base_tensor(name: str, shape: tuple[int, ...]) -> torch.Tensor:
    # The base is shared by every model (drawn from the tensor name alone).
    generator = torch.Generator().manual_seed(_seed("base|" + name))
    if len(shape) == 1:
        return torch.ones(shape) + 0.1 * torch.randn(shape, generator=generator)
    drawn: torch.Tensor = torch.randn(shape, generator=generator) / shape[-1] ** 0.5
    return drawn


def _weights(spec: ModelSpec, shape: LlamaShape) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    vocab_tensors = {"model.embed_tokens.weight", "lm_head.weight"}
    for name, dims in shape.tensors():
        if name in vocab_tensors:
            base = _base_tensor(name, (BASE_VOCAB, dims[1]))
            if dims[0] > BASE_VOCAB:
                # A model's extra tokens get rows of their own, different between models.
                extra = torch.Generator().manual_seed(_seed(f"extra|{spec.reference}|{name}"))
                rows = torch.randn((dims[0] - BASE_VOCAB, dims[1]), generator=extra)
                base = torch.cat([base, rows / dims[1] ** 0.5])
        else:
            base = _base_tensor(name, dims)
        if not spec.pure_base:
            generator = torch.Generator().manual_seed(_seed(f"delta|{spec.reference}|{name}"))
            delta = torch.randn(base.shape, generator=generator) * DELTA_SCALE * base.abs().mean()
            keep = torch.rand(base.shape, generator=generator) < KEEP_PROBABILITY
            base = base + delta * keep
        tensors[name] = base.to(spec.dtype).contiguous()
    return tensors


def _extra_token_names(reference: str, count: int) -> list[str]:
    tag = hashlib.sha256(reference.encode()).hexdigest()[:6]
    return [f"<|x{tag}_{k}|>" for k in range(count)]


def write_tokenizer(folder: Path, extra: list[str]) -> None:
    """A tiny word-level tokenizer: shared base words, then this model's extra tokens."""
    words = ["<unk>", "<s>", "</s>"] + [f"w{i}" for i in range(BASE_VOCAB - 3)] + extra
    tokenizer = Tokenizer(WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tokenizer.pre_tokenizer = Whitespace()
    tokenizer.save(str(folder / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "model_max_length": 256,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    special = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
    (folder / "special_tokens_map.json").write_text(json.dumps(special, indent=2))


def write_model(folder: Path, spec: ModelSpec) -> Path:
    """Write the tiny checkpoint ``spec`` describes into ``folder`` (once)."""
    if (folder / "config.json").exists():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    extra = _extra_token_names(spec.reference, spec.extra_tokens)
    shape = shape_for(spec.layers, BASE_VOCAB + len(extra))
    save_file(_weights(spec, shape), str(folder / "model.safetensors"), {"format": "pt"})
    write_tokenizer(folder, extra)
    (folder / "config.json").write_text(json.dumps(shape.config(spec.dtype), indent=2))
    return folder


def write_lora_adapter(folder: Path, reference: str, layers: int) -> Path:
    """A PEFT LoRA adapter (safetensors) on q_proj and v_proj of every layer."""
    if (folder / "adapter_config.json").exists():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    shape = shape_for(layers, BASE_VOCAB)
    dims = dict(shape.tensors())
    tensors: dict[str, torch.Tensor] = {}
    for layer in range(layers):
        for module in ("q_proj", "v_proj"):
            name = f"model.layers.{layer}.self_attn.{module}"
            out_features, in_features = dims[name + ".weight"]
            generator = torch.Generator().manual_seed(_seed(f"lora|{reference}|{name}"))
            prefix = f"base_model.model.{name}"
            tensors[prefix + ".lora_A.weight"] = 0.1 * torch.randn(
                (LORA_RANK, in_features), generator=generator
            )
            tensors[prefix + ".lora_B.weight"] = 0.1 * torch.randn(
                (out_features, LORA_RANK), generator=generator
            )
    save_file(tensors, str(folder / "adapter_model.safetensors"), {"format": "pt"})
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": LORA_RANK,
        "lora_alpha": 2 * LORA_RANK,
        "lora_dropout": 0.0,
        "target_modules": ["q_proj", "v_proj"],
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "inference_mode": True,
        "base_model_name_or_path": None,
    }
    (folder / "adapter_config.json").write_text(json.dumps(config, indent=2))
    return folder


def _model_fields(document: dict[str, Any]) -> Iterator[tuple[dict[str, Any], str]]:
    """Every (mapping, key) whose value is a model reference, across all config forms."""

    def slices(items: Any) -> Iterator[tuple[dict[str, Any], str]]:
        for slice_ in items or []:
            if slice_.get("base_model") is not None:
                yield slice_, "base_model"
            for source in slice_.get("sources") or []:
                yield source, "model"

    if document.get("base_model") is not None:
        yield document, "base_model"
    for entry in document.get("models") or []:
        yield entry, "model"
    yield from slices(document.get("slices"))
    for module in (document.get("modules") or {}).values():
        for entry in module.get("models") or []:
            yield entry, "model"
        yield from slices(module.get("slices"))
    source = document.get("tokenizer_source")
    if isinstance(source, str) and source not in _NOT_MODELS:
        yield document, "tokenizer_source"
    tokenizer = document.get("tokenizer") or {}
    if isinstance(tokenizer.get("source"), str) and tokenizer["source"] not in _NOT_MODELS:
        yield tokenizer, "source"
    for token in (tokenizer.get("tokens") or {}).values():
        if isinstance(token.get("source"), str):
            yield token, "source"
        elif isinstance(token.get("source"), dict) and "model" in token["source"]:
            yield token["source"], "model"


def _layers_needed(document: dict[str, Any]) -> int:
    ends = [DEFAULT_LAYERS]
    groups = [document.get("slices") or []]
    groups += [m.get("slices") or [] for m in (document.get("modules") or {}).values()]
    for group in groups:
        for slice_ in group:
            for source in slice_.get("sources") or []:
                ends.append(int(source["layer_range"][1]))
    return max(ends)


def uses_vocabulary_union(document: dict[str, Any]) -> bool:
    """Whether the output vocabulary is the union of the inputs' (mergekit's rules)."""
    if document.get("tokenizer_source") == "union":
        return True
    tokenizer = document.get("tokenizer")
    return isinstance(tokenizer, dict) and tokenizer.get("source", "union") == "union"


def document_dtype(document: dict[str, Any]) -> torch.dtype:
    """The dtype the config's checkpoints are stored in (its ``dtype``, else float32)."""
    return _DTYPES.get(str(document.get("dtype")), torch.float32)


@dataclass
class MappedConfig:
    """A config's documents with every reference rewritten to a tiny local folder."""

    documents: list[dict[str, Any]]
    names: list[str | None]
    folders: dict[str, Path]


def map_config(
    documents: list[dict[str, Any]],
    root: Path,
    stage_output: Callable[[str], str] | None = None,
) -> MappedConfig:
    """Build checkpoints under ``root`` for every reference and rewrite the documents.

    Args:
        documents: the config's YAML documents (several for a ``name:`` multi-merge file).
        root: folder shared by every config; checkpoints with equal specs are reused.
        stage_output: maps the ``name`` of an earlier document to the folder its merge is
            written to; references to such names are rewritten to that folder.
    """
    names = [doc.get("name") for doc in documents]
    stages = {n for n in names if n}
    layers = max(_layers_needed(doc) for doc in documents)
    dtype = document_dtype(documents[-1])
    union = any(uses_vocabulary_union(doc) for doc in documents)
    bases = {str(doc["base_model"]) for doc in documents if doc.get("base_model")}
    folders: dict[str, Path] = {}

    def model_folder(reference: str) -> Path:
        spec = ModelSpec(
            reference=reference,
            layers=layers,
            dtype=dtype,
            extra_tokens=(_seed(reference) % (EXTRA_TOKENS + 1)) if union else 0,
            pure_base=reference in bases,
        )
        return write_model(root / "models" / spec.folder_name(), spec)

    def mapped(reference: str) -> str:
        if reference in stages:
            if stage_output is None:
                raise ValueError(f"{reference!r} names a stage but no stage_output was given")
            return stage_output(reference)
        if "+" in reference:
            base, adapter = reference.split("+", 1)
            base_folder = model_folder(base)
            key = hashlib.sha256(f"{adapter}|{layers}".encode()).hexdigest()[:16]
            adapter_folder = write_lora_adapter(root / "adapters" / key, adapter, layers)
            folders[reference] = adapter_folder
            return f"{base_folder}+{adapter_folder}"
        folder = model_folder(reference)
        folders[reference] = folder
        return str(folder)

    rewritten = []
    for doc in documents:
        doc = copy.deepcopy(doc)
        for holder, key in list(_model_fields(doc)):
            holder[key] = mapped(str(holder[key]))
        rewritten.append(doc)
    return MappedConfig(rewritten, names, folders)
