"""Fused CPU loops for soups, task arithmetic and TIES.

Through torch a merge is one pass per step over each piece: every input widened to float32
in a buffer, a multiply, an add per model, masks, votes and counts for TIES, a divide, the
cast to the output dtype. On a machine with few cores those passes, not the file IO, bound
the merge. The C extension ``merge_kernels._fused`` (built from ``_fused.c`` at install
time, when a C compiler is there) runs them as one loop that reads every input once in its
stored dtype, does the same float32 operations in the same order (fused multiply-adds where
torch uses them) and rounds once, so its output is bit-identical to the torch path's;
without the extension, or for inputs it does not handle, the merge takes the torch path.

A method opts in through its :class:`~merge_kernels.registry.MethodSpec`: a
``weighted_form`` (its parameters as a :class:`WeightedSum`) or a ``consensus_form`` (as a
:class:`ConsensusForm`, for TIES); DARE's ``dare_form`` runs the same two loops with the
random drop in them (:mod:`merge_kernels.fused_dare`). Large pieces are split between
threads, one per core.
"""

from __future__ import annotations

import functools
import importlib
import math
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from types import ModuleType
from typing import Literal, TypeVar

import torch

from merge_kernels.methods.kernel import TrimState
from merge_kernels.methods.magnitude_select import MagnitudeThreshold
from merge_kernels.thread_pools import shared_pool


def _load_extension() -> ModuleType | None:
    try:
        return importlib.import_module("merge_kernels._fused")
    except ImportError:  # built without a C compiler: the torch path does the work
        return None


_fused = _load_extension()

T = TypeVar("T")

_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}

# A piece of at least this many entries is split between threads, one part per core (the
# loops release the GIL), up to _MAX_PARTS.
_SPLIT_FROM = 1 << 20
_MAX_PARTS = 8


def _pool() -> ThreadPoolExecutor:
    return shared_pool("fused", _MAX_PARTS)


def run_all(calls: Sequence[Callable[[], T]], *, parallel: bool = True) -> list[T]:
    """Each call's result, in order: on the pool when there are several (and ``parallel``)."""
    if len(calls) == 1 or not parallel:
        return [call() for call in calls]
    futures = [_pool().submit(call) for call in calls]
    return [future.result() for future in futures]


