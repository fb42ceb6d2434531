"""The TIES paper's model-wide trim, as a map-reduce over the tasks that merge the shards.

The local executor finds the model-wide thresholds with
:func:`~merge_kernels.trim_prepass.stream_trim_states`: one streaming radix select per model
reads the whole trim scope twice (a histogram of the high bits of every magnitude, then of
the low bits inside the bucket that holds the k-th largest), then a last pass counts, for
every piece, the entries tied at the threshold that come before it in the scope's flat order.

Spread over tasks, each pass is a map and a reduce: every task feeds its own shards' pieces
to a copy of each model's selector and returns the copy (histograms: a few hundred KB, never
tensors of the model); the driver adds the copies up and ends the pass. The tie counts come
back per piece and become running totals in the plan's order. Histogram counts add up in
any order, so the thresholds and trim states are exactly those of the local executor.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Collection, Iterable, Sequence
from dataclasses import dataclass

import torch

from merge_kernels.errors import NonFiniteOutputError
from merge_kernels.methods.kernel import TrimState
from merge_kernels.methods.magnitude_select import (
    MagnitudeThreshold,
    NaNMagnitudeError,
    StreamingMagnitudeSelect,
    TieRule,
    apply_threshold_mask,
)
from merge_kernels.methods.task_arithmetic import TiesParams
from merge_kernels.pieces import Piece, PieceKey, pieces_of
from merge_kernels.plan import MergePlan
from merge_kernels.trim_prepass import task_vectors

TieCounts = dict[PieceKey, list[int]]


class MergeableSelect(StreamingMagnitudeSelect):
    """A streaming magnitude select whose passes can be split between processes.

    A copy taken at the start of a pass (:meth:`blank`) is fed part of the stream elsewhere;
    :meth:`absorb` adds what it saw to this selector, which ends the pass once every part
    is in.
    """

    def blank(self) -> MergeableSelect:
        """A copy at the start of the current pass, that has seen nothing of it yet."""
        part = copy.copy(self)
        part._seen, part._hist, part._max_bits = 0, None, None
        return part

    def absorb(self, part: MergeableSelect) -> None:
        """Add the entries ``part`` saw in the current pass to those this selector saw.

        Raises:
            ValueError: ``part`` is at another pass, or the parts saw more entries than the
                stream holds.
        """
        if (part._pass, part._bucket, part._total) != (self._pass, self._bucket, self._total):
            raise ValueError("the parts of a streaming select must be at the same pass")
        if part._hist is None or part._max_bits is None:
            return
        if self._seen + part._seen > self._total:
            raise ValueError(
                f"the parts saw more than the {self._total} entries the stream was declared with"
            )
        self._seen += part._seen
        if self._hist is None or self._max_bits is None:
            self._hist, self._max_bits = part._hist.clone(), part._max_bits.clone()
        else:
            self._hist += part._hist
            torch.maximum(self._max_bits, part._max_bits, out=self._max_bits)


@dataclass(frozen=True)
class TrimScope:
    """The pieces a model-wide trim ranks, in the flat order its thresholds refer to.

    Attributes:
        pieces: every piece of every tensor trimmed model-wide, in the plan's order.
        densities: per model, the fraction of the scope's entries it keeps.
        ties: the tie rule at the threshold.
    """

    pieces: tuple[Piece, ...]
    densities: tuple[float, ...]
    ties: TieRule

    @property
    def numel(self) -> int:
        return sum(piece.numel for piece in self.pieces)

    def in_shards(self, plan: MergePlan, filenames: Collection[str]) -> list[Piece]:
        """The scope's pieces that shards ``filenames`` hold, in the scope's order."""
        names = {t.name for s in plan.shards if s.filename in filenames for t in s.tensors}
        return [piece for piece in self.pieces if piece.tensor.name in names]


def model_trim_scope(plan: MergePlan) -> TrimScope | None:
    """The plan's model-wide trim scope, or None when nothing is trimmed model-wide."""
    tensors = [t for t in plan.tensors if t.trim == "model_prepass"]
    # no models besides the base: nothing to trim (as PieceMerger.prepare_model_trims)
    if not tensors or not any(t.params is not None and t.params.models for t in tensors):
        return None
    first = tensors[0].params
    assert first is not None
    ties: TieRule = first.method.trim_ties if isinstance(first.method, TiesParams) else "exact_k"
    return TrimScope(
        pieces=tuple(piece for tensor in tensors for piece in pieces_of(tensor)),
        densities=tuple(getattr(p, "density", None) or 1.0 for p in first.models),
        ties=ties,
    )


