"""Trim thresholds found before merging, for trims that cannot see their whole scope at once.

Two cases need them:

- the TIES paper's model-wide trim: one magnitude threshold per model over its whole
  flattened task vector (PEFT and mergekit trim each tensor to its own top-k instead);
- a tensor too large to trim in one piece, merged in row chunks.

Either way the scope is a stream of pieces (tensors or row chunks). A streaming radix select
reads each model's task vector over the stream in two passes; when entries tie at the
threshold and ``exact_k`` must choose among them, one more pass counts, for every piece,
the tied entries before it in the stream's flat order. The merge then trims each piece with
:func:`apply_threshold_mask` and gets exactly the mask a whole-scope trim would give.
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
    apply_threshold_mask,
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
    # Which tied entries exact_k keeps depends on how many came earlier in the flat order.
    count = ties == "exact_k" and any(_partial_ties(t) for t in thresholds)
    seen = [0] * len(thresholds)
    states: dict[PieceKey, tuple[TrimState, ...]] = {}
    for piece in pieces:
        states[piece.key] = tuple(
            TrimState(threshold=threshold, ties_before=before)
            for threshold, before in zip(thresholds, seen, strict=True)
        )
        if count:
            check_cancel()
            for index, tau in enumerate(task_vectors(plan, piece)):
                _, seen[index] = apply_threshold_mask(tau, thresholds[index], seen[index])
    return states
