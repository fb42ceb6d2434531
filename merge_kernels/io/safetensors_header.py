"""Strict parsing of safetensors headers, without touching tensor data.

A safetensors file is an 8-byte little-endian header length N, N bytes of JSON describing
every tensor (dtype, shape and the byte range of its data relative to the end of the header),
then the raw tensor bytes. The merge engine plans its whole run from headers alone, so this
module validates everything a header claims against the file size up front: a truncated
download or a header that lies about a tensor fails here, with the file and tensor named,
instead of hours later in the middle of a merge.
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from merge_kernels.errors import CheckpointFileError, CheckpointNotFoundError
from merge_kernels.io.dtypes import SUPPORTED_CODES, is_supported, itemsize
from merge_kernels.io.dtypes import torch_dtype as _torch_dtype

#: safetensors itself refuses headers longer than this; a larger length means corruption.
MAX_HEADER_BYTES = 100_000_000

_FIX = "re-download or re-save the checkpoint"


@dataclass(frozen=True)
class HeaderLimits:
    """How large a header :func:`read_header` accepts, so a hostile file cannot exhaust memory.

    Attributes:
        max_bytes: largest JSON header, in bytes (never above :data:`MAX_HEADER_BYTES`).
        max_tensors: most tensors one file may list (None: no limit).
        bytes_setting: what the caller calls ``max_bytes``, named in the error so the reader
            knows what to raise (e.g. a service setting); None: the error names none.
        tensors_setting: likewise for ``max_tensors``.
    """

    max_bytes: int = MAX_HEADER_BYTES
    max_tensors: int | None = None
    bytes_setting: str | None = None
    tensors_setting: str | None = None


# The limits of the read in progress: set by whoever opens checkpoints (see header_limits), so
# that every opener and reader between them need not pass them along.
_LIMITS: ContextVar[HeaderLimits] = ContextVar("_LIMITS", default=HeaderLimits())  # noqa: B039 - frozen


@contextmanager
def header_limits(limits: HeaderLimits) -> Iterator[None]:
    """Apply ``limits`` to every :func:`read_header` call in this context (thread, task)."""
    token = _LIMITS.set(limits)
    try:
        yield
    finally:
        _LIMITS.reset(token)


def _over_limit(path: Path, found: str, limit: int, setting: str | None) -> CheckpointFileError:
    advice = f"raise {setting} if the file is genuine" if setting else "check the file"
    return CheckpointFileError(
        f"{path}: the header {found}, over the limit of {limit}; {advice}",
        details={"file": str(path), "limit": limit, "setting": setting},
    )


@dataclass(frozen=True)
class TensorEntry:
    """One tensor as a safetensors header describes it.

    ``begin`` and ``end`` are absolute byte offsets in the file (the header's
    ``data_offsets`` plus the start of the data section), so a reader can seek to them directly.
    """

    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int

    @property
    def nbytes(self) -> int:
        """Bytes of tensor data."""
        return self.end - self.begin

    @property
    def numel(self) -> int:
        """Number of elements (1 for a 0-d tensor)."""
        return math.prod(self.shape)

    @property
    def torch_dtype(self) -> torch.dtype:
        """The torch dtype matching ``dtype``."""
        return _torch_dtype(self.dtype)

    @property
    def row_bytes(self) -> int:
        """Bytes per index of dim 0 (the whole tensor for a 0-d tensor)."""
        if not self.shape:
            return self.nbytes
        return math.prod(self.shape[1:]) * itemsize(self.dtype)


@dataclass(frozen=True)
class SafetensorsHeader:
    """The parsed, validated header of one safetensors file.

    ``tensors`` is ordered by file offset, so iterating it reads the file front to back.
    """

    path: Path
    tensors: dict[str, TensorEntry]
    metadata: dict[str, str]
    data_start: int
    file_size: int


def _error(path: Path, message: str, *, tensor: str | None = None) -> CheckpointFileError:
    details: dict[str, str | None] = {"file": str(path)}
    if tensor is not None:
        details["tensor"] = tensor
    return CheckpointFileError(f"{path}: {message}; {_FIX}", details=details)


def _is_int(value: object) -> bool:
    # JSON true/false arrive as bool, which is an int subclass in Python.
    return isinstance(value, int) and not isinstance(value, bool)


class _DuplicateKeyError(ValueError):
    def __init__(self, key: str) -> None:
        super().__init__(key)
        self.key = key


def _reject_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise _DuplicateKeyError(key)
        out[key] = value
    return out


def open_readonly(path: Path) -> int:
    """Open ``path`` for reading; the default way headers and tensors are opened."""
    return os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))


#: Opens a file for reading and returns its descriptor (e.g. confined to allowed roots).
FileOpener = Callable[[Path], int]


def _read_prefix(path: Path, open_fd: FileOpener) -> tuple[bytes, int]:
    """Return the raw JSON header bytes and the file size."""
    try:
        fd = open_fd(path)
    except FileNotFoundError:
        raise CheckpointNotFoundError(
            f"checkpoint file {path} does not exist; check the path or download it again",
            details={"file": str(path)},
        ) from None
    except IsADirectoryError:
        raise _error(path, "is a directory, not a safetensors file") from None
    except OSError as exc:
        raise _error(path, f"cannot be opened ({exc.strerror})") from None
    try:
        file_size = os.fstat(fd).st_size
        if file_size < 8:
            raise _error(
                path,
                f"file is {file_size} bytes, too short to hold the 8-byte safetensors header "
                "length; the file is truncated or not a safetensors file",
            )
        prefix = os.pread(fd, 8, 0)
        if len(prefix) != 8:
            raise _error(path, "file shrank while its header was being read")
        (header_len,) = struct.unpack("<Q", prefix)
        limits = _LIMITS.get()
        if limits.max_bytes < header_len <= min(MAX_HEADER_BYTES, file_size - 8):
            found = f"is {header_len} bytes long"
            raise _over_limit(path, found, limits.max_bytes, limits.bytes_setting)
        if header_len > MAX_HEADER_BYTES or header_len > file_size - 8:
            raise _error(
                path,
                f"header length field says {header_len} bytes but the file is {file_size} bytes "
                f"(and headers are limited to {MAX_HEADER_BYTES} bytes); the file is corrupt, "
                "truncated or not a safetensors file",
            )
        raw = bytearray()
        while len(raw) < header_len:
            chunk = os.pread(fd, header_len - len(raw), 8 + len(raw))
            if not chunk:
                raise _error(path, "file shrank while its header was being read")
            raw += chunk
        return bytes(raw), file_size
    except OSError as exc:
        raise _error(path, f"cannot be read ({exc.strerror})") from None
    finally:
        os.close(fd)


def _parse_entry(path: Path, name: str, info: object, data_start: int) -> TensorEntry:
    if not isinstance(info, dict):
        raise _error(path, f"header entry for tensor {name!r} is not a JSON object", tensor=name)
    missing = [k for k in ("dtype", "shape", "data_offsets") if k not in info]
    if missing:
        raise _error(
            path, f"header entry for tensor {name!r} lacks {', '.join(missing)}", tensor=name
        )
    dtype = info["dtype"]
    if not isinstance(dtype, str) or not is_supported(dtype):
        raise _error(
            path,
            f"tensor {name!r} has unknown dtype {dtype!r} (supported: "
            f"{', '.join(SUPPORTED_CODES)})",
            tensor=name,
        )
    shape = info["shape"]
    if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
        raise _error(
            path,
            f"tensor {name!r} has shape {shape!r}; a shape must be a list of non-negative integers",
            tensor=name,
        )
    offsets = info["data_offsets"]
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(_is_int(o) and o >= 0 for o in offsets)
    ):
        raise _error(
            path,
            f"tensor {name!r} has data_offsets {offsets!r}; they must be two non-negative "
            "integers [begin, end]",
            tensor=name,
        )
    rel_begin, rel_end = offsets
    if rel_begin > rel_end:
        raise _error(
            path,
            f"tensor {name!r} has data_offsets [{rel_begin}, {rel_end}] that end before they begin",
            tensor=name,
        )
    expected = math.prod(shape) * itemsize(dtype)
    if rel_end - rel_begin != expected:
        raise _error(
            path,
            f"tensor {name!r} is declared {dtype} with shape {shape}, which is {expected} bytes, "
            f"but its data_offsets [{rel_begin}, {rel_end}] span {rel_end - rel_begin} bytes; "
            "the header lies about the tensor's dtype, shape or offsets",
            tensor=name,
        )
    return TensorEntry(
        name=name,
        dtype=dtype,
        shape=tuple(shape),
        begin=data_start + rel_begin,
        end=data_start + rel_end,
    )


def read_header(path: Path, *, open_fd: FileOpener = open_readonly) -> SafetensorsHeader:
    """Read and validate the header of a safetensors file.

    Only the 8-byte length prefix, the JSON header and the file size are read; tensor data is
    never touched.

    Args:
        path: the safetensors file.
        open_fd: how the file is opened (checks where it may resolve to, for a service).

    Returns:
        The parsed header, tensors ordered by file offset, offsets absolute.

    Raises:
        CheckpointNotFoundError: the file does not exist.
        CheckpointFileError: the file is unreadable, truncated, or its header is malformed or
            inconsistent (bad JSON, unknown dtype, bad shape or offsets, offsets that disagree
            with dtype and shape, tensors past the end of the file or overlapping each other).
            The message names the file and, where there is one, the tensor.
    """
    path = Path(path)
    raw, file_size = _read_prefix(path, open_fd)
    data_start = 8 + len(raw)
    try:
        parsed = json.loads(raw.decode("utf-8"), object_pairs_hook=_reject_duplicate_keys)
    except _DuplicateKeyError as exc:
        raise _error(path, f"header lists key {exc.key!r} more than once", tensor=exc.key) from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise _error(path, f"header is not valid JSON ({exc})") from None
    except RecursionError:
        raise _error(path, "header nests JSON arrays or objects too deeply") from None
    if not isinstance(parsed, dict):
        raise _error(path, f"header is JSON {type(parsed).__name__}, not a JSON object")
    limits = _LIMITS.get()
    tensors = len(parsed) - ("__metadata__" in parsed)
    if limits.max_tensors is not None and tensors > limits.max_tensors:
        found = f"lists {tensors} tensors"
        raise _over_limit(path, found, limits.max_tensors, limits.tensors_setting)

    metadata: dict[str, str] = {}
    raw_meta = parsed.pop("__metadata__", None)
    if raw_meta is not None:
        if not isinstance(raw_meta, dict) or not all(isinstance(v, str) for v in raw_meta.values()):
            raise _error(path, "header __metadata__ must map strings to strings")
        metadata = dict(raw_meta)

    entries = [_parse_entry(path, name, info, data_start) for name, info in parsed.items()]
    entries.sort(key=lambda e: (e.begin, e.end))
    previous: TensorEntry | None = None
    for entry in entries:
        if entry.end > file_size:
            raise _error(
                path,
                f"file is {file_size} bytes but tensor {entry.name!r} needs bytes up to "
                f"{entry.end}; the file is truncated",
                tensor=entry.name,
            )
        # Empty tensors occupy no bytes, so they cannot overlap anything.
        if entry.nbytes == 0:
            continue
        if previous is not None and entry.begin < previous.end:
            raise _error(
                path,
                f"tensors {previous.name!r} and {entry.name!r} overlap (bytes "
                f"[{previous.begin}, {previous.end}) and [{entry.begin}, {entry.end})); "
                "the header is corrupt",
                tensor=entry.name,
            )
        previous = entry

    return SafetensorsHeader(
        path=path,
        tensors={e.name: e for e in entries},
        metadata=metadata,
        data_start=data_start,
        file_size=file_size,
    )
