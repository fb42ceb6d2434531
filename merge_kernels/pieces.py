"""Pieces of work: a tensor, or a range of its rows, and reading one from every input.

The streaming runner, the trim pre-pass and the per-piece merge all walk the same pieces,
in the same order, so they share this one definition.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from merge_kernels.plan import MergePlan, TensorPlan

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


def read_piece(plan: MergePlan, unit: Piece) -> list[torch.Tensor]:
    """Read ``unit`` from every input, in the inputs' own dtypes (the base's alone for a
    tensor copied unmerged)."""
    pieces = []
    for item, source in zip(plan.inputs, unit.tensor.sources, strict=True):
        if unit.start is None or unit.stop is None:
            pieces.append(item.checkpoint.read(source))
        else:
            pieces.append(item.checkpoint.read_rows(source, unit.start, unit.stop))
        if unit.tensor.params is None:
            break  # copied from the first input only
    return pieces
