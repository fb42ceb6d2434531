"""Write one planned safetensors shard tensor by tensor, at precomputed offsets.

The shard's header and length are fixed by its :class:`~merge_kernels.io.shard_plan.ShardSpec`,
so the writer creates the file, writes the header, sets the final length and then places each
tensor (or each block of rows of a tensor) at its offset with ``os.pwrite``. The shard is never
assembled in memory, and tensors may arrive in any order.

:meth:`ShardWriter.finish` refuses to complete a shard with any byte range left unwritten, then
returns the file's checksum (:mod:`merge_kernels.io.checksum`: a CRC-32 gathered from the
pieces as they are written, in whatever order they come) for the resume manifest. No bytes are
kept for hashing, so a caller may reuse its buffer as soon as a write returns.

Only little-endian hosts are supported: tensor bytes are written as they lie in memory.
"""

from __future__ import annotations

import os
import sys
import weakref
from pathlib import Path
from types import TracebackType

import torch

from merge_kernels.io.checksum import RangeChecksum
from merge_kernels.io.dtypes import dtype_code
from merge_kernels.io.shard_plan import OutputTensor, ShardSpec
from merge_kernels.io.staging import fsync_dir
from merge_kernels.thread_pools import shared_pool

_HASH_CHUNK = 8 * 1024 * 1024


def _tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """A zero-copy byte view of a CPU tensor (a copy only if it is not contiguous)."""
    flat = tensor.detach().contiguous().reshape(-1)
    return flat.view(torch.uint8).numpy().data


_PARALLEL_CHECKSUM_BYTES = 1 << 20


_FADV_DONTNEED = getattr(os, "POSIX_FADV_DONTNEED", None) if sys.platform == "linux" else None


def _start_writeback(fd: int, offset: int, length: int) -> None:
    """Start writing a large piece to disk now, not at the shard's fsync.

    On Linux, ``POSIX_FADV_DONTNEED`` on dirty pages queues their writeback without waiting
    for it, so the disk works while the merge goes on and the fsync that finishes the shard
    has little left to do (it was a second or two of every 3 GB shard). Pages still dirty or
    under writeback stay cached.
    """
    if _FADV_DONTNEED is not None:
        os.posix_fadvise(fd, offset, length, _FADV_DONTNEED)


def _pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    done = 0
    while done < len(data):
        # pwrite may write less than asked (at most ~2 GiB per call on Linux).
        done += os.pwrite(fd, data[done:], offset + done)


