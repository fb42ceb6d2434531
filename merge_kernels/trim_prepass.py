"""Trim thresholds found before merging, for trims that cannot see their whole scope at once.

Two cases need them:

- the TIES paper's model-wide trim: one magnitude threshold per model over its whole
  flattened task vector (PEFT and mergekit trim each tensor to its own top-k instead);
- a tensor too large to trim in one piece, merged in row chunks.

Either way the scope is a stream of pieces (tensors or row chunks). A streaming radix select
reads each model's task vector over the stream in two passes; when entries tie at the
threshold and ``exact_k`` must choose among them, the tied entries before each piece in the
stream's flat order are counted, but only up to the piece where the last kept tie lies:
past it every piece keeps none, whatever the exact count, so the counting pass stops there
(on bf16 task vectors, whose ties at the threshold are many, a fraction of the stream). The
merge then trims each piece with :func:`apply_threshold_mask` (or the fused loop) and gets
exactly the mask a whole-scope trim would give.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from merge_kernels.methods.compute_dtype import compute_dtype
from merge_kernels.methods.kernel import TrimState
from merge_kernels.methods.magnitude_select import (
    MagnitudeThreshold,
    StreamingMagnitudeSelect,
    TieRule,
)
from merge_kernels.pieces import Piece, PieceKey, read_piece
from merge_kernels.plan import MergePlan


def task_vectors(plan: MergePlan, piece: Piece) -> list[torch.Tensor]:
    """Each model's task vector over ``piece``, flattened, in float32.

    A recipe that computes in its dtype subtracts in that dtype first, so the magnitudes
    ranked are those of the task vectors the merge trims.
    """
    raw = read_piece(plan, piece)
    dtype = compute_dtype(plan.recipe, raw)
    base, *models = (tensor.to(dtype) for tensor in raw)
    return [(model - base).float().reshape(-1) for model in models]


def stream_trim_states(
    plan: MergePlan,
    pieces: Sequence[Piece],
    densities: Sequence[float],
    ties: TieRule,
    check_cancel: Callable[[], None],
) -> dict[PieceKey, tuple[TrimState, ...]]:
    """Each model's trim state for every piece of one trim scope.

    Args:
        plan: the merge plan (base first among its inputs).
        pieces: the scope, in the flat order the thresholds refer to.
        densities: per model, the fraction of the scope's entries to keep.
        ties: the tie rule at the threshold.
        check_cancel: called between pieces; raises to stop.

    Returns:
        Per piece key ``(tensor name, first row or None)``, one TrimState per model.
    """
    total = sum(piece.numel for piece in pieces)
    selectors = [StreamingMagnitudeSelect(total, min(total, int(d * total))) for d in densities]
    while any(selector.needs_pass() for selector in selectors):
        for piece in pieces:
            check_cancel()
            for selector, tau in zip(selectors, task_vectors(plan, piece), strict=True):
                if selector.needs_pass():
                    selector.update(tau)
        for selector in selectors:
            if selector.needs_pass():
                selector.end_pass()
    thresholds = [selector.result() for selector in selectors]
    return _with_ties_before(plan, pieces, thresholds, ties, check_cancel)


def _partial_ties(threshold: MagnitudeThreshold) -> bool:
    return threshold.k > 0 and threshold.keep_at_value > 0


def _with_ties_before(
    plan: MergePlan,
    pieces: Sequence[Piece],
    thresholds: list[MagnitudeThreshold],
    ties: TieRule,
    check_cancel: Callable[[], None],
) -> dict[PieceKey, tuple[TrimState, ...]]:
    """Each piece's trim states, with the tied entries before it (exact_k).

    Which tied entries exact_k keeps depends on how many came earlier in the flat order,
    but only until ``keep_at_value`` of them have: a model's count stops there, and the
    pieces after it get that count (at least ``keep_at_value``: they keep no tie).
    """
    seen = [0] * len(thresholds)
    states: dict[PieceKey, tuple[TrimState, ...]] = {}
    for piece in pieces:
        states[piece.key] = tuple(
            TrimState(threshold=threshold, ties_before=before)
            for threshold, before in zip(thresholds, seen, strict=True)
        )
        open_budget = [
            ties == "exact_k" and _partial_ties(t) and before < t.keep_at_value
            for t, before in zip(thresholds, seen, strict=True)
        ]
        if not any(open_budget):
            continue
        check_cancel()
        for index, tau in enumerate(task_vectors(plan, piece)):
            if open_budget[index]:
                seen[index] += _count_at(tau, thresholds[index])
    return states


def _count_at(tau: torch.Tensor, threshold: MagnitudeThreshold) -> int:
    """How many entries of ``tau`` have the threshold's magnitude (NaN is never one)."""
    return int(torch.eq(tau.abs(), threshold.value).sum())
