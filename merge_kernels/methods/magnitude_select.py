"""Exact top-k by magnitude, for the trim step of TIES-Merging.

TIES-Merging (Yadav et al., NeurIPS 2023, arXiv 2306.01708) trims each task vector to the
k = ⌊density·n⌋ entries of largest magnitude. Sorting every tensor (as mergekit does) or
calling ``torch.kthvalue`` costs many seconds per gigabyte; this module finds the exact k-th
largest magnitude in a few linear passes instead, and defines one deterministic rule for
the entries tied with it, so the same mask comes out whether a tensor is trimmed whole, in
row chunks, or as part of a model-wide stream.

How the k-th largest magnitude is found:

- One tensor (:func:`magnitude_threshold`): a strided sample (one entry in 64, at most
  2^20) gives two order statistics ``lo <= hi`` that bracket the k-th largest magnitude
  with a margin of six binomial standard deviations. One pass over the tensor counts the
  entries above the bracket and collects the few inside it (block-wise: only the blocks of
  32 that hold any are gathered); the k-th largest among those is then selected the same
  way, as are the sample's order statistics. A bracket end that the sample holds many
  times (tied values: task vectors of bf16 checkpoints take few distinct values) has its
  entries counted rather than collected, and may itself be the answer. Should the sample
  mislead, the bracket is opened on the side the answer escaped to, and as a last resort
  the radix select below runs: the answer is always exact, only the time varies.
- A stream of tensors (:class:`StreamingMagnitudeSelect`, the paper's one threshold per
  model over the whole flattened task vector): a two-pass radix select on the bit patterns,
  a histogram of the top 15 bits and then of the low 16 bits inside the chosen bucket.
- Masks and the radix select compare int32 bit patterns with the sign bit cleared (which
  folds -0.0 onto 0.0): for non-negative floats these order like the values, +inf
  included. NaN patterns would sort above +inf, so NaN is rejected up front, by one float
  sum that is checked entry by entry only when it comes out NaN.

On the CPU, work proceeds in chunks of about a million entries written into preallocated
buffers: a pass over a fresh temporary as large as the tensor costs more in page faults and
memory traffic than the arithmetic, and fewer, larger operations keep the threads' fork and
join overhead small. Only torch operations are used, so the same code runs on CUDA tensors;
there a whole-tensor mask is found in one shot when memory allows (:mod:`.device_select`).
Scratch memory stays well below the size of the tensor.

Ties: entries whose magnitude equals the k-th largest are kept first-come in flat
(row-major) order under ``exact_k`` (exactly k entries survive), or all kept under
``threshold`` (the paper's ``|τ| ≥ value``, which may keep more than k).
"""

from __future__ import annotations

import math
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal

import torch

from merge_kernels.methods.device_select import device_top_k_mask

TieRule = Literal["exact_k", "threshold"]

_ABS_MASK = 0x7FFFFFFF  # clears the float32 sign bit
_INF_BITS = 0x7F800000  # +inf; every larger pattern (sign cleared) is a NaN
_CPU_CHUNK = 1 << 20  # elements per CPU chunk: buffers stay in cache, few parallel regions
_CUDA_CHUNK = 1 << 22  # elements per chunk elsewhere: few launches, bounded scratch
_MIN_CHUNK = 1 << 14  # smaller tensors still get chunks this large
_SMALL = 1 << 16  # at or below this, a direct kthvalue beats sampling
_GPU_SORT = 1 << 20  # on a GPU, samples and pools up to this size are sorted
_SAMPLE_MIN = 1 << 12
_SAMPLE_MAX = 1 << 20
_SAMPLE_SHARE = 64  # sample one entry in this many (within the bounds above)
_SIGMAS = 6.0  # bracket half-width in binomial standard deviations of the sample rank
_BLOCK = 32  # candidate extraction first finds the blocks of this many that hold any
_HI_BITS = 15  # radix pass 1 buckets the top 15 bits of the 31-bit magnitude pattern
_LO_BITS = 16  # radix pass 2 resolves the low 16 bits inside the chosen bucket


@dataclass(frozen=True)
class MagnitudeThreshold:
    """The k-th largest magnitude of a tensor or stream, and how its ties are kept.

    Attributes:
        value: The k-th largest ``|x|`` (a float32 value); ``+inf`` when ``k == 0``.
        keep_at_value: How many entries with ``|x| == value`` are kept under ``exact_k``:
            the first ones in flat row-major order (of the tensor, or of the stream).
        k: How many entries are kept under ``exact_k``.
    """

    value: float
    keep_at_value: int
    k: int