def parts(numel: int) -> list[tuple[int, int]]:
    """Ranges ``[start, stop)`` that split ``numel`` entries between the cores."""
    count = min(_MAX_PARTS, os.cpu_count() or 1) if numel >= _SPLIT_FROM else 1
    step = -(-numel // count)
    return [(start, min(numel, start + step)) for start in range(0, numel, step)]


@dataclass(frozen=True)
class WeightedSum:
    """A merge that is one weighted sum per entry.

    Without a base: Σ wᵢ·xᵢ, divided by ``divisor`` when it is set (the linear soup).
    With a base θ₀: θ₀ + ``scale`` · Σ wᵢ·(xᵢ − θ₀), the sum divided by ``divisor`` when set
    (task arithmetic).
    """

    weights: tuple[float, ...]
    divisor: float | None = None
    scale: float = 1.0


def available() -> bool:
    """Whether the fused loops were built."""
    return _fused is not None


def extension() -> ModuleType | None:
    """The C extension ``merge_kernels._fused``, or None when it was not built."""
    return _fused


def dtype_code(dtype: torch.dtype) -> int | None:
    return _CODES.get(dtype)


Loop = Literal["weighted", "ties"]


def handles(
    loop: Loop,
    out: torch.Tensor | torch.dtype,
    models: Sequence[torch.Tensor],
    inputs: Sequence[torch.Tensor],
) -> bool:
    """Whether ``loop`` takes these tensors: the extension is built, 1 to 8 models, every
    input a contiguous CPU tensor of one shape and one dtype, the output too (or, given as
    a dtype, about to be made so), and the loop built for that pair of dtypes."""
    if _fused is None or not 1 <= len(models) <= _fused.MAX_INPUTS or not inputs:
        return False
    dtype = inputs[0].dtype
    out_dtype = out if isinstance(out, torch.dtype) else out.dtype
    pairs = _fused.WEIGHTED_PAIRS if loop == "weighted" else _fused.TIES_PAIRS
    if (dtype_code(dtype), dtype_code(out_dtype)) not in pairs:
        return False
    numel = inputs[0].numel()
    tensors = [*inputs] if isinstance(out, torch.dtype) else [out, *inputs]
    return all(
        t.device.type == "cpu"
        and t.is_contiguous()
        and t.numel() == numel
        and (t is out or t.dtype == dtype)
        for t in tensors
    )


def weighted_sum_into(
    out: torch.Tensor,
    models: Sequence[torch.Tensor],
    form: WeightedSum,
    base: torch.Tensor | None = None,
) -> bool:
    """Compute ``form`` over ``models`` (and ``base``) into ``out``, if the loop handles them.

    Handled: CPU tensors, contiguous, of one shape; every input in one dtype and the output
    in any, among float32, bfloat16 and float16; 1 to 8 models.

    Returns:
        True when ``out`` holds the result; False when the inputs are not handled (``out``
        is untouched and the caller takes the torch path).
    """
    inputs = [*models, *([base] if base is not None else [])]
    if _fused is None or not handles("weighted", out, models, inputs):
        return False
    if len(form.weights) != len(models):
        raise ValueError(f"{len(form.weights)} weights for {len(models)} models")
    dtype = inputs[0].dtype
    in_code, out_code = dtype_code(dtype), dtype_code(out.dtype)
    assert in_code is not None and out_code is not None
    numel = out.numel()
    extension = _fused
    in_size, out_size = dtype.itemsize, out.dtype.itemsize

    def run(start: int, stop: int) -> None:
        extension.weighted(
            out.data_ptr() + start * out_size,
            out_code,
            [m.data_ptr() + start * in_size for m in models],
            in_code,
            list(form.weights),
            form.divisor is not None,
            form.divisor if form.divisor is not None else 1.0,
            base.data_ptr() + start * in_size if base is not None else 0,
            form.scale,
            stop - start,
        )

    run_all([functools.partial(run, *part) for part in parts(numel)])
    return True


# --- TIES ----------------------------------------------------------------------------------

_SMALL_TRIM = 1 << 16  # at or below this many entries the torch selection is as fast
_SAMPLE_EVERY = 256  # the threshold's sample takes one entry in this many...
_SAMPLE_MIN = 1 << 12  # ...but at least this many
_SIGMAS = 5.0  # bracket half-width in binomial standard deviations of the sample rank
_INF_BITS = 0x7F800000
_KEEP_NONE = 0xFFFFFFFF  # above every magnitude's bit pattern: nothing is kept


@dataclass(frozen=True)
class ConsensusForm:
    """TIES' options as the fused loop takes them (see ``_fused.c``)."""

    threshold_rule: bool  # keep every |τ| equal to the threshold (else exactly k)
    weighted_election: bool
    frequency: bool  # elect on the count of signs (else on the sum)
    divisor: int  # 0 count of agreeing models, 1 sum of their weights, 2 none
    scale: float


def _bits(value: float) -> int:
    return int(torch.tensor(value, dtype=torch.float32).view(torch.int32).item()) & 0x7FFFFFFF


def _float(bits: int) -> float:
    return float(torch.tensor(bits, dtype=torch.int32).view(torch.float32).item())


def trim_threshold(model: torch.Tensor, base: torch.Tensor, k: int) -> FusedTrim | None:
    """The k-th largest |model − base|, its tie count and the last tied entry exact_k keeps,
    as :func:`~merge_kernels.methods.magnitude_select.magnitude_threshold_with_ties` finds
    them on the float32 task vector, without materialising the task vector.

    A strided sample brackets the k-th largest magnitude; one fused pass counts the entries
    above the bracket and at its ends and collects those inside (in flat order, with how
    many each chunk of ``BRACKET_CHUNK`` entries held at each end and inside), and the k-th
    is selected among those. The tied entry where exact_k stops keeping is then found from
    the chunk counts and a look at one chunk: however many entries tie, no second pass.
    Returns None when the loop cannot answer (no extension, unsupported inputs, a small
    tensor, NaN, or the sample's bracket missed): the caller then selects on the torch path,
    which is exact too.
    """
    n = model.numel()
    if (
        n <= _SMALL_TRIM
        or not 0 < k < n
        or not handles("ties", model.dtype, [model], [base, model])
    ):
        return None
    assert _fused is not None
    code = dtype_code(model.dtype)
    flat_model, flat_base = model.reshape(-1), base.reshape(-1)
    stride = max(1, n // max(_SAMPLE_MIN, n // _SAMPLE_EVERY)) | 1
    first = stride // 2
    sample = torch.sub(flat_model[first::stride].float(), flat_base[first::stride].float()).abs_()
    if torch.isnan(sample).any():
        return None
    ordered = sample.sort(descending=True).values
    s = ordered.numel()
    rank = k * s / n  # the k-th largest of the tensor sits near this sample rank
    half = _SIGMAS * math.sqrt(rank * (1.0 - rank / s)) + 2.0
    top, bottom = math.floor(rank - half), math.ceil(rank + half)
    hi = _bits(float(ordered[top - 1])) if top >= 1 else _INF_BITS
    lo = _bits(float(ordered[bottom - 1])) if bottom <= s else 0
    if hi == 0:
        return None  # most magnitudes are 0: the torch path counts them faster
    lo = min(lo, hi - 1)
    cap = max(n // 8, 1)
    candidates = torch.empty(cap + 1, dtype=torch.float32)  # the loop may write slot cap
    chunk = _fused.BRACKET_CHUNK
    rows = torch.empty(3, -(-n // chunk), dtype=torch.int32)  # at hi, at lo, inside
    above, at_hi, at_lo, inside, nan = _fused.bracket(
        model.data_ptr(),
        base.data_ptr(),
        code,
        n,
        lo,
        hi,
        candidates.data_ptr(),
        cap,
        rows.data_ptr(),
    )
    if nan or inside > cap:
        return None
    ties = _TieFinder(flat_model, flat_base, rows, chunk)
    if k <= above:
        return None  # the bracket is too low
    if k <= above + at_hi:
        keep = k - above
        return FusedTrim(
            MagnitudeThreshold(_float(hi), keep, k), at_hi, ties.at_end(0, hi, keep, at_hi)
        )
    if k <= above + at_hi + inside:
        pool = candidates[:inside]
        rank_in_pool = k - above - at_hi  # 1 = the largest in the pool
        value = pool.kthvalue(inside - rank_in_pool + 1).values
        greater = above + at_hi + int((pool > value).sum())
        tied = torch.nonzero(pool == value).view(-1)
        keep = k - greater
        cutoff = n if keep == tied.numel() else ties.inside(int(tied[keep - 1]), lo, hi)
        return FusedTrim(MagnitudeThreshold(float(value), keep, k), tied.numel(), cutoff)
    if k <= above + at_hi + inside + at_lo:
        keep = k - above - at_hi - inside
        return FusedTrim(
            MagnitudeThreshold(_float(lo), keep, k), at_lo, ties.at_end(1, lo, keep, at_lo)
        )
    return None  # the bracket is too high


@dataclass(frozen=True)
class FusedTrim:
    """One model's trim threshold over a whole tensor, as :func:`trim_threshold` finds it.

    Attributes:
        threshold: the k-th largest magnitude and the number of tied entries exact_k keeps.
        count_at_value: every entry whose magnitude equals the threshold, kept or not.
        cutoff: the flat index of the last tied entry exact_k keeps (``numel`` when it keeps
            them all): what :func:`ties_into` needs to keep them in one pass.
    """

    threshold: MagnitudeThreshold
    count_at_value: int
    cutoff: int


@dataclass(frozen=True)
class _TieFinder:
    """Finds a tied entry from the bracket pass's per-chunk counts and one chunk's entries."""

    model: torch.Tensor  # flat
    base: torch.Tensor
    rows: torch.Tensor  # int32 (3, chunks): at hi, at lo, inside
    chunk: int

    def _bits(self, index: int) -> tuple[int, torch.Tensor]:
        start = index * self.chunk
        stop = min(self.model.numel(), start + self.chunk)
        tau = torch.sub(self.model[start:stop].float(), self.base[start:stop].float())
        return start, tau.view(torch.int32) & 0x7FFFFFFF

    def _chunk_of(self, row: int, rank: int) -> tuple[int, int]:
        """The chunk holding the ``rank``-th (1-based) entry counted in ``row``, and its rank
        within that chunk."""
        running = self.rows[row].to(torch.int64).cumsum(0)
        index = int(torch.searchsorted(running, torch.tensor([rank])).item())
        before = int(running[index - 1]) if index else 0
        return index, rank - before

    def at_end(self, row: int, bits: int, keep: int, count: int) -> int:
        """The last kept tie when the threshold is the bracket end counted in ``row``."""
        if keep == count:
            return self.model.numel()
        index, rank = self._chunk_of(row, keep)
        start, mags = self._bits(index)
        return start + int(torch.nonzero(mags == bits).view(-1)[rank - 1])

    def inside(self, position: int, lo: int, hi: int) -> int:
        """The flat index of the candidate at ``position`` (0-based) of the collected pool."""
        index, rank = self._chunk_of(2, position + 1)
        start, mags = self._bits(index)
        inside = torch.nonzero((mags > lo) & (mags < hi)).view(-1)
        return start + int(inside[rank - 1])


def trim_thresholds(
    models: Sequence[torch.Tensor], base: torch.Tensor, ks: Sequence[int]
) -> list[FusedTrim | None]:
    """:func:`trim_threshold` for each model, the models in parallel threads."""
    parallel = (os.cpu_count() or 1) > 1 and base.numel() >= _SPLIT_FROM
    calls = [functools.partial(trim_threshold, m, base, k) for m, k in zip(models, ks, strict=True)]
    return run_all(calls, parallel=parallel)


def ties_into(
    out: torch.Tensor,
    base: torch.Tensor,
    models: Sequence[torch.Tensor],
    form: ConsensusForm,
    weights: Sequence[float],
    trims: Sequence[TrimState],
    cutoffs: Sequence[int | None] | None = None,
) -> list[int] | None:
    """The TIES merge of ``models`` over ``base`` into ``out``, given each model's trim.

    Args:
        cutoffs: per model, where known, the index in this piece of the last tied entry
            exact_k keeps (-1 for none, ``numel`` or more for all), as :class:`FusedTrim`
            has it. Where it is not known (None) and the piece's tie budget is open, it is
            found by a scan that stops at that entry.

    Returns:
        Each model's count of entries at its threshold up to the end of this piece (the
        ``ties_before`` of the next piece), or None when the loop does not handle the
        inputs or met a NaN (``out`` may be partly written; the caller takes the torch
        path, which reports the NaN).
    """
    if _fused is None or not handles("ties", out, models, [base, *models]):
        return None
    dtype = base.dtype
    in_code, out_code = dtype_code(dtype), dtype_code(out.dtype)
    assert in_code is not None and out_code is not None
    numel = out.numel()
    thresholds = [
        _KEEP_NONE if state.threshold.k == 0 else _bits(state.threshold.value) for state in trims
    ]
    if not numel:
        return [state.ties_before for state in trims]
    extension = _fused
    size = dtype.itemsize
    known = list(cutoffs) if cutoffs is not None else [None] * len(trims)

    def last_kept(index: int) -> int:
        state, model = trims[index], models[index]
        if state.threshold.k == 0:
            return -1
        if form.threshold_rule:
            return numel
        found = known[index]
        if found is not None:
            return found
        budget = state.threshold.keep_at_value - state.ties_before
        if budget <= 0:
            return -1
        at, _ = extension.locate_tie(
            model.data_ptr(), base.data_ptr(), in_code, numel, thresholds[index], budget
        )
        return int(at) if at >= 0 else numel  # fewer ties than the budget: all kept

    lasts = run_all([functools.partial(last_kept, i) for i in range(len(trims))])

    def run(start: int, stop: int) -> tuple[list[int], int]:
        counts, nan = extension.ties(
            out.data_ptr() + start * out.dtype.itemsize,
            out_code,
            [m.data_ptr() + start * size for m in models],
            base.data_ptr() + start * size,
            in_code,
            [float(w) for w in weights],
            thresholds,
            [last - start for last in lasts],
            form.weighted_election,
            form.frequency,
            form.divisor,
            form.scale,
            stop - start,
        )
        return list(counts), nan

    results = run_all([functools.partial(run, *part) for part in parts(numel)])
    if any(nan for _, nan in results):
        return None
    return [
        state.ties_before + sum(counts[i] for counts, _ in results) for i, state in enumerate(trims)
    ]


# --- DARE keep masks -------------------------------------------------------------------------

_DARE_MASK, _DARE_UNIFORM, _DARE_PROB_F32, _DARE_PROB_F64 = 0, 1, 2, 3
_PROB_MODES = {torch.float32: _DARE_PROB_F32, torch.float64: _DARE_PROB_F64}


def dare_hash_handles(out: torch.Tensor, probabilities: torch.Tensor | None = None) -> bool:
    """Whether :func:`dare_keep_into` / :func:`dare_uniform_into` take these tensors: the
    extension is built, and they are contiguous CPU tensors (the probabilities float32 or
    float64)."""
    if _fused is None or not hasattr(_fused, "dare"):
        return False
    tensors = [out] if probabilities is None else [out, probabilities]
    if probabilities is not None and probabilities.dtype not in _PROB_MODES:
        return False
    return all(t.device.type == "cpu" and t.is_contiguous() for t in tensors)


def _dare_run(
    out: torch.Tensor,
    mode: int,
    key: int,
    offset: int,
    threshold: int = 0,
    probabilities: torch.Tensor | None = None,
) -> int:
    """The hash loop over ``out``'s entries, split between threads; the count of invalid
    probabilities."""
    assert _fused is not None
    extension = _fused
    out_size = out.element_size()
    p_size = probabilities.element_size() if probabilities is not None else 0

    def run(start: int, stop: int) -> int:
        probs = probabilities.data_ptr() + start * p_size if probabilities is not None else 0
        return int(
            extension.dare(
                out.data_ptr() + start * out_size,
                mode,
                key,
                offset + start,
                stop - start,
                threshold,
                probs,
            )
        )

    numel = out.numel()
    if not numel:
        return 0
    return sum(run_all([functools.partial(run, *part) for part in parts(numel)]))


def dare_keep_into(out: torch.Tensor, key: int, offset: int, threshold: int) -> None:
    """Write into ``out`` (1-D bool) whether DARE keeps elements ``offset ..``: their hash
    ``u(key, i)`` below ``threshold`` (``< 2^32``); see :mod:`~merge_kernels.methods.random_mask`.
    The caller has checked :func:`dare_hash_handles` and the ranges."""
    _dare_run(out.view(torch.uint8), _DARE_MASK, key, offset, threshold)


def dare_uniform_into(out: torch.Tensor, key: int, offset: int) -> None:
    """Write the 32-bit hashes ``u(key, i)`` of elements ``offset ..`` into ``out`` (1-D
    int32, holding the unsigned values' bits)."""
    _dare_run(out, _DARE_UNIFORM, key, offset)


def dare_keep_with_probabilities_into(
    out: torch.Tensor, key: int, offset: int, probabilities: torch.Tensor
) -> bool:
    """Write into ``out`` (1-D bool) whether ``u(key, i) < round(pᵢ·2^32)``, the
    probabilities 1-D, float32 or float64, as long as ``out``.

    Returns:
        False when a probability lies outside ``[0, 1]`` (NaN included): ``out`` is then
        meaningless and the caller raises.
    """
    mode = _PROB_MODES[probabilities.dtype]
    return _dare_run(out.view(torch.uint8), mode, key, offset, 0, probabilities) == 0
