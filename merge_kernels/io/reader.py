"""Read single tensors, or blocks of rows, from a safetensors file.

The merge engine keeps a reader open per input checkpoint and pulls one tensor (or one row
block of a large tensor) at a time. On the CPU a read maps just that byte range of the file
(copy-on-write, so the tensor is writable and the file never changes) and faults it in at
once: no bytes are copied out of the page cache, and the mapping, which counts toward the
resident set while it lives, is released as soon as the tensor is dropped, so the whole
files are never mapped at once. A file found shorter than its header says is an error; one
truncated by another program while a mapped tensor is in use ends the process (SIGBUS), as
it would for any reader that maps files, safetensors' own included. For a CUDA merge a read
goes with ``os.preadv`` into pinned memory, which the GPU copies from by DMA.

Only little-endian hosts are supported: safetensors stores data little-endian and the bytes
are reinterpreted in place without swapping.
"""

from __future__ import annotations

import mmap
import os
import sys
import weakref
from pathlib import Path
from types import TracebackType

import torch

from merge_kernels.errors import CheckpointFileError
from merge_kernels.io.safetensors_header import (
    FileOpener,
    SafetensorsHeader,
    TensorEntry,
    open_readonly,
    read_header,
)

_FIX = "re-download or re-save the checkpoint"


def _require_little_endian() -> None:
    # Big-endian hosts would need a byte swap on every read; none of tureen's targets are
    # big-endian, so refuse loudly rather than return garbage.
    if sys.byteorder != "little":
        raise NotImplementedError("tureen's safetensors IO supports little-endian hosts only")


# Whether reads land in page-locked (pinned) memory, which the GPU copies from by DMA and
# asynchronously. Process-wide: set by the merge when its kernels run on CUDA.
_PINNED = False


def set_pinned_reads(enabled: bool) -> None:
    """Read tensors into pinned host memory (for a CUDA merge) or map them (the default)."""
    global _PINNED
    _PINNED = bool(enabled) and torch.cuda.is_available()


# madvise(MADV_POPULATE_READ) (Linux 5.14+) faults a whole range in with one call, on the
# reading thread; where it is missing, MADV_WILLNEED starts the reads and the first touch
# maps the pages.
_POPULATE_READ = getattr(mmap, "MADV_POPULATE_READ", 22 if sys.platform == "linux" else None)


def _populate(mapping: mmap.mmap) -> None:
    if _POPULATE_READ is not None:
        try:
            mapping.madvise(_POPULATE_READ)
            return
        except OSError:
            pass
    if hasattr(mmap, "MADV_WILLNEED"):
        mapping.madvise(mmap.MADV_WILLNEED)


