"""Local folders: single and sharded safetensors, index checks, pickle refusal and opt-in."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open

from merge_kernels.checkpoints import LocalCheckpoint, open_checkpoint
from merge_kernels.errors import CheckpointFileError, CheckpointNotFoundError, UnsafeCheckpointError
from tests.merge_kernels.checkpoints.tiny_models import save_pickle_copy, save_tiny_llama


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("local")
    model = save_tiny_llama(root / "single")
    save_tiny_llama(root / "sharded", max_shard_size="20KB")
    save_tiny_llama(root / "bf16", dtype=torch.bfloat16, seed=3)
    state = save_pickle_copy(model, root / "pickle")
    return {"root": root, "model": model, "pickle_state": state}


def _safe_open_all(folder: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(path, "pt") as f:
            for name in f.keys():  # noqa: SIM118 - safe_open has no __iter__
                out[name] = f.get_tensor(name)
    return out


@pytest.mark.parametrize("layout", ["single", "sharded", "bf16"])
def test_round_trip_matches_safe_open(saved: dict[str, Any], layout: str) -> None:
    folder = saved["root"] / layout
    expected = _safe_open_all(folder)
    with open_checkpoint(str(folder)) as ckpt:
        entries = ckpt.entries()
        assert set(entries) == set(expected)
        for name, entry in entries.items():
            tensor = ckpt.read(name)
            assert entry.shape == tuple(expected[name].shape)
            assert entry.torch_dtype == expected[name].dtype == tensor.dtype
            assert torch.equal(tensor, expected[name])
            rows = entry.shape[0]
            chunks = [ckpt.read_rows(name, i, min(i + 7, rows)) for i in range(0, rows, 7)]
            assert torch.equal(torch.cat(chunks), tensor)
        assert ckpt.has_config
        assert ckpt.config["model_type"] == "llama"
        assert ckpt.revision is None
        assert ckpt.display_name == str(folder)


def test_sharded_order_follows_files(saved: dict[str, Any]) -> None:
    folder = saved["root"] / "sharded"
    with LocalCheckpoint(folder) as ckpt:
        files = ckpt.files()
        assert files == sorted(folder.glob("model-*.safetensors"))
        assert len(files) > 2
        index = json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]
        positions = [(files.index(folder / index[n]), e.begin) for n, e in ckpt.entries().items()]
        assert positions == sorted(positions)


def test_missing_shard_is_named(saved: dict[str, Any], tmp_path: Path) -> None:
    folder = tmp_path / "partial"
    shutil.copytree(saved["root"] / "sharded", folder)
    index = json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]
    victim = sorted(set(index.values()))[1]
    (folder / victim).unlink()
    held = sorted(name for name, file in index.items() if file == victim)
    with pytest.raises(CheckpointNotFoundError) as info:
        open_checkpoint(folder)
    assert victim in info.value.message
    assert held[0] in info.value.message
    assert info.value.details["missing_files"] == [victim]


def test_index_that_lies_about_a_shard(saved: dict[str, Any], tmp_path: Path) -> None:
    folder = tmp_path / "lying"
    shutil.copytree(saved["root"] / "sharded", folder)
    index_path = folder / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    names = sorted(index["weight_map"])
    moved = names[0]
    other = next(
        f for f in sorted(set(index["weight_map"].values())) if f != index["weight_map"][moved]
    )
    index["weight_map"][moved] = other
    index_path.write_text(json.dumps(index))
    with LocalCheckpoint(folder) as ckpt, pytest.raises(CheckpointFileError, match=moved):
        ckpt.entries()


def test_index_escaping_the_folder(saved: dict[str, Any], tmp_path: Path) -> None:
    folder = tmp_path / "escape"
    shutil.copytree(saved["root"] / "sharded", folder)
    index_path = folder / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    first = next(iter(index["weight_map"]))
    index["weight_map"][first] = "../elsewhere.safetensors"
    index_path.write_text(json.dumps(index))
    with pytest.raises(CheckpointFileError, match="outside the checkpoint folder"):
        LocalCheckpoint(folder)


def test_folder_problems(saved: dict[str, Any], tmp_path: Path) -> None:
    with pytest.raises(CheckpointNotFoundError, match="does not exist"):
        LocalCheckpoint(tmp_path / "nope")
    with pytest.raises(CheckpointNotFoundError, match="is a file"):
        LocalCheckpoint(saved["root"] / "single" / "model.safetensors")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointNotFoundError, match=r"expected model\.safetensors"):
        LocalCheckpoint(tmp_path / "empty")
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    (adapter / "adapter_model.safetensors").write_bytes(b"")
    with pytest.raises(CheckpointNotFoundError, match="PEFT adapter"):
        LocalCheckpoint(adapter)


def test_without_config(saved: dict[str, Any], tmp_path: Path) -> None:
    folder = tmp_path / "bare"
    folder.mkdir()
    shutil.copy(saved["root"] / "single" / "model.safetensors", folder)
    with LocalCheckpoint(folder) as ckpt:
        assert not ckpt.has_config
        assert ckpt.config == {}
        assert len(ckpt.entries()) > 0


def test_truncated_file_is_reported(saved: dict[str, Any], tmp_path: Path) -> None:
    folder = tmp_path / "trunc"
    shutil.copytree(saved["root"] / "single", folder)
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    with LocalCheckpoint(folder) as ckpt, pytest.raises(CheckpointFileError, match="truncated"):
        ckpt.entries()


def test_pickle_refused_by_default(saved: dict[str, Any]) -> None:
    with pytest.raises(UnsafeCheckpointError) as info:
        open_checkpoint(saved["root"] / "pickle")
    message = info.value.message
    assert "arbitrary code" in message
    assert "safe_serialization=True" in message
    assert "pytorch_model.bin" in message


def test_pickle_opt_in_loads(saved: dict[str, Any]) -> None:
    state = saved["pickle_state"]
    with open_checkpoint(saved["root"] / "pickle", allow_pickle=True) as ckpt:
        entries = ckpt.entries()
        assert list(entries) == list(state)
        for name, tensor in state.items():
            assert entries[name].shape == tuple(tensor.shape)
            assert entries[name].dtype == "F32"
            assert torch.equal(ckpt.read(name), tensor)
            assert torch.equal(ckpt.read_rows(name, 1, 3), tensor[1:3])
        assert ckpt.files() == [saved["root"] / "pickle" / "pytorch_model.bin"]


def test_sharded_pickle_opt_in(saved: dict[str, Any], tmp_path: Path) -> None:
    state = saved["pickle_state"]
    names = list(state)
    half = len(names) // 2
    shards = {
        "pytorch_model-00001-of-00002.bin": names[:half],
        "pytorch_model-00002-of-00002.bin": names[half:],
    }
    for file, members in shards.items():
        torch.save({n: state[n] for n in members}, tmp_path / file)
    weight_map = {n: f for f, members in shards.items() for n in members}
    (tmp_path / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(UnsafeCheckpointError):
        LocalCheckpoint(tmp_path)
    with LocalCheckpoint(tmp_path, allow_pickle=True) as ckpt:
        assert list(ckpt.entries()) == names
        assert torch.equal(ckpt.read(names[-1]), state[names[-1]])


class _NotATensor:
    pass


def test_restricted_unpickler_still_refuses_objects(tmp_path: Path) -> None:
    torch.save({"w": torch.ones(2), "payload": _NotATensor()}, tmp_path / "pytorch_model.bin")
    with pytest.raises(UnsafeCheckpointError, match="restricted unpickler"):
        LocalCheckpoint(tmp_path, allow_pickle=True).entries()


def test_close_is_idempotent(saved: dict[str, Any]) -> None:
    ckpt = LocalCheckpoint(saved["root"] / "sharded")
    name = next(iter(ckpt.entries()))
    ckpt.read(name)
    ckpt.close()
    ckpt.close()
    assert torch.equal(ckpt.read(name), _safe_open_all(saved["root"] / "sharded")[name])
    ckpt.close()
