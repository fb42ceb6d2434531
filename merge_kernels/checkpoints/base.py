"""The interface the streaming merge engine reads checkpoints through.

A ``Checkpoint`` describes every tensor from file headers alone (``entries``), then hands
out tensors one at a time (``read``) or in row ranges (``read_rows``), so a merge never
holds a whole model in memory. Local folders, Hub snapshots and base + LoRA adapters all
implement it.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from typing import Self

import torch

from merge_kernels.checkpoints.confinement import UNCONFINED, Confinement
from merge_kernels.checkpoints.reference import CheckpointRef
from merge_kernels.errors import CheckpointFileError, CheckpointNotFoundError
from merge_kernels.io.safetensors_header import TensorEntry

CONFIG_NAME = "config.json"


class Checkpoint(ABC):
    """A checkpoint that can be read tensor by tensor.

    Attributes:
        ref: the reference the checkpoint was opened from.
        folder: the folder holding ``config.json`` and tokenizer files.
        revision: the resolved commit SHA for Hub checkpoints, else None.
        confinement: where the files it reads must resolve to (the allowed roots).
    """

    ref: CheckpointRef
    folder: Path
    revision: str | None = None
    confinement: Confinement = UNCONFINED
    _config: dict[str, object] | None = None

    @property
    def display_name(self) -> str:
        """A stable human-readable name (``str(ref)``) for messages and model cards."""
        return str(self.ref)

    @property
    def config(self) -> dict[str, object]:
        """The parsed ``config.json``; empty when the folder has none (see ``has_config``).

        Raises:
            CheckpointFileError: config.json exists but is not a JSON object.
        """
        if self._config is None:
            self._config = load_json_object(
                self.folder / CONFIG_NAME, missing_ok=True, confinement=self.confinement
            )
        return self._config

    @property
    def has_config(self) -> bool:
        """Whether the folder has a ``config.json``."""
        return self.confinement.is_file(self.folder / CONFIG_NAME)

    @abstractmethod
    def entries(self) -> Mapping[str, TensorEntry]:
        """Describe every tensor: name -> entry with dtype code and shape.

        A read-only mapping, ordered by (weight file, offset) so that reading in this order
        follows the files. ``begin``/``end`` are byte offsets in the tensor's weight file
        (for pickle weights, virtual offsets: a running sum of tensor sizes per file). For a
        LoRA checkpoint these are the base's entries: merged tensors keep the base's dtype
        and shape.

        Raises:
            CheckpointFileError: a weight file or the shard index is inconsistent.
        """

    @abstractmethod
    def read(self, name: str) -> torch.Tensor:
        """Read one whole tensor, in the dtype ``entries()[name]`` reports.

        Raises:
            KeyError: the checkpoint has no tensor ``name``.
            CheckpointFileError: the bytes cannot be read.
        """

    @abstractmethod
    def read_rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Read rows ``start:stop`` (along dim 0) of one tensor.

        Raises:
            KeyError: the checkpoint has no tensor ``name``.
            ValueError: the range is outside the tensor or the tensor is 0-d.
            CheckpointFileError: the bytes cannot be read.
        """

    @abstractmethod
    def files(self) -> list[Path]:
        """Return the weight files this checkpoint reads, for hashing and provenance."""

    def open_file(self, path: Path) -> int:
        """Open one of ``files()`` for reading, confined like every read of this checkpoint.

        Returns:
            A file descriptor; the caller closes it.

        Raises:
            PathOutsideRootsError: the file resolves outside the allowed roots.
            OSError: it cannot be opened.
        """
        return self.confinement.open_fd(path)

    @abstractmethod
    def close(self) -> None:
        """Release open files. Idempotent."""

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.display_name!r})"


def load_json_object(
    path: Path, *, missing_ok: bool = False, confinement: Confinement = UNCONFINED
) -> dict[str, object]:
    """Read a JSON file that must hold an object.

    Args:
        path: the file.
        missing_ok: return an empty dict instead of raising when the file does not exist.
        confinement: where the file must resolve to.

    Returns:
        The parsed object.

    Raises:
        CheckpointNotFoundError: the file does not exist and ``missing_ok`` is false.
        CheckpointFileError: the file is unreadable or not a JSON object.
        PathOutsideRootsError: the file links outside ``confinement``.
    """
    try:
        text = confinement.read_bytes(path).decode("utf-8")
    except FileNotFoundError:
        if missing_ok:
            return {}
        raise CheckpointNotFoundError(
            f"{path} does not exist", details={"file": str(path)}
        ) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise CheckpointFileError(
            f"{path} cannot be read ({exc})", details={"file": str(path)}
        ) from None
    try:
        parsed = json.loads(text)
    except json.JSONDecodeError as exc:
        raise CheckpointFileError(
            f"{path} is not valid JSON ({exc}); re-download or re-save it",
            details={"file": str(path)},
        ) from None
    except RecursionError:
        raise CheckpointFileError(
            f"{path} nests JSON arrays or objects too deeply to be a real checkpoint file; "
            "re-download or re-save it",
            details={"file": str(path)},
        ) from None
    if not isinstance(parsed, dict):
        raise CheckpointFileError(
            f"{path} holds a JSON {type(parsed).__name__}, expected an object",
            details={"file": str(path)},
        )
    return parsed


def check_row_range(entry: TensorEntry, start: int, stop: int) -> None:
    """Validate a ``read_rows`` range against a tensor's shape.

    Raises:
        ValueError: the tensor is 0-d or ``0 <= start <= stop <= shape[0]`` does not hold.
    """
    if not entry.shape:
        raise ValueError(f"tensor {entry.name!r} is 0-d and has no rows")
    if not 0 <= start <= stop <= entry.shape[0]:
        raise ValueError(
            f"rows [{start}, {stop}) are outside tensor {entry.name!r} with {entry.shape[0]} rows"
        )
