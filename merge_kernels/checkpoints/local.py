"""Checkpoints in a local folder, in the Hugging Face ``save_pretrained`` layout.

Weights are ``model.safetensors``, or shards ``model-XXXXX-of-YYYYY.safetensors`` listed
in ``model.safetensors.index.json``; ``config.json`` and tokenizer files sit beside them.
Headers are read lazily, once per file, and readers stay open until ``close()``. Pickle
weights (``pytorch_model.bin`` and friends) are refused unless ``allow_pickle`` is set,
because unpickling can run arbitrary code.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from pathlib import Path
from types import MappingProxyType

import torch

from merge_kernels.checkpoints.base import Checkpoint, check_row_range
from merge_kernels.checkpoints.confinement import UNCONFINED, Confinement
from merge_kernels.checkpoints.pickle_import import PICKLE_SUFFIXES, PickleWeights, refuse_pickle
from merge_kernels.checkpoints.reference import CheckpointRef, LocalRef
from merge_kernels.checkpoints.shard_index import check_shard_contents, load_shard_index
from merge_kernels.errors import CheckpointFileError, CheckpointNotFoundError
from merge_kernels.io.reader import SafetensorsReader
from merge_kernels.io.safetensors_header import SafetensorsHeader, TensorEntry, read_header

SAFETENSORS_NAME = "model.safetensors"
SAFETENSORS_INDEX_NAME = "model.safetensors.index.json"
PICKLE_NAME = "pytorch_model.bin"
PICKLE_INDEX_NAME = "pytorch_model.bin.index.json"
ADAPTER_CONFIG_NAME = "adapter_config.json"


class SafetensorsWeights:
    """The tensors of one or more safetensors files, read through lazily opened readers."""

    def __init__(
        self,
        shards: dict[Path, list[str]] | list[Path],
        index_path: Path | None,
        confinement: Confinement = UNCONFINED,
    ) -> None:
        """Describe the files to read.

        Args:
            shards: with an index, file -> tensor names the index places in it; without
                one, the list of files (every tensor in them is read).
            index_path: the shard index, or None for unindexed files.
            confinement: where every file must resolve to when opened.
        """
        self._confinement = confinement
        self._files = list(shards)
        self._index = shards if isinstance(shards, dict) else None
        self._index_path = index_path
        self._where: dict[str, Path] = {}
        if self._index is not None:
            self._where = {name: path for path, names in self._index.items() for name in names}
        self._headers: dict[Path, SafetensorsHeader] = {}
        self._readers: dict[Path, SafetensorsReader] = {}
        self._entries: Mapping[str, TensorEntry] | None = None
        self._lock = threading.Lock()

    def header(self, path: Path) -> SafetensorsHeader:
        """Return the validated header of ``path``, reading it on first use."""
        with self._lock:
            header = self._headers.get(path)
            if header is None:
                header = read_header(path, open_fd=self._confinement.open_fd)
                if self._index is not None and self._index_path is not None:
                    check_shard_contents(
                        self._index_path, path, self._index[path], set(header.tensors)
                    )
                self._headers[path] = header
            return header

    def _reader(self, path: Path) -> SafetensorsReader:
        header = self.header(path)
        with self._lock:
            reader = self._readers.get(path)
            if reader is None:
                reader = SafetensorsReader(path, header, open_fd=self._confinement.open_fd)
                self._readers[path] = reader
            return reader

    def entries(self) -> Mapping[str, TensorEntry]:
        """Every tensor, ordered by (file, offset); reads every header once."""
        if self._entries is None:
            entries: dict[str, TensorEntry] = {}
            where: dict[str, Path] = {}
            for path in self._files:
                for name, entry in self.header(path).tensors.items():
                    if name in entries:
                        raise CheckpointFileError(
                            f"tensor {name!r} appears in both {where[name].name} and "
                            f"{path.name}; re-save the checkpoint",
                            details={"file": str(path), "tensor": name},
                        )
                    entries[name] = entry
                    where[name] = path
            self._where = where
            self._entries = MappingProxyType(entries)
        return self._entries

    def _locate(self, name: str) -> Path:
        path = self._where.get(name)
        if path is None:
            self.entries()
            path = self._where[name]
        return path

    def entry(self, name: str) -> TensorEntry:
        """The header entry of tensor ``name``.

        Raises:
            KeyError: no such tensor.
        """
        return self.header(self._locate(name)).tensors[name]

    def read(self, name: str) -> torch.Tensor:
        """Read tensor ``name`` in its file dtype."""
        return self._reader(self._locate(name)).read(name)

    def read_rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Read rows ``start:stop`` of tensor ``name``."""
        path = self._locate(name)
        check_row_range(self.header(path).tensors[name], start, stop)
        return self._reader(path).read_rows(name, start, stop)

    def files(self) -> list[Path]:
        """The weight files."""
        return list(self._files)

    def close(self) -> None:
        """Close every open reader. Idempotent."""
        with self._lock:
            readers = list(self._readers.values())
            self._readers.clear()
        for reader in readers:
            reader.close()