@dataclass(frozen=True)
class _Selection:
    """A threshold with the counts the mask pass can use to skip work."""

    threshold: MagnitudeThreshold
    count_at_value: int  # every entry with |x| == value, kept or not
    # Entries with |x| == value per chunk of _chunk_size(device, n), when known and needed
    # (some but not all ties kept): the exact_k mask then takes a single pass.
    chunk_ties: list[int] | None = None


def magnitude_threshold(x: torch.Tensor, k: int) -> MagnitudeThreshold:
    """The exact k-th largest magnitude of ``x`` and the tie count that makes top-k exact.

    Args:
        x: A float32 tensor of any shape, on any device (float16 and bfloat16 are widened
            to float32, which is exact). ``-0.0`` counts as ``0.0``; ``±inf`` are ordinary
            values.
        k: How many entries to keep, ``0 <= k <= x.numel()``.

    Returns:
        The threshold: ``value`` is the k-th largest ``|x|`` (``+inf`` for ``k == 0``) and
        ``keep_at_value = k - #{|x| > value}``.

    Raises:
        TypeError: ``x`` is not a floating-point tensor of 32 bits or fewer, or ``k`` is
            not an int.
        ValueError: ``k`` is out of range, or ``x`` contains NaN.
    """
    return _select(x, k).threshold


def magnitude_threshold_with_ties(x: torch.Tensor, k: int) -> tuple[MagnitudeThreshold, int]:
    """:func:`magnitude_threshold`, plus how many entries equal the threshold value.

    A caller that trims in pieces needs the running count of tied entries only when some,
    but not all, of them are kept (``0 < keep_at_value < count``).

    Returns:
        The threshold and the number of entries with ``|x| == value``, kept or not.
    """
    selection = _select(x, k)
    return selection.threshold, selection.count_at_value


def top_k_magnitude_mask(x: torch.Tensor, k: int, *, ties: TieRule = "exact_k") -> torch.Tensor:
    """The entries of ``x`` that a magnitude trim to k entries keeps, as a bool mask.

    Args:
        x: A float32 tensor of any shape, on any device (see :func:`magnitude_threshold`).
        k: How many entries to keep, ``0 <= k <= x.numel()``.
        ties: ``exact_k`` keeps exactly k entries: every ``|x| > value`` plus the first
            ``keep_at_value`` entries with ``|x| == value`` in flat row-major order.
            ``threshold`` keeps every ``|x| >= value`` (the TIES paper's rule), which may
            be more than k when the k-th magnitude is tied.

    Returns:
        A bool tensor shaped like ``x``: all False for ``k == 0``, all True for
        ``k == x.numel()``.

    Raises:
        TypeError, ValueError: as :func:`magnitude_threshold`, or ``ties`` is unknown.
    """
    _check_ties(ties)
    flat = _flat_float32(x, "x")
    n = flat.numel()
    _check_k(k, n)
    if k == n:
        # Even an all-kept trim must reject NaN, as every other k does.
        _raise_if_nan(flat, "x")
        return torch.ones(x.shape, dtype=torch.bool, device=x.device)
    if flat.device.type != "cpu" and k:
        _raise_if_nan(flat, "x")
        found = device_top_k_mask(flat, k, exact_k=ties == "exact_k")
        if found is not None:
            return found.view(x.shape)
    selection = _select_flat(flat, k)
    threshold = selection.threshold
    mask = torch.empty(n, dtype=torch.bool, device=flat.device)
    if k == 0:
        mask.zero_()
    elif ties == "threshold" or threshold.keep_at_value == selection.count_at_value:
        _compare_into(flat, _float_to_bits(threshold.value), mask, strict=False)
    elif selection.chunk_ties is not None:
        _exact_k_known(flat, threshold, selection.chunk_ties, mask)
    else:
        _exact_k_into(flat, threshold, 0, mask, count_all=False)
    return mask.view(x.shape)


