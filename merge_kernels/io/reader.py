"""Read single tensors, or blocks of rows, from a safetensors file.

The merge engine keeps a reader open per input checkpoint and pulls one tensor (or one row
block of a large tensor) at a time. Each read goes with ``os.preadv`` straight into a freshly
allocated torch buffer: no mmap of the whole file (mapped pages the engine touches count
toward its resident set, and four 3 GB inputs would blow the ~0.6 GB RSS budget), and no
intermediate ``bytes`` object (which would double peak memory for a large tensor).

Only little-endian hosts are supported: safetensors stores data little-endian and the bytes
are reinterpreted in place without swapping.
"""

from __future__ import annotations

import os
import sys
import weakref
from pathlib import Path
from types import TracebackType

import torch

from merge_kernels.errors import CheckpointFileError
from merge_kernels.io.safetensors_header import SafetensorsHeader, TensorEntry, read_header

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
    """Read tensors into pinned host memory (for a CUDA merge) or ordinary memory."""
    global _PINNED
    _PINNED = bool(enabled) and torch.cuda.is_available()


class SafetensorsReader:
    """Random access to the tensors of one safetensors file.

    The file is opened once; reads are positional (``preadv``), so one reader may serve
    several threads at once. Use as a context manager or call :meth:`close`.

    Attributes:
        header: the validated header of the file.
    """

    header: SafetensorsHeader

    def __init__(self, path: Path, header: SafetensorsHeader | None = None) -> None:
        """Open ``path`` for reading.

        Args:
            path: the safetensors file.
            header: its header if already read with :func:`read_header`; read now otherwise.

        Raises:
            CheckpointNotFoundError: the file does not exist.
            CheckpointFileError: the header is invalid, the file cannot be opened, or its size
                changed since ``header`` was read.
        """
        _require_little_endian()
        self._path = Path(path)
        self.header = header if header is not None else read_header(self._path)
        try:
            self._fd: int | None = os.open(self._path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
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
        """Read ``nbytes`` at ``offset`` into a new uint8 tensor, without extra copies."""
        if self._fd is None:
            raise ValueError(f"reader for {self._path} is closed")
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
                raise CheckpointFileError(
                    f"{self._path}: file ended at byte {offset + done} while reading tensor "
                    f"{name!r}, which needs bytes up to {offset + nbytes}; the file is "
                    f"truncated; {_FIX}",
                    details={"file": str(self._path), "tensor": name},
                )
            done += got
        return out

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
