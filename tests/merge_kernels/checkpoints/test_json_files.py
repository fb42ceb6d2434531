"""A checkpoint's JSON files (config, shard index) that cannot be parsed give file errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from merge_kernels.checkpoints import LocalCheckpoint
from merge_kernels.errors import CheckpointFileError
from merge_kernels.synthetic import LlamaShape, write_checkpoint

TINY = LlamaShape(hidden_size=16, intermediate_size=32, num_hidden_layers=1, vocab_size=32)
DEEP = "[" * 100_000 + "]" * 100_000  # far past Python's recursion limit


def test_deeply_nested_config(tmp_path: Path) -> None:
    folder = tmp_path / "model"
    write_checkpoint(folder, TINY, seed=0)
    (folder / "config.json").write_text('{"a": ' + DEEP + "}")
    with LocalCheckpoint(folder) as checkpoint, pytest.raises(CheckpointFileError) as info:
        checkpoint.config  # noqa: B018 - reading the property parses the file
    assert "too deeply" in info.value.message
    assert info.value.details["file"] == str(folder / "config.json")


def test_deeply_nested_shard_index(tmp_path: Path) -> None:
    folder = tmp_path / "model"
    write_checkpoint(folder, TINY, seed=0, max_shard_bytes=4096)
    index = folder / "model.safetensors.index.json"
    assert index.is_file()
    index.write_text('{"weight_map": ' + DEEP + "}")
    with pytest.raises(CheckpointFileError) as info:
        LocalCheckpoint(folder)
    assert "too deeply" in info.value.message
    assert info.value.details["file"] == str(index)