def apply_threshold_mask(
    chunk: torch.Tensor,
    threshold: MagnitudeThreshold,
    ties_seen: int,
    *,
    ties: TieRule = "exact_k",
) -> tuple[torch.Tensor, int]:
    """The trim mask of one chunk of a larger tensor or stream, given a threshold found over it.

    Feeding the chunks of a tensor (or the tensors of a stream) in flat order, each with
    the ``ties_seen`` the previous call returned (0 for the first), gives exactly the mask
    :func:`top_k_magnitude_mask` gives for the whole.

    Args:
        chunk: A float32 tensor of any shape: the next entries of the flat order.
        threshold: From :func:`magnitude_threshold` or :class:`StreamingMagnitudeSelect`
            over the whole tensor or stream.
        ties_seen: How many entries with ``|x| == threshold.value`` came before this
            chunk in the flat order.
        ties: ``exact_k`` or ``threshold``, as in :func:`top_k_magnitude_mask`.

    Returns:
        ``(mask, ties_seen_after)``: a bool mask shaped like ``chunk``, and ``ties_seen``
        plus the number of entries of ``chunk`` with ``|x| == threshold.value`` (counted
        under either rule, kept or not).

    Raises:
        TypeError: ``chunk`` is not a floating-point tensor of 32 bits or fewer.
        ValueError: ``chunk`` contains NaN, ``ties_seen`` is negative, or ``ties`` is
            unknown.
    """
    _check_ties(ties)
    if ties_seen < 0:
        raise ValueError(f"ties_seen must be >= 0, got {ties_seen}")
    flat = _flat_float32(chunk, "chunk")
    _raise_if_nan(flat, "chunk")
    mask = torch.empty(flat.numel(), dtype=torch.bool, device=flat.device)
    if threshold.k == 0:
        mask.zero_()
        seen = ties_seen + _count_equal(flat, _float_to_bits(threshold.value))
    elif ties == "threshold":
        _compare_into(flat, _float_to_bits(threshold.value), mask, strict=False)
        seen = ties_seen + _count_equal(flat, _float_to_bits(threshold.value))
    else:
        seen = _exact_k_into(flat, threshold, ties_seen, mask, count_all=True)
    return mask.view(chunk.shape), seen


class StreamingMagnitudeSelect:
    """The exact k-th largest magnitude over a stream of chunks, in two passes.

    For the TIES paper's model-wide trim: one threshold over a whole flattened task vector
    that is never held in memory at once. A radix select over the float32 bit patterns:
    pass 1 histograms the top 15 bits (32768 bins), pass 2 the low 16 bits inside the
    bucket that holds the k-th largest (65536 bins); memory is the histograms alone.
    ``k == 0`` takes one pass, which only checks the stream.

    Usage::

        sel = StreamingMagnitudeSelect(total_numel, k)
        while sel.needs_pass():
            for chunk in stream():
                sel.update(chunk)
            sel.end_pass()
        threshold = sel.result()

    Every pass must visit the same entries (the order may differ between passes; the
    ``keep_at_value`` of the result refers to the flat order the masks are later applied
    in, see :func:`apply_threshold_mask`).
    """

    def __init__(self, total_numel: int, k: int) -> None:
        """Start a selection of the k largest magnitudes among ``total_numel`` entries.

        Raises:
            TypeError: ``total_numel`` or ``k`` is not an int.
            ValueError: ``total_numel`` is negative or ``k`` is outside ``[0, total_numel]``.
        """
        if isinstance(total_numel, bool) or not isinstance(total_numel, int):
            raise TypeError(f"total_numel must be an int, got {type(total_numel).__name__}")
        if total_numel < 0:
            raise ValueError(f"total_numel must be >= 0, got {total_numel}")
        _check_k(k, total_numel)
        self._total = total_numel
        self._k = k
        self._pass = 0  # passes finished
        self._seen = 0  # entries seen in the current pass
        self._hist: torch.Tensor | None = None
        self._max_bits: torch.Tensor | None = None
        self._bucket = -1  # the pass-1 bucket holding the k-th largest
        self._above_bucket = 0  # entries in buckets above it
        self._result: MagnitudeThreshold | None = None
        self._count_at_value = 0  # entries with |x| == the result's value, once known
        if total_numel == 0:
            self._result = MagnitudeThreshold(math.inf, 0, 0)

    def needs_pass(self) -> bool:
        """Whether another pass over the stream is needed before :meth:`result`."""
        return self._result is None

    def update(self, chunk: torch.Tensor) -> None:
        """Feed the next chunk of the current pass (any shape, float32, any device).

        Raises:
            RuntimeError: no pass is needed any more.
            TypeError: ``chunk`` is not a floating-point tensor of 32 bits or fewer.
            ValueError: the pass has seen more than ``total_numel`` entries.
        """
        if self._result is not None:
            raise RuntimeError("StreamingMagnitudeSelect: no pass is needed; call result()")
        flat = _flat_float32(chunk, "chunk")
        n = flat.numel()
        if self._seen + n > self._total:
            raise ValueError(
                f"the stream has more than the {self._total} entries it was declared with"
            )
        self._seen += n
        if n == 0:
            return
        bits_of = flat.view(torch.int32)
        if self._pass == 0:
            hist, max_bits = _radix_histogram_high(bits_of)
        else:
            hist, max_bits = _radix_histogram_low(bits_of, self._bucket << _LO_BITS)
        if self._hist is None or self._max_bits is None:
            self._hist, self._max_bits = hist, max_bits
        else:
            self._hist += hist.to(self._hist.device)
            torch.maximum(self._max_bits, max_bits.to(self._max_bits.device), out=self._max_bits)

    def end_pass(self) -> None:
        """Finish the current pass.

        Raises:
            RuntimeError: no pass is needed any more.
            ValueError: the pass saw fewer entries than ``total_numel``, or a NaN.
        """
        if self._result is not None:
            raise RuntimeError("StreamingMagnitudeSelect: no pass is needed; call result()")
        if self._seen != self._total:
            raise ValueError(
                f"the pass saw {self._seen} entries, but the stream was declared with {self._total}"
            )
        assert self._hist is not None and self._max_bits is not None
        if int(self._max_bits.item()) > _INF_BITS:
            raise NaNMagnitudeError("the stream contains NaN; a magnitude threshold is undefined")
        hist = self._hist.cpu()
        self._hist = None
        self._max_bits = None
        self._seen = 0
        self._pass += 1
        if self._k == 0:
            self._result = MagnitudeThreshold(math.inf, 0, 0)
        elif self._pass == 1:
            bucket, above, _ = _locate_from_top(hist, self._k)
            self._bucket, self._above_bucket = bucket, above
        else:
            # Bins 1..2^16 of pass 2 hold the low 16 bits of the chosen bucket's entries.
            inside = hist[1 : (1 << _LO_BITS) + 1]
            low, above, at = _locate_from_top(inside, self._k - self._above_bucket)
            bits = (self._bucket << _LO_BITS) | low
            count_greater = self._above_bucket + above
            self._result = MagnitudeThreshold(
                _bits_to_float(bits), self._k - count_greater, self._k
            )
            self._count_at_value = at

    def result(self) -> MagnitudeThreshold:
        """The threshold over the whole stream.

        Raises:
            RuntimeError: passes are still needed.
        """
        if self._result is None:
            raise RuntimeError("StreamingMagnitudeSelect: call result() once needs_pass() is False")
        return self._result