# -- the maps: run where the shards are merged -----------------------------------------------


def histogram_part(
    plan: MergePlan,
    scope: TrimScope,
    filenames: Collection[str],
    selectors: Sequence[MergeableSelect],
) -> list[MergeableSelect]:
    """Each model's selector fed the current pass over the pieces of shards ``filenames``."""
    parts = [selector.blank() for selector in selectors]
    for piece in scope.in_shards(plan, filenames):
        for part, tau in zip(parts, task_vectors(plan, piece), strict=True):
            if part.needs_pass():
                part.update(tau)
    return parts


def tie_counts_part(
    plan: MergePlan,
    scope: TrimScope,
    filenames: Collection[str],
    thresholds: Sequence[MagnitudeThreshold],
) -> TieCounts:
    """Per piece of shards ``filenames``, each model's count of entries tied at its threshold."""
    counts: TieCounts = {}
    for piece in scope.in_shards(plan, filenames):
        counts[piece.key] = [
            apply_threshold_mask(tau, threshold, 0)[1]
            for tau, threshold in zip(task_vectors(plan, piece), thresholds, strict=True)
        ]
    return counts


# -- the reduce: runs on the driver ------------------------------------------------------------


def reduce_model_trims(
    scope: TrimScope,
    map_histograms: Callable[[list[MergeableSelect]], Iterable[list[MergeableSelect]]],
    map_tie_counts: Callable[[list[MagnitudeThreshold]], Iterable[TieCounts]],
) -> dict[PieceKey, tuple[TrimState, ...]]:
    """Each model's trim state for every piece of ``scope``, from maps over all its shards.

    Args:
        scope: the model-wide trim scope.
        map_histograms: runs :func:`histogram_part` over every shard of the scope (each
            shard once) with the given selectors and yields the parts.
        map_tie_counts: runs :func:`tie_counts_part` likewise with the thresholds.

    Raises:
        NonFiniteOutputError: an input holds NaN where the trim ranks magnitudes.
    """
    total = scope.numel
    selectors = [MergeableSelect(total, min(total, int(d * total))) for d in scope.densities]
    while any(selector.needs_pass() for selector in selectors):
        for parts in map_histograms(selectors):
            for selector, part in zip(selectors, parts, strict=True):
                if selector.needs_pass():
                    selector.absorb(part)
        try:
            for selector in selectors:
                if selector.needs_pass():
                    selector.end_pass()
        except NaNMagnitudeError:
            raise NonFiniteOutputError(
                "an input holds NaN in a tensor that the model-wide trim ranks by magnitude, "
                "where NaN has no order: fix or replace that checkpoint (trim_scope: tensor "
                "names the tensor)",
                details={"tensor": None},
            ) from None
    thresholds = [selector.result() for selector in selectors]
    # Which tied entries exact_k keeps depends on how many came earlier in the flat order.
    partial = any(t.k > 0 and t.keep_at_value > 0 for t in thresholds)
    counts: TieCounts = {}
    if scope.ties == "exact_k" and partial:
        for counted in map_tie_counts(thresholds):
            counts.update(counted)
        missing = [piece.key for piece in scope.pieces if piece.key not in counts]
        if missing:
            raise RuntimeError(f"no tie counts came back for pieces {missing[:5]}")
    seen = [0] * len(thresholds)
    states: dict[PieceKey, tuple[TrimState, ...]] = {}
    for piece in scope.pieces:
        states[piece.key] = tuple(
            TrimState(threshold=threshold, ties_before=before)
            for threshold, before in zip(thresholds, seen, strict=True)
        )
        for index, count in enumerate(counts.get(piece.key, ())):
            seen[index] += count
    return states
