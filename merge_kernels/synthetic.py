"""Synthetic Llama-layout checkpoints: a base and fine-tunes with small deltas.

For trying tureen without downloading anything, for tests that need real files, and for
benchmarks of a chosen size. The files are ordinary safetensors checkpoints with a
``config.json`` that transformers loads as ``LlamaForCausalLM``.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from merge_kernels.io.dtypes import dtype_code
from merge_kernels.io.shard_plan import OutputTensor, index_json, plan_shards
from merge_kernels.io.shard_writer import ShardWriter


@dataclass(frozen=True)
class LlamaShape:
    """The dimensions of a Llama-architecture model."""

    vocab_size: int = 256
    hidden_size: int = 64
    intermediate_size: int = 172
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    tie_word_embeddings: bool = False

    def tensors(self) -> list[tuple[str, tuple[int, ...]]]:
        """Tensor names and shapes, in the order transformers saves them."""
        h, i, v = self.hidden_size, self.intermediate_size, self.vocab_size
        kv = h // self.num_attention_heads * self.num_key_value_heads
        names: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (v, h))]
        for layer in range(self.num_hidden_layers):
            p = f"model.layers.{layer}."
            names += [
                (p + "self_attn.q_proj.weight", (h, h)),
                (p + "self_attn.k_proj.weight", (kv, h)),
                (p + "self_attn.v_proj.weight", (kv, h)),
                (p + "self_attn.o_proj.weight", (h, h)),
                (p + "mlp.gate_proj.weight", (i, h)),
                (p + "mlp.up_proj.weight", (i, h)),
                (p + "mlp.down_proj.weight", (h, i)),
                (p + "input_layernorm.weight", (h,)),
                (p + "post_attention_layernorm.weight", (h,)),
            ]
        names.append(("model.norm.weight", (h,)))
        if not self.tie_word_embeddings:
            names.append(("lm_head.weight", (v, h)))
        return names

    def config(self, dtype: torch.dtype) -> dict[str, object]:
        """A transformers ``LlamaConfig`` as JSON."""
        return {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "max_position_embeddings": 256,
            "rms_norm_eps": 1e-5,
            "tie_word_embeddings": self.tie_word_embeddings,
            "torch_dtype": str(dtype).removeprefix("torch."),
            "hidden_act": "silu",
        }

    def parameters(self) -> int:
        """Number of parameters."""
        return sum(math.prod(shape) for _, shape in self.tensors())


def shape_for_bytes(target_bytes: int, dtype: torch.dtype = torch.bfloat16) -> LlamaShape:
    """A Llama shape whose checkpoint is about ``target_bytes`` in ``dtype``."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    hidden = 2048
    per_layer = LlamaShape(
        hidden_size=hidden,
        intermediate_size=5632,
        num_hidden_layers=1,
        num_attention_heads=16,
        num_key_value_heads=4,
        vocab_size=32000,
    )
    fixed = 2 * 32000 * hidden * itemsize
    layer_bytes = (per_layer.parameters() - 2 * 32000 * hidden - hidden) * itemsize
    layers = max(1, round((target_bytes - fixed) / layer_bytes))
    return LlamaShape(
        hidden_size=hidden,
        intermediate_size=5632,
        num_hidden_layers=layers,
        num_attention_heads=16,
        num_key_value_heads=4,
        vocab_size=32000,
    )


def write_checkpoint(
    folder: Path,
    shape: LlamaShape,
    *,
    seed: int,
    dtype: torch.dtype = torch.float32,
    base_seed: int | None = None,
    delta_scale: float = 0.01,
    max_shard_bytes: int = 5 * 1000**3,
) -> Path:
    """Write a checkpoint of ``shape`` into ``folder``, tensor by tensor.

    With ``base_seed`` the weights are the base's (drawn from ``base_seed``) plus a delta of
    relative size ``delta_scale`` drawn from ``seed``: a synthetic fine-tune. Memory stays at
    about one tensor.
    """
    folder.mkdir(parents=True, exist_ok=True)
    code = dtype_code(dtype)
    names = shape.tensors()
    shards = plan_shards([OutputTensor(n, code, s) for n, s in names], max_shard_bytes)
    by_name = dict(names)
    for spec in shards:
        with ShardWriter(folder, spec) as writer:
            for tensor in spec.tensors:
                writer.write(
                    tensor.name,
                    _weights(tensor.name, by_name[tensor.name], seed, base_seed, delta_scale).to(
                        dtype
                    ),
                )
            writer.finish()
    if len(shards) > 1:
        (folder / "model.safetensors.index.json").write_text(
            json.dumps(index_json(shards), indent=2)
        )
    (folder / "config.json").write_text(json.dumps(shape.config(dtype), indent=2))
    return folder


def _weights(
    name: str, shape: tuple[int, ...], seed: int, base_seed: int | None, scale: float
) -> torch.Tensor:
    key = sum(name.encode()) * 7919 + len(name)
    generator = torch.Generator().manual_seed(
        (base_seed if base_seed is not None else seed) * 1_000_003 + key
    )
    if len(shape) == 1:
        base = torch.ones(shape) + 0.1 * torch.randn(shape, generator=generator)
    else:
        base = torch.randn(shape, generator=generator) * (1.0 / math.sqrt(shape[-1]))
    if base_seed is None:
        return base
    generator.manual_seed(seed * 1_000_003 + key + 1)
    return base + scale * base.abs().mean() * torch.randn(shape, generator=generator)