# --- validation -------------------------------------------------------------------------


def _check_ties(ties: str) -> None:
    if ties not in ("exact_k", "threshold"):
        raise ValueError(f"ties must be 'exact_k' or 'threshold', got {ties!r}")


def _check_k(k: int, n: int) -> None:
    if isinstance(k, bool) or not isinstance(k, int):
        raise TypeError(f"k must be an int, got {type(k).__name__}")
    if not 0 <= k <= n:
        raise ValueError(f"k must be in [0, {n}] (the number of entries), got {k}")


def _flat_float32(x: torch.Tensor, name: str) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype in (torch.float16, torch.bfloat16):
        x = x.float()
    elif x.dtype != torch.float32:
        raise TypeError(f"{name} must be float32 (or float16/bfloat16), got {x.dtype}")
    return x.reshape(-1)


class NaNMagnitudeError(ValueError):
    """Magnitudes to select among hold NaN, which has no place in their order."""


def _raise_if_nan(flat: torch.Tensor, name: str) -> None:
    # A float sum is one fast reduction and is NaN whenever an entry is; it is also NaN for
    # inf + (-inf), so a NaN sum is confirmed entry by entry before raising.
    if flat.numel() == 0 or not bool(torch.isnan(flat.sum())):
        return
    count = int(torch.isnan(flat).sum().item())
    if count:
        raise NaNMagnitudeError(
            f"{name} contains {count} NaN value(s); a magnitude threshold is undefined"
        )


# --- bits -------------------------------------------------------------------------------


def _float_to_bits(value: float) -> int:
    bits: int = struct.unpack("<i", struct.pack("<f", value))[0]
    return bits & _ABS_MASK


def _bits_to_float(bits: int) -> float:
    value: float = struct.unpack("<f", struct.pack("<i", bits))[0]
    return value


