"""Opt-in reading of pickle-based weights (``pytorch_model.bin``, ``*.pt``).

Unpickling can run arbitrary code, so tureen refuses pickle weights unless the caller passes
``allow_pickle=True``. Even then files are loaded with torch's restricted unpickler
(``weights_only=True``), which only rebuilds tensors and plain containers, and memory-mapped
(``mmap=True``) so a shard costs no memory until its tensors are read.
"""

from __future__ import annotations

import pickle
import threading
from collections.abc import Mapping
from pathlib import Path
from types import MappingProxyType

import torch

from merge_kernels.checkpoints.base import check_row_range
from merge_kernels.checkpoints.shard_index import check_shard_contents
from merge_kernels.errors import CheckpointFileError, UnsafeCheckpointError
from merge_kernels.io.dtypes import dtype_code
from merge_kernels.io.safetensors_header import TensorEntry

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")

CONVERT_HINT = (
    'Convert it to safetensors once, on a machine you trust: python -c "from transformers '
    "import AutoModelForCausalLM as M; M.from_pretrained('IN').save_pretrained('OUT', "
    'safe_serialization=True)" (for an adapter: load it with peft and save_pretrained with '
    "safe_serialization=True). If you trust the file, allow_pickle=True loads it through "
    "torch's restricted weights-only unpickler instead."
)


def refuse_pickle(folder: Path, names: list[str]) -> UnsafeCheckpointError:
    """Build the error for pickle weights found while ``allow_pickle`` is off.

    Args:
        folder: the checkpoint folder.
        names: the pickle file names found.

    Returns:
        The error to raise; its message explains the risk and how to convert.
    """
    return UnsafeCheckpointError(
        f"{folder} holds pickle weights ({', '.join(names)}) and no safetensors weights. "
        "Loading a pickle can run arbitrary code, so tureen refuses it. " + CONVERT_HINT,
        details={"folder": str(folder), "files": names},
    )


def load_pickle_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Load a flat ``name -> tensor`` dict with torch's restricted unpickler.

    Args:
        path: a ``torch.save`` file.

    Returns:
        The state dict, memory-mapped when the file uses torch's zip format.

    Raises:
        UnsafeCheckpointError: the file holds objects the restricted unpickler refuses.
        CheckpointFileError: the file is unreadable or not a flat dict of tensors.
    """
    try:
        try:
            loaded: object = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as exc:
            # Legacy (pre-zip) torch.save files cannot be memory-mapped.
            if "mmap" not in str(exc):
                raise
            loaded = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise UnsafeCheckpointError(
            f"{path} holds objects other than tensors, which torch's restricted unpickler "
            f"refuses ({str(exc).splitlines()[0]}). " + CONVERT_HINT,
            details={"file": str(path)},
        ) from None
    except (OSError, RuntimeError, EOFError, ValueError) as exc:
        raise CheckpointFileError(
            f"{path} cannot be loaded as a torch checkpoint ({exc}); re-download or re-save it",
            details={"file": str(path)},
        ) from None
    if not isinstance(loaded, Mapping) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in loaded.items()
    ):
        raise CheckpointFileError(
            f"{path} is not a flat mapping of tensor names to tensors; save the model's "
            "state_dict() (or convert to safetensors)",
            details={"file": str(path)},
        )
    return dict(loaded)


class PickleWeights:
    """Tensors of one or more pickle files, loaded lazily and kept memory-mapped.

    ``entries`` reports file order and virtual byte offsets (a running sum of tensor sizes
    per file), since pickle files have no header giving real ones.
    """

    def __init__(
        self, files: list[Path], *, index_path: Path | None = None, shards: dict[Path, list[str]]
    ) -> None:
        """Describe the pickle files to read.

        Args:
            files: the weight files, in reading order.
            index_path: the shard index, when there is one (for messages).
            shards: file -> tensors the index places in it (empty lists when unindexed).
        """
        self._files = files
        self._index_path = index_path
        self._shards = shards
        self._loaded: dict[Path, dict[str, torch.Tensor]] = {}
        self._entries: Mapping[str, TensorEntry] | None = None
        self._where: dict[str, Path] = {}
        self._lock = threading.Lock()

    def _state(self, path: Path) -> dict[str, torch.Tensor]:
        with self._lock:
            if path not in self._loaded:
                state = load_pickle_state_dict(path)
                if self._index_path is not None:
                    check_shard_contents(self._index_path, path, self._shards[path], set(state))
                self._loaded[path] = state
            return self._loaded[path]

    def entries(self) -> Mapping[str, TensorEntry]:
        """Describe every tensor, loading (memory-mapping) every file."""
        if self._entries is None:
            entries: dict[str, TensorEntry] = {}
            for path in self._files:
                offset = 0
                for name, tensor in self._state(path).items():
                    if name in entries:
                        raise CheckpointFileError(
                            f"tensor {name!r} appears in both {self._where[name].name} and "
                            f"{path.name}; re-save the checkpoint",
                            details={"file": str(path), "tensor": name},
                        )
                    nbytes = tensor.numel() * tensor.element_size()
                    entries[name] = TensorEntry(
                        name=name,
                        dtype=dtype_code(tensor.dtype),
                        shape=tuple(tensor.shape),
                        begin=offset,
                        end=offset + nbytes,
                    )
                    self._where[name] = path
                    offset += nbytes
            self._entries = MappingProxyType(entries)
        return self._entries

    def _tensor(self, name: str) -> torch.Tensor:
        self.entries()
        return self._state(self._where[name])[name]

    def read(self, name: str) -> torch.Tensor:
        """Return a copy of tensor ``name`` (so the copy outlives the mapping)."""
        return self._tensor(name).clone(memory_format=torch.contiguous_format)

    def read_rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Return a copy of rows ``start:stop`` of tensor ``name``."""
        check_row_range(self.entries()[name], start, stop)
        return self._tensor(name)[start:stop].clone(memory_format=torch.contiguous_format)

    def files(self) -> list[Path]:
        """The pickle files."""
        return list(self._files)

    def close(self) -> None:
        """Drop the loaded state dicts (and with them the memory maps)."""
        with self._lock:
            self._loaded.clear()
            self._entries = None
            self._where.clear()
