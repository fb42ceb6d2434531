"""A candidate merged in memory: the engine's own piece loop, kept instead of written.

The pieces are computed by the runner's :class:`~merge_kernels.piece_merger.PieceMerger`
in the runner's order, so the tensors are bit for bit those ``run_merge`` would write for the
same recipe, and a score measured in memory is the score of the written merge.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from merge_kernels.greedy_search import working_set_bytes
from merge_kernels.piece_merger import PieceMerger
from merge_kernels.pieces import pieces_of, read_piece
from merge_kernels.plan import MergePlan


def fits_in_memory(plan: MergePlan, memory_limit_bytes: int) -> bool:
    """Whether a candidate of ``plan`` is merged in memory: the greedy soup's working-set
    rule, and an output that keeps the inputs' config and tokenizer (no built vocabulary,
    no stacked layers), which an in-memory candidate borrows from its first input."""
    if plan.vocabulary is not None or plan.config_updates:
        return False
    return working_set_bytes(plan) <= memory_limit_bytes


def merge_in_memory(
    plan: MergePlan, device: str, check_cancel: Callable[[], None]
) -> dict[str, torch.Tensor]:
    """Every output tensor of ``plan``, in its output dtype, on the CPU."""
    merger = PieceMerger(plan, device, check_cancel)
    merger.prepare_model_trims()
    out: dict[str, torch.Tensor] = {}
    for tensor in plan.tensors:
        target: torch.Tensor | None = None
        for unit in pieces_of(tensor):
            check_cancel()
            merged = merger.compute(unit, read_piece(plan, unit))
            if unit.start is None:
                # The merger reuses its output buffers: keep a copy.
                target = merged.reshape(tensor.shape).clone()
                continue
            if target is None:
                target = torch.empty(tensor.shape, dtype=merged.dtype)
            target[unit.start : unit.stop].copy_(
                merged.reshape(target[unit.start : unit.stop].shape)
            )
        assert target is not None
        out[tensor.name] = target
    return out