def _pickle_files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES and p.is_file())


def open_weights(
    folder: Path, *, allow_pickle: bool, confinement: Confinement = UNCONFINED
) -> SafetensorsWeights | PickleWeights:
    """Find and describe the weights of a ``save_pretrained`` folder.

    Looks for, in order: ``model.safetensors``, ``model.safetensors.index.json``, then (only
    with ``allow_pickle``) ``pytorch_model.bin``, ``pytorch_model.bin.index.json`` or a
    single ``*.bin``/``*.pt``/``*.pth``/``*.ckpt`` file.

    Args:
        folder: an existing folder.
        allow_pickle: accept pickle weights (loaded with torch's restricted unpickler).
        confinement: where its files must resolve to; when confined, errors do not list
            the folder's other files.

    Returns:
        The weights, with no tensor data read yet.

    Raises:
        UnsafeCheckpointError: only pickle weights exist and ``allow_pickle`` is false.
        CheckpointNotFoundError: no weights, or a shard named in the index is missing.
        CheckpointFileError: the index is malformed.
    """
    if confinement.is_file(folder / SAFETENSORS_NAME):
        return SafetensorsWeights([folder / SAFETENSORS_NAME], None, confinement)
    if confinement.is_file(folder / SAFETENSORS_INDEX_NAME):
        index_path = folder / SAFETENSORS_INDEX_NAME
        return SafetensorsWeights(
            load_shard_index(index_path, confinement), index_path, confinement
        )
    pickles = _pickle_files(folder)
    if (folder / PICKLE_INDEX_NAME).is_file() or pickles:
        if not allow_pickle:
            names = pickles + (
                [PICKLE_INDEX_NAME] if (folder / PICKLE_INDEX_NAME).is_file() else []
            )
            raise refuse_pickle(folder, names)
        if (folder / PICKLE_NAME).is_file():
            return PickleWeights([folder / PICKLE_NAME], shards={folder / PICKLE_NAME: []})
        if (folder / PICKLE_INDEX_NAME).is_file():
            index_path = folder / PICKLE_INDEX_NAME
            shards = load_shard_index(index_path)
            return PickleWeights(list(shards), index_path=index_path, shards=shards)
        if len(pickles) == 1:
            path = folder / pickles[0]
            return PickleWeights([path], shards={path: []})
        raise CheckpointNotFoundError(
            f"{folder} holds several pickle files ({', '.join(pickles)}) but no "
            f"{PICKLE_NAME} or {PICKLE_INDEX_NAME} saying which are the model's weights",
            details={"folder": str(folder), "files": pickles},
        )
    found = sorted(p.name for p in folder.iterdir())
    hint = ""
    if (folder / ADAPTER_CONFIG_NAME).is_file():
        hint = (
            " It is a PEFT adapter: reference it together with its base model as "
            "'base+adapter' (or {'base': ..., 'adapter': ...})."
        )
    elif any(name.endswith(".safetensors") for name in found):
        hint = (
            f" Its .safetensors files are not named {SAFETENSORS_NAME} and no "
            f"{SAFETENSORS_INDEX_NAME} lists them; re-save the model with save_pretrained."
        )
    if confinement.roots is not None:
        # A service does not list folders: a reference to a shared folder (the inputs
        # folder itself, ".") would reveal what every other checkpoint there is called.
        raise CheckpointNotFoundError(
            f"{folder} has no model weights: expected {SAFETENSORS_NAME}, or "
            f"{SAFETENSORS_INDEX_NAME} with its shards; reference the folder that holds "
            f"config.json and the weights.{hint}",
            details={"folder": str(folder)},
        )
    shown = ", ".join(found[:10]) + (" ..." if len(found) > 10 else "") or "nothing"
    raise CheckpointNotFoundError(
        f"{folder} has no model weights: expected {SAFETENSORS_NAME}, or "
        f"{SAFETENSORS_INDEX_NAME} with its shards, but found {shown}.{hint}",
        details={"folder": str(folder), "files": found[:50]},
    )


