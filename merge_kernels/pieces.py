"""Pieces of work: a tensor, or a range of its rows, and reading one from every input.

The streaming runner, the trim pre-pass and the per-piece merge all walk the same pieces,
in the same order, so they share this one definition.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch

from merge_kernels.checkpoints.base import Checkpoint
from merge_kernels.embedding_rows import align_rows
from merge_kernels.plan import MergePlan, TensorPlan
from merge_kernels.thread_pools import shared_pool

READ_THREADS = 8  # most inputs read at once; fewer on a machine with fewer cores
# Below this many cores the merge itself keeps them busy, and parallel reads would only add
# memory in flight (about 0.1 GB measured on two cores, for no speed).
PARALLEL_READS_FROM_CORES = 4

PieceKey = tuple[str, int | None]


@dataclass(frozen=True)
class Piece:
    """A tensor, or rows ``start:stop`` of it."""

    tensor: TensorPlan
    start: int | None = None
    stop: int | None = None

    @property
    def key(self) -> PieceKey:
        return (self.tensor.name, self.start)

    @property
    def row_elements(self) -> int:
        """Entries per row of dim 0 (the whole tensor for a 0-d one)."""
        return self.tensor.numel // max(1, self.tensor.shape[0]) if self.tensor.shape else 1

    @property
    def numel(self) -> int:
        if self.start is None or self.stop is None:
            return self.tensor.numel
        return (self.stop - self.start) * self.row_elements

    @property
    def offset(self) -> int:
        """Flat index of the piece's first entry within its tensor."""
        return 0 if self.start is None else self.start * self.row_elements


def pieces_of(tensor: TensorPlan) -> list[Piece]:
    """The pieces the runner merges ``tensor`` in: whole, or its row chunks."""
    if tensor.rows_per_chunk is None:
        return [Piece(tensor)]
    rows = tensor.shape[0]
    step = tensor.rows_per_chunk
    return [Piece(tensor, start, min(rows, start + step)) for start in range(0, rows, step)]


def _read_one(checkpoint: Checkpoint, source: str, unit: Piece) -> torch.Tensor:
    if unit.start is None or unit.stop is None:
        return checkpoint.read(source)
    return checkpoint.read_rows(source, unit.start, unit.stop)


def _readers() -> ThreadPoolExecutor:
    return shared_pool("input", min(READ_THREADS, os.cpu_count() or 1))


def read_piece(plan: MergePlan, unit: Piece) -> list[torch.Tensor]:
    """Read ``unit`` from each input its tensor reads (``TensorPlan.inputs``, base first), in
    the inputs' own dtypes (the first input's alone for a tensor copied unmerged).

    On a machine with cores to spare (``PARALLEL_READS_FROM_CORES``) the inputs are read in
    parallel threads (reads release the GIL), copying from several files at once. An
    embedding or LM head aligned to a built vocabulary comes back with its output rows.
    """
    if unit.tensor.row_map is not None:
        return align_rows(_read_inputs(plan, unit), unit.tensor.row_map)
    return _read_inputs(plan, unit)


def _read_inputs(plan: MergePlan, unit: Piece) -> list[torch.Tensor]:
    positions = unit.tensor.inputs or tuple(range(len(plan.inputs)))
    if unit.tensor.params is None:  # copied from the first input only
        return [_read_one(plan.inputs[positions[0]].checkpoint, unit.tensor.sources[0], unit)]
    jobs = [
        (plan.inputs[position].checkpoint, source)
        for position, source in zip(positions, unit.tensor.sources, strict=True)
    ]
    if len(jobs) == 1 or (os.cpu_count() or 1) < PARALLEL_READS_FROM_CORES:
        return [_read_one(checkpoint, source, unit) for checkpoint, source in jobs]
    futures = [
        _readers().submit(_read_one, checkpoint, source, unit) for checkpoint, source in jobs
    ]
    return [future.result() for future in futures]
