"""The local executor: every output shard merged in this process, one after another.

For each shard: for each tensor (or row chunk), read the inputs, run the kernel, write the
result at its planned offset; then the shard is finished, checksummed and recorded. Reading
the next piece of work overlaps computing the current one, and writing it overlaps
computing the next. The same shard writing serves the Ray executor's tasks
(:mod:`merge_kernels.executors.ray_tasks`).
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import torch

from merge_kernels.executors import ShardWork
from merge_kernels.io.shard_plan import ShardSpec
from merge_kernels.io.shard_writer import ShardWriter
from merge_kernels.piece_merger import PieceMerger
from merge_kernels.pieces import Piece, pieces_of, read_piece
from merge_kernels.plan import MergePlan, TensorPlan

IOPools = tuple[ThreadPoolExecutor, ThreadPoolExecutor]
PieceDone = Callable[[Piece, int], None]


def io_pools() -> IOPools:
    """One reading and one writing thread, for :func:`write_shard`."""
    return (
        ThreadPoolExecutor(max_workers=1, thread_name_prefix="tureen-read"),
        ThreadPoolExecutor(max_workers=1, thread_name_prefix="tureen-write"),
    )


def shard_tensors(plan: MergePlan, shard: ShardSpec) -> list[TensorPlan]:
    """The planned tensors of ``shard``, in the plan's order."""
    names = {t.name for t in shard.tensors}
    return [t for t in plan.tensors if t.name in names]


class LocalExecutor:
    """Merges the pending shards in this process (the default executor)."""

    name = "local"

    def merge_shards(self, work: ShardWork) -> None:
        """Merge and write every shard not already done, recording each as it finishes."""
        plan, counters = work.plan, work.counters
        merger = PieceMerger(plan, work.options.device, work.check_cancel)
        merger.prepare_model_trims()

        def piece_done(unit: Piece, nbytes: int) -> None:
            counters["bytes"] += nbytes
            if unit.stop is None or unit.stop == unit.tensor.shape[0]:
                counters["tensors"] += 1
            work.report(unit.tensor.name)

        readers, writers = io_pools()
        with readers, writers:
            for shard in plan.shards:
                if shard.filename in work.done:
                    counters["tensors"] += len(shard.tensors)
                    counters["bytes"] += shard.size
                    work.report(None)
                    continue
                counters["bytes"] += len(shard.header)
                digest = write_shard(
                    plan,
                    shard,
                    work.staging.path,
                    merger,
                    (readers, writers),
                    work.check_cancel,
                    piece_done,
                )
                work.staging.mark_shard_done(shard.filename, digest)


def write_shard(
    plan: MergePlan,
    shard: ShardSpec,
    directory: Path,
    merger: PieceMerger,
    pools: IOPools,
    check_cancel: Callable[[], None],
    piece_done: PieceDone | None = None,
) -> str:
    """Merge ``shard`` into ``directory / shard.filename`` and return its checksum.

    Reads ahead, merges, and writes behind: IO on two threads overlaps the kernel. A shard
    left unfinished (an error, a cancellation) is deleted.

    Args:
        plan: the merge plan.
        shard: the shard to write (its ``filename`` is the file written).
        directory: an existing folder (the staging folder).
        merger: runs the kernel on each piece, with the trim thresholds it needs.
        pools: a reading and a writing thread (:func:`io_pools`).
        check_cancel: called before each piece; raises to stop.
        piece_done: called after each piece with the bytes it adds to the shard.
    """
    with ShardWriter(directory, shard) as writer:
        _write_pieces(
            plan, shard_tensors(plan, shard), writer, merger, pools, check_cancel, piece_done
        )
        return writer.finish()


def _write_pieces(
    plan: MergePlan,
    tensors: list[TensorPlan],
    writer: ShardWriter,
    merger: PieceMerger,
    pools: IOPools,
    check_cancel: Callable[[], None],
    piece_done: PieceDone | None,
) -> None:
    readers, writers = pools
    units = [piece for tensor in tensors for piece in pieces_of(tensor)]
    pending: Future[list[torch.Tensor]] | None = (
        readers.submit(read_piece, plan, units[0]) if units else None
    )
    written: Future[None] | None = None
    for position, unit in enumerate(units):
        check_cancel()
        assert pending is not None
        raw = pending.result()
        following = units[position + 1] if position + 1 < len(units) else None
        pending = readers.submit(read_piece, plan, following) if following is not None else None
        merged = merger.compute(unit, raw)
        del raw
        if written is not None:
            written.result()  # one write in flight at most: memory stays bounded
        written = writers.submit(_write, writer, unit, merged)
        if piece_done is not None:
            piece_done(unit, merged.numel() * merged.element_size())
    if written is not None:
        written.result()


def _write(writer: ShardWriter, unit: Piece, merged: torch.Tensor) -> None:
    if unit.start is None:
        writer.write(unit.tensor.name, merged)
    else:
        writer.write_rows(unit.tensor.name, unit.start, merged)
