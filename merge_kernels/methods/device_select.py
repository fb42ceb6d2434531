"""Top-k magnitude masks on a GPU, in a fixed handful of kernels per tensor.

The selection in :mod:`merge_kernels.methods.magnitude_select` walks a tensor in chunks,
reading counts back to the host between passes: on a CPU that keeps scratch in cache, but
on a GPU it is bound by kernel launches and host waits, not by the arithmetic (about 40,000
launches and 3,000 waits for a TIES trim of three 1.2 B-parameter task vectors, against a
quarter of a second of GPU time). Here the whole tensor is one operand and nothing is read
back but one vector of four counts: a strided sample brackets the k-th largest magnitude, the
counts at the bracket's ends settle it (bf16 task vectors tie heavily, and the answer is then
usually an end), else ``torch.topk`` selects among the few entries inside (a radix select on
CUDA, no full sort). The ``exact_k`` tie rule keeps the first tied entries in flat order
through a running count of the ties, as device tensors.

The mask is the one :func:`~merge_kernels.methods.magnitude_select.top_k_magnitude_mask`
returns on any device: every ``|x| > v`` and, under ``exact_k``, the first
``k - #{|x| > v}`` entries with ``|x| == v`` in row-major order (under ``threshold``, all of
them), where v is the k-th largest ``|x|``.
"""

from __future__ import annotations

import math

import torch

# Scratch per entry, in bytes, at the peak: the magnitudes (4), a fallback topk's values and
# int64 indices for at most half the entries (6), three bool masks (3), the tie count (4 or 8).
_BYTES_PER_ENTRY = 24
_INT32_LIMIT = 1 << 31
_DIRECT = 1 << 20  # at or below this many entries, one topk beats sampling
_SAMPLE_MIN, _SAMPLE_MAX, _SAMPLE_SHARE = 1 << 12, 1 << 20, 64  # sample one entry in 64
_SIGMAS = 6.0  # bracket half-width in binomial standard deviations of the sample rank


def device_top_k_mask(flat: torch.Tensor, k: int, *, exact_k: bool) -> torch.Tensor | None:
    """The top-k magnitude mask of a flat float32 GPU tensor without NaN, or None.

    None when the tensor is not on a CUDA device or the device lacks the free memory for
    the one-shot path; the caller then runs the chunked selection.

    Args:
        flat: a 1-D float32 tensor on a CUDA device, free of NaN.
        k: entries to keep, ``0 < k < flat.numel()``.
        exact_k: keep exactly k entries (the first tied ones in flat order), else every
            entry tied with the k-th largest magnitude.
    """
    n = flat.numel()
    if flat.device.type != "cuda" or not 0 < k < n:
        return None
    if _free_bytes(flat.device) < _BYTES_PER_ENTRY * n:
        return None
    return one_shot_mask(flat, k, exact_k=exact_k)


def one_shot_mask(flat: torch.Tensor, k: int, *, exact_k: bool) -> torch.Tensor:
    """:func:`device_top_k_mask` on any device, without the memory check."""
    mags = flat.abs()  # -0.0 becomes 0.0, as the bit comparison elsewhere folds it
    value = kth_largest(mags, k)
    if not exact_k:
        return mags >= value
    greater = mags > value
    tied = mags == value
    keep = k - greater.sum()  # how many tied entries exact_k keeps, as a device scalar
    running = tied.to(torch.int64 if mags.numel() >= _INT32_LIMIT else torch.int32).cumsum_(0)
    greater |= tied & (running <= keep)
    return greater


def kth_largest(mags: torch.Tensor, k: int) -> torch.Tensor:
    """The k-th largest entry of a flat tensor of magnitudes, as a 0-d tensor on its device.

    A strided sample's order statistics bracket the answer (six binomial standard
    deviations either side); one host wait reads how many entries lie above, at and below
    the bracket's ends. Heavily tied data (bf16 task vectors) usually has its answer at an
    end, found by those counts alone; otherwise the few entries strictly inside are
    collected and selected among. A sample that misleads (periodic structure) falls back to
    a selection over the whole tensor: the answer is exact either way.
    """
    n = mags.numel()
    if n <= _DIRECT:
        return _topk_kth(mags, k)
    want = min(_SAMPLE_MAX, max(_SAMPLE_MIN, n // _SAMPLE_SHARE))
    stride = max(1, n // want) | 1  # odd: walks through every column of a row-major matrix
    ranked = torch.sort(mags[stride // 2 :: stride], descending=True).values
    s = ranked.numel()
    rank = k * s / n  # the k-th largest of the tensor sits near this rank of the sample
    half = _SIGMAS * math.sqrt(rank * (1.0 - rank / s)) + 2.0
    top, bottom = math.floor(rank - half), math.ceil(rank + half)
    hi = ranked[top - 1] if top >= 1 else None
    lo = ranked[bottom - 1] if bottom <= s else None
    zero = torch.zeros((), dtype=torch.int64, device=mags.device)
    full = torch.full((), n, dtype=torch.int64, device=mags.device)
    counts = torch.stack(
        [
            (mags > hi).sum() if hi is not None else zero,
            (mags >= hi).sum() if hi is not None else zero,
            (mags > lo).sum() if lo is not None else full,
            (mags >= lo).sum() if lo is not None else full,
        ]
    )
    above_hi, from_hi, above_lo, from_lo = (int(c) for c in counts.tolist())
    if hi is not None and above_hi < k <= from_hi:
        return hi
    if lo is not None and above_lo < k <= from_lo:
        return lo
    if from_hi < k <= above_lo:
        inside = mags
        if hi is not None:
            inside = inside[inside < hi]
        if lo is not None:
            inside = inside[inside > lo]
        return _topk_kth(inside, k - from_hi)
    return _topk_kth(mags, k)  # the sample misled


def _topk_kth(mags: torch.Tensor, k: int) -> torch.Tensor:
    """The k-th largest by ``torch.topk`` over the smaller side (a radix select on CUDA)."""
    n = mags.numel()
    if k <= n - k + 1:
        return torch.topk(mags, k, largest=True, sorted=False).values.amin()
    return torch.topk(mags, n - k + 1, largest=False, sorted=False).values.amax()


def _free_bytes(device: torch.device) -> int:
    """Memory the caching allocator can hand out on ``device``: the driver's free memory
    plus the blocks the allocator holds but does not use."""
    free, _total = torch.cuda.mem_get_info(device)
    cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    return int(free + cached)