class SafetensorsReader:
    """Random access to the tensors of one safetensors file.

    The file is opened once; reads are positional (``preadv``), so one reader may serve
    several threads at once. Use as a context manager or call :meth:`close`.

    Attributes:
        header: the validated header of the file.
    """

    header: SafetensorsHeader

    def __init__(
        self,
        path: Path,
        header: SafetensorsHeader | None = None,
        *,
        open_fd: FileOpener = open_readonly,
    ) -> None:
        """Open ``path`` for reading.

        Args:
            path: the safetensors file.
            header: its header if already read with :func:`read_header`; read now otherwise.
            open_fd: how the file is opened (checks where it may resolve to, for a service).

        Raises:
            CheckpointNotFoundError: the file does not exist.
            CheckpointFileError: the header is invalid, the file cannot be opened, or its size
                changed since ``header`` was read.
        """
        _require_little_endian()
        self._path = Path(path)
        self.header = header if header is not None else read_header(self._path, open_fd=open_fd)
        try:
            self._fd: int | None = open_fd(self._path)
        except OSError as exc:
            raise CheckpointFileError(
                f"{self._path}: cannot be opened ({exc.strerror}); check the file",
                details={"file": str(self._path)},
            ) from None
        # A reader dropped without close() must not leak its descriptor in a long-lived service.
        self._finalizer = weakref.finalize(self, os.close, self._fd)
        size = os.fstat(self._fd).st_size
        if size != self.header.file_size:
            self.close()
            raise CheckpointFileError(
                f"{self._path}: file is {size} bytes but was {self.header.file_size} bytes when "
                "its header was read; it changed underneath the merge. Make sure nothing else "
                "writes the checkpoint, then retry.",
                details={"file": str(self._path)},
            )

    @property
    def path(self) -> Path:
        """The file being read."""
        return self._path

    def __enter__(self) -> SafetensorsReader:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        """Close the file. Safe to call more than once."""
        if self._fd is not None:
            self._fd = None
            self._finalizer()

    def _entry(self, name: str) -> TensorEntry:
        try:
            return self.header.tensors[name]
        except KeyError:
            raise CheckpointFileError(
                f"{self._path}: has no tensor named {name!r}; check the tensor name against "
                "the checkpoint's contents",
                details={"file": str(self._path), "tensor": name},
            ) from None

    def _read_into(self, name: str, offset: int, nbytes: int) -> torch.Tensor:
        """``nbytes`` at ``offset`` as a new uint8 tensor: mapped, or read into pinned memory."""
        if self._fd is None:
            raise ValueError(f"reader for {self._path} is closed")
        if nbytes and not _PINNED and hasattr(mmap, "MAP_PRIVATE"):
            return self._map(name, offset, nbytes)
        out = torch.empty(nbytes, dtype=torch.uint8, pin_memory=_PINNED)
        if nbytes == 0:
            return out
        view = out.numpy().data  # a writable memoryview over the tensor storage
        done = 0
        while done < nbytes:
            # The kernel may return fewer bytes than asked (at most ~2 GiB per call on Linux).
            try:
                got = os.preadv(self._fd, [view[done:]], offset + done)
            except OSError as exc:
                raise CheckpointFileError(
                    f"{self._path}: reading tensor {name!r} failed ({exc.strerror})",
                    details={"file": str(self._path), "tensor": name},
                ) from None
            if got == 0:
                raise self._truncated(name, offset + done, offset + nbytes)
            done += got
        return out

    def _truncated(self, name: str, ended_at: int, needed: int) -> CheckpointFileError:
        return CheckpointFileError(
            f"{self._path}: file ended at byte {ended_at} while reading tensor {name!r}, which "
            f"needs bytes up to {needed}; the file is truncated; {_FIX}",
            details={"file": str(self._path), "tensor": name},
        )

    def _map(self, name: str, offset: int, nbytes: int) -> torch.Tensor:
        """Map bytes ``[offset, offset + nbytes)`` privately and fault them in."""
        assert self._fd is not None
        # The header was checked against the file's size: only a file that shrank since
        # then can be too short, and mmap refuses the range.
        start = offset - offset % mmap.ALLOCATIONGRANULARITY
        try:
            mapping = mmap.mmap(
                self._fd,
                offset + nbytes - start,
                flags=mmap.MAP_PRIVATE,
                prot=mmap.PROT_READ | mmap.PROT_WRITE,
                offset=start,
            )
        except (OSError, ValueError) as exc:
            size = os.fstat(self._fd).st_size
            if size < offset + nbytes:
                raise self._truncated(name, size, offset + nbytes) from None
            reason = exc.strerror if isinstance(exc, OSError) else str(exc)
            raise CheckpointFileError(
                f"{self._path}: mapping tensor {name!r} failed ({reason})",
                details={"file": str(self._path), "tensor": name},
            ) from None
        _populate(mapping)
        # The tensor holds the mapping; it is unmapped when the last view of it is dropped.
        return torch.frombuffer(mapping, dtype=torch.uint8, count=nbytes, offset=offset - start)

    def read(self, name: str) -> torch.Tensor:
        """Read a whole tensor.

        Args:
            name: the tensor's name in the file.

        Returns:
            A new CPU tensor with the file's dtype and shape, owning its memory.

        Raises:
            CheckpointFileError: no tensor ``name`` in the file, or the file is truncated or
                unreadable.
            ValueError: the reader is closed.
        """
        entry = self._entry(name)
        raw = self._read_into(name, entry.begin, entry.nbytes)
        return raw.view(entry.torch_dtype).reshape(entry.shape)

    def read_rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Read rows ``[start, stop)`` of dim 0 of a tensor.

        Args:
            name: the tensor's name in the file.
            start: first row, ``0 <= start <= stop``.
            stop: one past the last row, ``stop <= shape[0]``.

        Returns:
            A new CPU tensor of shape ``(stop - start, *shape[1:])`` in the file's dtype.

        Raises:
            CheckpointFileError: no tensor ``name`` in the file, or the file is truncated or
                unreadable.
            ValueError: the tensor is 0-d, the row range is out of bounds, or the reader is
                closed.
        """
        entry = self._entry(name)
        if not entry.shape:
            raise ValueError(f"tensor {name!r} in {self._path} is 0-d and has no rows")
        if not 0 <= start <= stop <= entry.shape[0]:
            raise ValueError(
                f"rows [{start}, {stop}) are out of range for tensor {name!r} in {self._path} "
                f"with {entry.shape[0]} rows"
            )
        row_bytes = entry.row_bytes
        raw = self._read_into(name, entry.begin + start * row_bytes, (stop - start) * row_bytes)
        return raw.view(entry.torch_dtype).reshape((stop - start, *entry.shape[1:]))