def check_folder(folder: Path) -> None:
    """Check that ``folder`` is an existing, readable directory.

    Raises:
        CheckpointNotFoundError: it does not exist or is not a directory.
        CheckpointFileError: it cannot be listed.
    """
    if not folder.exists():
        raise CheckpointNotFoundError(
            f"checkpoint folder {folder} does not exist; check the path",
            details={"folder": str(folder)},
        )
    if not folder.is_dir():
        raise CheckpointNotFoundError(
            f"{folder} is a file, not a checkpoint folder; reference the folder that holds "
            "config.json and the weights",
            details={"folder": str(folder)},
        )
    try:
        next(iter(folder.iterdir()), None)
    except OSError as exc:
        raise CheckpointFileError(
            f"checkpoint folder {folder} cannot be read ({exc.strerror}); check its permissions",
            details={"folder": str(folder)},
        ) from None


class LocalCheckpoint(Checkpoint):
    """A checkpoint in a local ``save_pretrained`` folder (also used for Hub snapshots)."""

    def __init__(
        self,
        folder: Path,
        *,
        ref: CheckpointRef | None = None,
        revision: str | None = None,
        allow_pickle: bool = False,
        confinement: Confinement = UNCONFINED,
    ) -> None:
        """Open a folder; no tensor data is read until asked for.

        Args:
            folder: the checkpoint folder.
            ref: the reference it was opened from (defaults to a ``LocalRef`` of ``folder``).
            revision: the resolved commit SHA, for Hub snapshots.
            allow_pickle: accept pickle weights, loaded with torch's restricted unpickler.
            confinement: where every file it reads must resolve to (the allowed roots).

        Raises:
            CheckpointNotFoundError: the folder, its weights or a shard is missing.
            PathOutsideRootsError: a file links outside ``confinement``.
            UnsafeCheckpointError: only pickle weights exist and ``allow_pickle`` is false.
            CheckpointFileError: the folder or its index cannot be read.
        """
        folder = Path(folder)
        check_folder(folder)
        self.folder = folder
        self.ref = ref if ref is not None else LocalRef(path=folder)
        self.revision = revision
        self.confinement = confinement
        self._weights = open_weights(folder, allow_pickle=allow_pickle, confinement=confinement)

    def entries(self) -> Mapping[str, TensorEntry]:
        """See ``Checkpoint.entries``."""
        return self._weights.entries()

    def read(self, name: str) -> torch.Tensor:
        """See ``Checkpoint.read``."""
        return self._weights.read(name)

    def read_rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        """See ``Checkpoint.read_rows``."""
        return self._weights.read_rows(name, start, stop)

    def files(self) -> list[Path]:
        """See ``Checkpoint.files``."""
        return self._weights.files()

    def close(self) -> None:
        """See ``Checkpoint.close``."""
        self._weights.close()
