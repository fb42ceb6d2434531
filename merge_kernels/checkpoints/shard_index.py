"""Reading and checking the shard index of a sharded checkpoint.

Sharded Hugging Face checkpoints carry an index (``model.safetensors.index.json`` or
``pytorch_model.bin.index.json``) whose ``weight_map`` names the shard file holding each
tensor. This module reads it, refuses file names that leave the folder, and checks up front
that every shard it names exists, so a partial download fails at open time naming the
missing shard and the tensors that should be in it.
"""

from __future__ import annotations

from pathlib import Path

from merge_kernels.checkpoints.base import load_json_object
from merge_kernels.checkpoints.confinement import UNCONFINED, Confinement
from merge_kernels.errors import CheckpointFileError, CheckpointNotFoundError

_SHOWN = 5


def _shown(names: list[str]) -> str:
    more = f" and {len(names) - _SHOWN} more" if len(names) > _SHOWN else ""
    return ", ".join(names[:_SHOWN]) + more


def load_shard_index(
    index_path: Path, confinement: Confinement = UNCONFINED
) -> dict[Path, list[str]]:
    """Read a shard index and check that every shard it names exists.

    Args:
        index_path: the ``*.index.json`` file; shard names are relative to its folder.
        confinement: where the index and its shards must resolve to.

    Returns:
        Shard file -> the tensor names the index places in it, shards in file-name order
        and tensors in index order.

    Raises:
        CheckpointFileError: the index is not JSON, lacks a ``weight_map`` of strings, or
            names a file outside the folder.
        CheckpointNotFoundError: a shard named in the index does not exist; the message
            names the shard(s) and the tensors that should be in them.
        PathOutsideRootsError: the index or a shard links outside ``confinement``.
    """
    index = load_json_object(index_path, confinement=confinement)
    weight_map = index.get("weight_map")
    if not isinstance(weight_map, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()
    ):
        raise CheckpointFileError(
            f"{index_path} has no 'weight_map' object mapping tensor names to shard file "
            "names; re-download or re-save the checkpoint",
            details={"file": str(index_path)},
        )
    if not weight_map:
        raise CheckpointFileError(
            f"{index_path} lists no tensors; re-download or re-save the checkpoint",
            details={"file": str(index_path)},
        )
    folder = index_path.parent
    by_name: dict[str, list[str]] = {}
    for tensor, file_name in weight_map.items():
        by_name.setdefault(file_name, []).append(tensor)
    shards: dict[Path, list[str]] = {}
    missing: list[str] = []
    missing_tensors: list[str] = []
    for file_name in sorted(by_name):
        relative = Path(file_name)
        if relative.is_absolute() or ".." in relative.parts or not relative.parts:
            raise CheckpointFileError(
                f"{index_path} places tensors in {file_name!r}, which is outside the "
                "checkpoint folder; shard names must be plain file names",
                details={"file": str(index_path), "shard": file_name},
            )
        path = folder / relative
        if not confinement.is_file(path):
            missing.append(file_name)
            missing_tensors.extend(by_name[file_name])
            continue
        shards[path] = by_name[file_name]
    if missing:
        raise CheckpointNotFoundError(
            f"{folder}: shard file(s) {_shown(missing)} named in {index_path.name} do not "
            f"exist; they should hold {len(missing_tensors)} tensor(s) "
            f"({_shown(missing_tensors)}). The download is incomplete: download the missing "
            "shard(s) again",
            details={"folder": str(folder), "missing_files": missing, "tensors": missing_tensors},
        )
    return shards


def check_shard_contents(
    index_path: Path, shard: Path, expected: list[str], actual: set[str]
) -> None:
    """Check that a shard holds exactly the tensors the index places in it.

    Args:
        index_path: the index, for messages.
        shard: the shard file, for messages.
        expected: tensor names the index places in ``shard``.
        actual: tensor names the shard really holds.

    Raises:
        CheckpointFileError: a listed tensor is absent from the shard, or the shard holds
            tensors the index does not list; both name the tensors.
    """
    absent = [name for name in expected if name not in actual]
    if absent:
        raise CheckpointFileError(
            f"{index_path.name} places {len(absent)} tensor(s) in {shard.name} that it does "
            f"not hold ({_shown(absent)}); the index and the shard disagree. Re-download or "
            "re-save the checkpoint",
            details={"file": str(shard), "tensors": absent},
        )
    listed = set(expected)
    extra = sorted(name for name in actual if name not in listed)
    if extra:
        raise CheckpointFileError(
            f"{shard.name} holds {len(extra)} tensor(s) that {index_path.name} does not place "
            f"in it ({_shown(extra)}); the index and the shard disagree. Re-download or "
            "re-save the checkpoint",
            details={"file": str(shard), "tensors": extra},
        )