def _chunk_size(device: torch.device, n: int) -> int:
    """Elements per chunk: the device's size, cut so that scratch stays small beside n."""
    base = _CPU_CHUNK if device.type == "cpu" else _CUDA_CHUNK
    return max(1, min(n, base, max(_MIN_CHUNK, n // 8)))


def _spans(n: int, size: int) -> Iterator[tuple[int, int]]:
    for start in range(0, n, size):
        yield start, min(n, start + size)


# --- one-tensor selection ----------------------------------------------------------------


def _select(x: torch.Tensor, k: int) -> _Selection:
    flat = _flat_float32(x, "x")
    _check_k(k, flat.numel())
    return _select_flat(flat, k)


def _select_flat(flat: torch.Tensor, k: int, *, internal: bool = False) -> _Selection:
    """Select among ``flat``; ``internal`` marks a sample or a pool of a larger tensor."""
    if not internal:
        _raise_if_nan(flat, "x")
    n = flat.numel()
    if k == 0:
        return _Selection(MagnitudeThreshold(math.inf, 0, 0), 0)
    # On a GPU a sort of a sample or pool (at most 1/8 of the tensor) is one fast kernel
    # and its scratch is small beside the tensor; kthvalue there runs in a single block.
    if n <= _SMALL or (internal and flat.device.type != "cpu" and n <= _GPU_SORT):
        return _select_direct(flat, k)
    bracket = _sample_bracket(flat, k)
    for _attempt in range(2):
        outcome = _bracket_pass(flat, k, bracket)
        if isinstance(outcome, _Selection):
            return outcome
        if outcome == "high" and bracket.hi is not None:
            bracket = _Bracket(bracket.hi, bracket.hi_tied, None, False)
        elif outcome == "low" and bracket.lo is not None:
            bracket = _Bracket(None, False, bracket.lo, bracket.lo_tied)
        else:
            break
    return _select_radix(flat, k)


def _select_direct(flat: torch.Tensor, k: int) -> _Selection:
    mags = flat.abs()
    n = mags.numel()
    if flat.device.type == "cpu":
        value = mags.kthvalue(n - k + 1).values
    else:
        value = torch.sort(mags).values[n - k]
    greater = int((mags > value).sum().item())
    at = int((mags == value).sum().item())
    return _Selection(MagnitudeThreshold(float(value.item()), k - greater, k), at)


@dataclass(frozen=True)
class _Bracket:
    """Bounds believed to enclose the k-th largest magnitude; None is an open end.

    A ``tied`` end is a value the sample holds many times: its entries are counted rather
    than collected, and the end itself may turn out to be the answer.
    """

    lo: float | None
    lo_tied: bool
    hi: float | None
    hi_tied: bool


def _sample_bracket(flat: torch.Tensor, k: int) -> _Bracket:
    """Sample order statistics that bracket the k-th largest with high probability."""
    n = flat.numel()
    want = min(_SAMPLE_MAX, max(_SAMPLE_MIN, n // _SAMPLE_SHARE))
    # An odd stride walks through every column of a row-major matrix with even row length,
    # so a few outlier columns cannot be missed or oversampled wholesale.
    stride = max(1, n // want) | 1
    sample = flat[stride // 2 :: stride].abs()
    s = sample.numel()
    rank = k * s / n  # the k-th largest of the tensor sits near this descending sample rank
    half = _SIGMAS * math.sqrt(rank * (1.0 - rank / s)) + 2.0
    # An end held this often in the sample would swell the collected entries: count it.
    heavy = max(1.0, half / 8.0)
    top = math.floor(rank - half)
    bottom = math.ceil(rank + half)
    hi: float | None = None
    hi_tied = lo_tied = False
    lo: float | None = None
    if top >= 1:
        upper = _select_flat(sample, top, internal=True)
        hi, hi_tied = upper.threshold.value, upper.count_at_value > heavy
    if bottom <= s:
        lower = _select_flat(sample, bottom, internal=True)
        lo, lo_tied = lower.threshold.value, lower.count_at_value > heavy
    return _Bracket(lo, lo_tied, hi, hi_tied)


def _bracket_pass(
    flat: torch.Tensor, k: int, bracket: _Bracket
) -> _Selection | Literal["high", "low", "overflow"]:
    """Count the entries above the bracket, collect those inside, and select among them.

    Returns the selection, or which way the k-th largest escaped the bracket, or
    ``overflow`` when the entries inside were too many to collect.
    """
    n = flat.numel()
    device = flat.device
    size = _chunk_size(device, n)
    cap = max(n // 8, _MIN_CHUNK)  # past this many entries inside, a radix select is cheaper
    lo, hi = bracket.lo, bracket.hi
    single = lo is not None and lo == hi  # one tied value: counts alone decide
    # Rows of 0/1 flags per chunk: [above the inside, (> hi), (>= lo)] are summed; the
    # last row marks "at or above the inside's lower end" and is not.
    counted: list[tuple[str, float]] = []
    if hi is not None:
        counted.append(("ge" if bracket.hi_tied or single else "gt", hi))
        if bracket.hi_tied or single:
            counted.append(("gt", hi))
    if lo is not None and bracket.lo_tied and not single:
        counted.append(("ge", lo))
    lower: tuple[str, float] | None = None
    if lo is not None and not single:
        lower = ("gt" if bracket.lo_tied else "ge", lo)
    rows = len(counted)
    abs_buf = torch.empty(size, dtype=torch.float32, device=device)
    flags = torch.empty(rows + 1, size, dtype=torch.float32, device=device)
    spans = list(_spans(n, size))
    counts = torch.zeros(len(spans), max(rows, 1), dtype=torch.float32, device=device)
    candidates: list[torch.Tensor] = []
    found_rows: list[int] = []
    collected = 0
    for row, (start, end) in enumerate(spans):
        m = end - start
        mags = torch.abs(flat[start:end], out=abs_buf[:m])
        f = flags[:, :m]
        for index, (op, value) in enumerate(counted):
            (torch.ge if op == "ge" else torch.gt)(mags, value, out=f[index])
        if rows:
            # Chunk sums of 0/1 stay below 2^24 and are exact in float32.
            torch.sum(f[:rows], dim=1, out=counts[row])
        if single:
            continue
        inside = f[rows]
        if lower is not None:
            (torch.ge if lower[0] == "ge" else torch.gt)(mags, lower[1], out=inside)
        else:
            inside.fill_(1.0)
        if hi is not None:
            inside -= f[0]
        found = _collect(mags, inside)
        if found is not None:
            candidates.append(found)
            found_rows.append(row)
            collected += found.numel()
            if collected > cap:
                return "overflow"
    per_chunk = counts.to(torch.float64)
    totals = [int(t) for t in per_chunk.sum(dim=0).tolist()]
    above = totals[0] if hi is not None else 0
    gt_hi = totals[1] if hi is not None and (bracket.hi_tied or single) else None
    ge_lo = totals[-1] if lo is not None and bracket.lo_tied and not single else None
    below_inside = above + collected  # entries at or above the inside's lower end
    found_per_chunk = torch.zeros(len(spans), dtype=torch.float64)
    found_per_chunk[found_rows] = torch.tensor([c.numel() for c in candidates], dtype=torch.float64)
    if k <= above:
        if gt_hi is None or k <= gt_hi:
            return "high"
        assert hi is not None
        ties = _ties_list(per_chunk[:, 0] - per_chunk[:, 1], k - gt_hi, above - gt_hi)
        return _Selection(MagnitudeThreshold(hi, k - gt_hi, k), above - gt_hi, ties)
    if k <= below_inside:
        # Free the pass's scratch and the per-chunk copies: the pool's own selection
        # needs scratch of its own.
        del abs_buf, flags
        sizes = [c.numel() for c in candidates]
        pool = torch.cat(candidates) if len(candidates) > 1 else candidates[0]
        del candidates
        inner = _select_flat(pool, k - above, internal=True)
        value, keep = inner.threshold.value, inner.threshold.keep_at_value
        ties = None
        if 0 < keep < inner.count_at_value:
            pieces = torch.split(pool, sizes)
            hits = torch.stack([(c == value).sum() for c in pieces]).to("cpu", torch.float64)
            at_value = torch.zeros(len(spans), dtype=torch.float64)
            at_value[found_rows] = hits
            ties = _ties_list(at_value, keep, inner.count_at_value)
        return _Selection(MagnitudeThreshold(value, keep, k), inner.count_at_value, ties)
    if ge_lo is not None and k <= ge_lo:
        assert lo is not None
        at_lo = per_chunk[:, -1].cpu() - found_per_chunk
        if hi is not None:
            at_lo -= per_chunk[:, 0].cpu()
        ties = _ties_list(at_lo, k - below_inside, ge_lo - below_inside)
        return _Selection(MagnitudeThreshold(lo, k - below_inside, k), ge_lo - below_inside, ties)
    return "low"


def _ties_list(per_chunk: torch.Tensor, keep: int, total: int) -> list[int] | None:
    """Per-chunk tie counts as ints, only when the exact_k mask needs them."""
    if not 0 < keep < total:
        return None
    return [int(c) for c in per_chunk.tolist()]


def _collect(mags: torch.Tensor, inside: torch.Tensor) -> torch.Tensor | None:
    """The magnitudes where ``inside`` is 1, found block-wise: most blocks hold none."""
    m = mags.numel()
    whole = m - m % _BLOCK
    parts: list[torch.Tensor] = []
    if whole:
        block_any = inside[:whole].view(-1, _BLOCK).amax(dim=1)
        rows = torch.nonzero(block_any).view(-1)
        if rows.numel():
            picked = inside[:whole].view(-1, _BLOCK).index_select(0, rows)
            values = mags[:whole].view(-1, _BLOCK).index_select(0, rows)
            parts.append(values[picked.to(torch.bool)])
    if whole < m:
        parts.append(mags[whole:][inside[whole:].to(torch.bool)])
    parts = [p for p in parts if p.numel()]
    if not parts:
        return None
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def _select_radix(flat: torch.Tensor, k: int) -> _Selection:
    selector = StreamingMagnitudeSelect(flat.numel(), k)
    while selector.needs_pass():
        selector.update(flat)
        selector.end_pass()
    return _Selection(selector.result(), selector._count_at_value)


# --- radix histograms -------------------------------------------------------------------


def _radix_histogram_high(bits_of: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Histogram of the top 15 magnitude bits, and the largest magnitude pattern seen."""
    n = bits_of.numel()
    device = bits_of.device
    size = _chunk_size(device, n)
    buf = torch.empty(size, dtype=torch.int32, device=device)
    hist = torch.zeros(1 << _HI_BITS, dtype=torch.int64, device=device)
    maxima = torch.empty(-(-n // size), dtype=torch.int32, device=device)
    for row, (start, end) in enumerate(_spans(n, size)):
        b = torch.bitwise_and(bits_of[start:end], _ABS_MASK, out=buf[: end - start])
        torch.amax(b, dim=0, out=maxima[row])
        b >>= _LO_BITS  # non-negative, so the arithmetic shift is a logical one
        hist += torch.bincount(b, minlength=1 << _HI_BITS)
    return hist, maxima.amax()


def _radix_histogram_low(bits_of: torch.Tensor, base: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Histogram of the low 16 bits of the magnitudes in ``[base, base + 2^16)``.

    Bin 0 collects everything below the bucket and the last bin everything above it, so
    one bincount serves every entry without a compaction pass.
    """
    n = bits_of.numel()
    device = bits_of.device
    size = _chunk_size(device, n)
    bins = (1 << _LO_BITS) + 2
    buf = torch.empty(size, dtype=torch.int32, device=device)
    hist = torch.zeros(bins, dtype=torch.int64, device=device)
    maxima = torch.empty(-(-n // size), dtype=torch.int32, device=device)
    for row, (start, end) in enumerate(_spans(n, size)):
        b = torch.bitwise_and(bits_of[start:end], _ABS_MASK, out=buf[: end - start])
        torch.amax(b, dim=0, out=maxima[row])
        b -= base - 1
        b.clamp_(0, bins - 1)
        hist += torch.bincount(b, minlength=bins)
    return hist, maxima.amax()


def _locate_from_top(hist: torch.Tensor, k: int) -> tuple[int, int, int]:
    """The bin holding the k-th largest entry of a histogram (bins ascend in value).

    Returns ``(bin, entries in higher bins, entries in the bin)``.
    """
    from_top = hist.flip(0).cumsum(0)
    index = int(torch.searchsorted(from_top, torch.tensor([k], dtype=from_top.dtype)).item())
    above = int(from_top[index - 1].item()) if index else 0
    return hist.numel() - 1 - index, above, int(hist[hist.numel() - 1 - index].item())


# --- masks ------------------------------------------------------------------------------


def _compare_into(flat: torch.Tensor, value_bits: int, mask: torch.Tensor, *, strict: bool) -> None:
    """``mask = |flat| > value`` (strict) or ``>=``, in the bit domain.

    Comparing int32 patterns and writing 0/1 bytes through a uint8 view of the bool mask
    is several times faster on the CPU than a float comparison into a bool tensor.
    """
    n = flat.numel()
    device = flat.device
    size = _chunk_size(device, n)
    bits_of = flat.view(torch.int32)
    out = mask.view(torch.uint8)
    buf = torch.empty(size, dtype=torch.int32, device=device)
    compare = torch.gt if strict else torch.ge
    for start, end in _spans(n, size):
        b = torch.bitwise_and(bits_of[start:end], _ABS_MASK, out=buf[: end - start])
        compare(b, value_bits, out=out[start:end])


def _count_equal(flat: torch.Tensor, value_bits: int) -> int:
    n = flat.numel()
    if n == 0:
        return 0
    device = flat.device
    size = _chunk_size(device, n)
    bits_of = flat.view(torch.int32)
    buf = torch.empty(size, dtype=torch.int32, device=device)
    hits = torch.empty(size, dtype=torch.float32, device=device)
    spans = list(_spans(n, size))
    counts = torch.empty(len(spans), dtype=torch.float32, device=device)
    for row, (start, end) in enumerate(spans):
        b = torch.bitwise_and(bits_of[start:end], _ABS_MASK, out=buf[: end - start])
        torch.sum(torch.eq(b, value_bits, out=hits[: end - start]), dim=0, out=counts[row])
    return int(counts.to(torch.float64).sum().item())


def _exact_k_known(
    flat: torch.Tensor, threshold: MagnitudeThreshold, chunk_ties: list[int], mask: torch.Tensor
) -> None:
    """The ``exact_k`` mask in one pass, given the tie count of each chunk.

    The chunks before the one holding the last kept tie keep all their ties (``>=``), the
    ones after it none (``>``), and that chunk its first few.
    """
    n = flat.numel()
    device = flat.device
    size = _chunk_size(device, n)
    value_bits = _float_to_bits(threshold.value)
    crossing, before = len(chunk_ties), 0
    for index, count in enumerate(chunk_ties):
        if before + count >= threshold.keep_at_value:
            crossing = index
            break
        before += count
    bits_of = flat.view(torch.int32)
    out = mask.view(torch.uint8)
    buf = torch.empty(size, dtype=torch.int32, device=device)
    for index, (start, end) in enumerate(_spans(n, size)):
        b = torch.bitwise_and(bits_of[start:end], _ABS_MASK, out=buf[: end - start])
        (torch.ge if index < crossing else torch.gt)(b, value_bits, out=out[start:end])
        if index == crossing:
            tied = torch.nonzero(b == value_bits).view(-1)
            last = int(tied[threshold.keep_at_value - before - 1].item())
            out[start : start + last + 1] |= (b[: last + 1] == value_bits).to(torch.uint8)


def _exact_k_into(
    flat: torch.Tensor,
    threshold: MagnitudeThreshold,
    ties_seen: int,
    mask: torch.Tensor,
    *,
    count_all: bool,
) -> int:
    """The ``exact_k`` mask of a chunk given the ties before it; returns the ties after it.

    Chunks are walked in flat order: while tie budget remains, a chunk whose ties all fit
    keeps them (``>=``), the chunk where the budget runs out keeps its first few, and later
    chunks keep none (``>``). Without ``count_all`` the ties of those later chunks are not
    counted and the returned total is only a lower bound.
    """
    n = flat.numel()
    device = flat.device
    size = _chunk_size(device, n)
    value_bits = _float_to_bits(threshold.value)
    bits_of = flat.view(torch.int32)
    out = mask.view(torch.uint8)
    buf = torch.empty(size, dtype=torch.int32, device=device)
    hits = torch.empty(size, dtype=torch.float32, device=device)
    seen = ties_seen
    for start, end in _spans(n, size):
        m = end - start
        b = torch.bitwise_and(bits_of[start:end], _ABS_MASK, out=buf[:m])
        budget = threshold.keep_at_value - seen
        if budget <= 0 and not count_all:
            torch.gt(b, value_bits, out=out[start:end])
            continue
        at = int(torch.eq(b, value_bits, out=hits[:m]).sum().item())
        if at <= budget:
            torch.ge(b, value_bits, out=out[start:end])
        else:
            torch.gt(b, value_bits, out=out[start:end])
            if budget > 0:
                # Keep the first `budget` tied entries of this chunk: up to the last of them.
                last = int(torch.nonzero(hits[:m]).view(-1)[budget - 1].item())
                torch.bitwise_or(
                    out[start : start + last + 1],
                    hits[: last + 1].to(torch.uint8),
                    out=out[start : start + last + 1],
                )
        seen += at
    return seen