class ShardWriter:
    """Writes one planned shard into a directory.

    Use as a context manager and call :meth:`finish` inside it. Leaving the context without a
    successful :meth:`finish` (an exception, or a forgotten call) closes and deletes the partial
    file, so a half-written shard never looks like output.
    """

    def __init__(self, directory: Path, spec: ShardSpec) -> None:
        """Create ``directory / spec.filename`` with its header and final length.

        Args:
            directory: an existing directory (normally a staging folder).
            spec: the planned shard.

        Raises:
            OSError: the file cannot be created or sized (e.g. the disk is full).
        """
        if sys.byteorder != "little":
            raise NotImplementedError("tureen's safetensors IO supports little-endian hosts only")
        self.spec = spec
        self.path = Path(directory) / spec.filename
        self._tensors: dict[str, OutputTensor] = {t.name: t for t in spec.tensors}
        # Row ranges written so far for each tensor; complete tensors hold [(0, rows)].
        self._written: dict[str, list[tuple[int, int]]] = {t.name: [] for t in spec.tensors}
        self._checksum: RangeChecksum | None = RangeChecksum()
        self._digest: str | None = None
        self._fd: int | None = os.open(
            self.path,
            os.O_RDWR | os.O_CREAT | os.O_TRUNC | getattr(os, "O_CLOEXEC", 0),
            0o644,
        )
        # A writer dropped without finish() or a with-block must not leak its descriptor.
        self._close_fd = weakref.finalize(self, os.close, self._fd)
        try:
            _pwrite_all(self._fd, memoryview(spec.header), 0)
            os.ftruncate(self._fd, spec.size)
        except BaseException:
            self._abandon()
            raise
        self._checksum.add(0, spec.header)

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._digest is None:
            self._abandon()

    def _abandon(self) -> None:
        self._checksum = None
        if self._fd is not None:
            self._fd = None
            self._close_fd()
            self.path.unlink(missing_ok=True)

    def _planned(self, name: str) -> OutputTensor:
        if self._fd is None:
            raise ValueError(f"shard {self.spec.filename} is already finished or abandoned")
        try:
            return self._tensors[name]
        except KeyError:
            raise ValueError(
                f"tensor {name!r} is not planned for shard {self.spec.filename}"
            ) from None

    def _check(self, planned: OutputTensor, tensor: torch.Tensor, shape: tuple[int, ...]) -> None:
        if tensor.device.type != "cpu":
            raise ValueError(
                f"tensor {planned.name!r} is on {tensor.device}; move it to the CPU before writing"
            )
        code = dtype_code(tensor.dtype)
        if code != planned.dtype:
            raise ValueError(
                f"tensor {planned.name!r} is {code} but shard {self.spec.filename} plans it as "
                f"{planned.dtype}"
            )
        if tuple(tensor.shape) != shape:
            raise ValueError(
                f"tensor {planned.name!r} has shape {tuple(tensor.shape)} but shard "
                f"{self.spec.filename} expects {shape} here"
            )

    def _record(self, name: str, start: int, stop: int) -> None:
        ranges = self._written[name]
        for b, e in ranges:
            if start < e and b < stop:
                raise ValueError(
                    f"rows [{start}, {stop}) of tensor {name!r} overlap rows [{b}, {e}) "
                    "already written"
                )
        ranges.append((start, stop))

    def _put(self, offset: int, data: memoryview) -> None:
        assert self._fd is not None and self._checksum is not None
        # The checksum of a large piece runs on another thread, beside the write: both read
        # the same bytes (still in the CPU cache) and both release the GIL.
        if len(data) < _PARALLEL_CHECKSUM_BYTES:
            self._checksum.add(offset, data)
            _pwrite_all(self._fd, data, offset)
            return
        summed = shared_pool("checksum", 1).submit(self._checksum.add, offset, data)
        try:
            _pwrite_all(self._fd, data, offset)
        finally:
            summed.result()
        _start_writeback(self._fd, offset, len(data))

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Write a whole tensor at its planned offset.

        Args:
            name: the tensor's planned name.
            tensor: a CPU tensor with the planned dtype and shape (made contiguous if needed).

        Raises:
            ValueError: ``name`` is not in this shard, dtype/shape/device differ from the plan,
                the tensor was already (partly) written, or the writer is finished.
            CheckpointFileError: the tensor's dtype has no safetensors code.
            OSError: the write failed (e.g. the disk is full).
        """
        planned = self._planned(name)
        self._check(planned, tensor, planned.shape)
        rows = planned.shape[0] if planned.shape else 1
        self._record(name, 0, rows)
        self._put(self.spec.offsets[name][0], _tensor_bytes(tensor))

    def write_rows(self, name: str, start: int, rows: torch.Tensor) -> None:
        """Write rows ``[start, start + len(rows))`` of dim 0 of a planned tensor.

        Row blocks may come in any order but must not overlap.

        Args:
            name: the tensor's planned name (not a 0-d tensor).
            start: the first row index.
            rows: a CPU tensor of shape ``(n, *planned_shape[1:])`` with the planned dtype.

        Raises:
            ValueError: unknown name, 0-d tensor, rows out of range or overlapping earlier
                writes, dtype/shape/device mismatch, or the writer is finished.
            CheckpointFileError: the tensor's dtype has no safetensors code.
            OSError: the write failed.
        """
        planned = self._planned(name)
        if not planned.shape:
            raise ValueError(f"tensor {name!r} is 0-d; write it with write()")
        count = rows.shape[0] if rows.dim() > 0 else -1
        if count < 0 or not 0 <= start <= start + count <= planned.shape[0]:
            raise ValueError(
                f"rows starting at {start} with shape {tuple(rows.shape)} do not fit tensor "
                f"{name!r} of shape {planned.shape}"
            )
        self._check(planned, rows, (count, *planned.shape[1:]))
        self._record(name, start, start + count)
        row_bytes = planned.nbytes // planned.shape[0] if planned.shape[0] else 0
        self._put(self.spec.offsets[name][0] + start * row_bytes, _tensor_bytes(rows))

    def _missing(self) -> list[str]:
        missing = []
        for tensor in self.spec.tensors:
            rows = tensor.shape[0] if tensor.shape else 1
            covered = sum(e - b for b, e in self._written[tensor.name])
            # Ranges never overlap, so full coverage is exactly a sum equal to the row count;
            # an empty tensor still has to be written once to count as done.
            if covered != rows or (rows == 0 and not self._written[tensor.name]):
                missing.append(tensor.name)
        return missing

    def finish(self) -> str:
        """Complete the shard: verify, fsync, close, and hash it.

        Returns:
            The file's checksum (:func:`merge_kernels.io.checksum.file_checksum`).

        Raises:
            ValueError: some planned tensor (or some rows of one) was never written; the
                message lists them. The writer stays open so the caller may still write them.
            OSError: syncing or reading back the file failed.
        """
        if self._digest is not None:
            return self._digest
        if self._fd is None:
            raise ValueError(f"shard {self.spec.filename} was abandoned")
        missing = self._missing()
        if missing:
            shown = ", ".join(repr(n) for n in missing[:10])
            more = f" and {len(missing) - 10} more" if len(missing) > 10 else ""
            raise ValueError(
                f"shard {self.spec.filename} is incomplete: tensors {shown}{more} were not "
                "fully written"
            )
        os.fsync(self._fd)
        assert self._checksum is not None
        # Every planned byte was written exactly once, so the pieces tile the file.
        digest = self._checksum.hexdigest(self.spec.size)
        self._checksum = None
        self._fd = None
        self._close_fd()
        fsync_dir(self.path.parent)
        self._digest = digest
        return digest
