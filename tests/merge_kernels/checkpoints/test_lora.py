"""LoRA adapters applied tensor by tensor must equal PEFT's merge_and_unload()."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from merge_kernels.checkpoints import LocalCheckpoint, LoraCheckpoint, LoraRef, open_checkpoint
from merge_kernels.errors import CheckpointFileError, CheckpointNotFoundError, UnsafeCheckpointError
from tests.merge_kernels.checkpoints.tiny_models import (
    make_lora_adapter,
    save_tiny_gpt2,
    save_tiny_llama,
)

pytestmark = [
    pytest.mark.filterwarnings("ignore::UserWarning"),
    pytest.mark.filterwarnings("ignore::FutureWarning"),
]

ADAPTERS: dict[str, tuple[str, dict[str, Any]]] = {
    "qv_lm_head": (
        "llama",
        {
            "r": 4,
            "lora_alpha": 8,
            "target_modules": ["q_proj", "v_proj"],
            "modules_to_save": ["lm_head"],
        },
    ),
    "rslora_patterns": (
        "llama",
        {
            "r": 4,
            "lora_alpha": 16,
            "use_rslora": True,
            "target_modules": ["q_proj", "o_proj", "gate_proj", "down_proj"],
            "rank_pattern": {"o_proj": 2, r"layers\.1\.mlp\.down_proj": 6},
            "alpha_pattern": {"layers.1.self_attn.q_proj": 3},
        },
    ),
    "embedding": ("llama", {"r": 4, "lora_alpha": 8, "target_modules": ["embed_tokens", "k_proj"]}),
    "gpt2_fan_in_fan_out_bias": (
        "gpt2",
        {
            "r": 4,
            "lora_alpha": 6,
            "target_modules": ["c_attn", "c_proj"],
            "fan_in_fan_out": True,
            "lora_bias": True,
            "bias": "lora_only",
        },
    ),
    "gpt2_bias_all": (
        "gpt2",
        {
            "r": 2,
            "lora_alpha": 2,
            "target_modules": ["c_fc"],
            "fan_in_fan_out": True,
            "bias": "all",
        },
    ),
}


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("lora")
    bases = {"llama": save_tiny_llama(root / "llama"), "gpt2": save_tiny_gpt2(root / "gpt2")}
    merged = {
        name: make_lora_adapter(bases[base], root / name, **kwargs)
        for name, (base, kwargs) in ADAPTERS.items()
    }
    return {"root": root, "bases": bases, "merged": merged}


def _max_rel(a: torch.Tensor, b: torch.Tensor) -> float:
    scale = max(b.abs().max().item(), 1e-12)
    return (a.float() - b.float()).abs().max().item() / scale


@pytest.mark.parametrize("adapter", list(ADAPTERS))
def test_matches_peft_merge_and_unload(built: dict[str, Any], adapter: str) -> None:
    base_name = ADAPTERS[adapter][0]
    root = built["root"]
    expected = built["merged"][adapter]
    base_state = built["bases"][base_name].state_dict()
    with open_checkpoint(f"{root / base_name}+{root / adapter}") as ckpt:
        assert isinstance(ckpt, LoraCheckpoint)
        entries = ckpt.entries()
        assert set(entries) <= set(expected)
        changed = 0
        for name, entry in entries.items():
            tensor = ckpt.read(name)
            assert tensor.dtype == expected[name].dtype == entry.torch_dtype, name
            assert tuple(tensor.shape) == tuple(expected[name].shape) == entry.shape, name
            assert _max_rel(tensor, expected[name]) <= 1e-6, name
            changed += not torch.equal(expected[name], base_state[name])
        assert changed >= len(ckpt.adapted_tensors()) - 1
        assert changed > 0


@pytest.mark.parametrize("adapter", list(ADAPTERS))
def test_read_rows_chunks_equal_read(built: dict[str, Any], adapter: str) -> None:
    base_name = ADAPTERS[adapter][0]
    root = built["root"]
    with open_checkpoint(f"{root / base_name}+{root / adapter}") as ckpt:
        assert isinstance(ckpt, LoraCheckpoint)
        for name in ckpt.adapted_tensors():
            whole = ckpt.read(name)
            rows = whole.shape[0]
            chunks = [ckpt.read_rows(name, i, min(i + 5, rows)) for i in range(0, rows, 5)]
            assert torch.allclose(torch.cat(chunks), whole, rtol=1e-6, atol=1e-7), name


def test_bf16_base_matches_peft(tmp_path: Path) -> None:
    base = save_tiny_llama(tmp_path / "base", dtype=torch.bfloat16, seed=5)
    expected = make_lora_adapter(
        base, tmp_path / "adapter", r=4, lora_alpha=8, target_modules=["q_proj", "up_proj"]
    )
    with open_checkpoint(f"{tmp_path / 'base'}+{tmp_path / 'adapter'}") as ckpt:
        for name in ckpt.entries():
            tensor = ckpt.read(name)
            assert tensor.dtype == torch.bfloat16
            # PEFT adds in place in bf16; both round the float32 sum once.
            assert torch.allclose(tensor.float(), expected[name].float(), rtol=1e-2, atol=1e-2)


def test_metadata_comes_from_base(built: dict[str, Any]) -> None:
    root = built["root"]
    base = LocalCheckpoint(root / "llama")
    with LoraCheckpoint(base, root / "qv_lm_head") as ckpt:
        assert ckpt.folder == root / "llama"
        assert ckpt.config == base.config
        assert ckpt.has_config
        assert ckpt.entries() == base.entries()
        assert ckpt.files() == [
            root / "llama" / "model.safetensors",
            root / "qv_lm_head" / "adapter_model.safetensors",
        ]
        assert isinstance(ckpt.ref, LoraRef)
        assert "+" in ckpt.display_name
        assert ckpt.settings.modules_to_save == ("lm_head",)
        assert "lm_head.weight" in ckpt.adapted_tensors()


def _copy_adapter(built: dict[str, Any], tmp_path: Path, name: str = "qv_lm_head") -> Path:
    folder = tmp_path / f"copy-{name}"
    shutil.copytree(built["root"] / name, folder)
    return folder


def _edit_config(folder: Path, **changes: Any) -> None:
    path = folder / "adapter_config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        ({"use_dora": True}, "DoRA"),
        ({"peft_type": "IA3"}, "'IA3' is not supported"),
        ({"init_lora_weights": "pissa"}, "path_initial_model_for_weight_conversion"),
        ({"layer_replication": [[0, 2]]}, "layer_replication"),
        ({"trainable_token_indices": [1, 2]}, "trainable_token_indices"),
        ({"rank_pattern": {"q_proj": 7}}, "do not fit"),
        ({"rank_pattern": {"(": 2}}, "regular expression"),
    ],
)
def test_unsupported_configs_are_refused(
    built: dict[str, Any], tmp_path: Path, changes: dict[str, Any], match: str
) -> None:
    adapter = _copy_adapter(built, tmp_path)
    _edit_config(adapter, **changes)
    with pytest.raises(CheckpointFileError, match=match):
        open_checkpoint(f"{built['root'] / 'llama'}+{adapter}")


def test_unmatched_adapter_tensors_are_named(built: dict[str, Any], tmp_path: Path) -> None:
    adapter = _copy_adapter(built, tmp_path)
    weights = adapter / "adapter_model.safetensors"
    tensors = load_file(weights)
    tensors["base_model.model.model.not_a_layer.weight"] = torch.zeros(3)
    save_file(tensors, weights)
    with pytest.raises(CheckpointFileError, match="not_a_layer") as info:
        open_checkpoint(f"{built['root'] / 'llama'}+{adapter}")
    assert info.value.details["tensors"] == ["base_model.model.model.not_a_layer.weight"]

    tensors = load_file(weights)
    del tensors["base_model.model.model.not_a_layer.weight"]
    tensors["base_model.model.model.layers.7.self_attn.q_proj.lora_A.weight"] = torch.zeros(4, 32)
    tensors["base_model.model.model.layers.7.self_attn.q_proj.lora_B.weight"] = torch.zeros(32, 4)
    save_file(tensors, weights)
    with pytest.raises(CheckpointFileError, match=r"layers\.7\.self_attn\.q_proj"):
        open_checkpoint(f"{built['root'] / 'llama'}+{adapter}")


def test_half_a_pair_and_wrong_shapes(built: dict[str, Any], tmp_path: Path) -> None:
    adapter = _copy_adapter(built, tmp_path)
    weights = adapter / "adapter_model.safetensors"
    original = load_file(weights)
    key_b = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"
    save_file({k: v for k, v in original.items() if k != key_b}, weights)
    with pytest.raises(CheckpointFileError, match="only one of its two"):
        open_checkpoint(f"{built['root'] / 'llama'}+{adapter}")
    save_file({**original, "base_model.model.lm_head.weight": torch.zeros(3, 3)}, weights)
    with pytest.raises(CheckpointFileError, match="resize the base"):
        open_checkpoint(f"{built['root'] / 'llama'}+{adapter}")


def test_adapter_files_missing(built: dict[str, Any], tmp_path: Path) -> None:
    adapter = _copy_adapter(built, tmp_path)
    (adapter / "adapter_model.safetensors").unlink()
    with pytest.raises(CheckpointNotFoundError, match=r"adapter_model\.safetensors"):
        open_checkpoint(f"{built['root'] / 'llama'}+{adapter}")
    adapter = _copy_adapter(built, tmp_path, "embedding")
    (adapter / "adapter_config.json").unlink()
    with pytest.raises(CheckpointNotFoundError, match=r"adapter_config\.json"):
        open_checkpoint(f"{built['root'] / 'llama'}+{adapter}")


def test_pickle_adapter_refused_then_allowed(built: dict[str, Any], tmp_path: Path) -> None:
    adapter = _copy_adapter(built, tmp_path)
    weights = adapter / "adapter_model.safetensors"
    torch.save(load_file(weights), adapter / "adapter_model.bin")
    weights.unlink()
    ref = f"{built['root'] / 'llama'}+{adapter}"
    with pytest.raises(UnsafeCheckpointError, match="arbitrary code"):
        open_checkpoint(ref)
    expected = built["merged"]["qv_lm_head"]
    with open_checkpoint(ref, allow_pickle=True) as ckpt:
        for name in ckpt.entries():
            assert _max_rel(ckpt.read(name), expected[name]) <= 1e-6


def test_prefixless_adapter_keys(built: dict[str, Any], tmp_path: Path) -> None:
    # Adapters saved through transformers' PEFT integration have no "base_model.model." prefix.
    adapter = _copy_adapter(built, tmp_path)
    weights = adapter / "adapter_model.safetensors"
    save_file(
        {k.removeprefix("base_model.model."): v for k, v in load_file(weights).items()}, weights
    )
    expected = built["merged"]["qv_lm_head"]
    with open_checkpoint(f"{built['root'] / 'llama'}+{adapter}") as ckpt:
        for name in ckpt.entries():
            assert _max_rel(ckpt.read(name), expected[name]) <= 1e-6
