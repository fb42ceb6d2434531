"""DARE keep-masks as a pure function of (seed, model index, tensor name, element index).

DARE (Yu et al., "Language Models are Super Mario", ICML 2024, arXiv 2311.03099) keeps each
entry of a task vector with probability ``density`` and rescales the survivors. A merge must
give the same bits however it is run: whole tensors or row chunks, any tensor order, any
thread count, CPU or CUDA. A stateful generator (torch's global RNG, ``torch.Generator``)
gives none of that, so each keep decision here is a counter-based hash of the element's
flat index under a per-tensor key:

1. :func:`dare_key` derives a 63-bit key from (seed, model index, tensor name) with BLAKE2b
   on the host, once per tensor.
2. The key is expanded (SplitMix64) into two 32-bit words ``k0, k1``; the index's high
   32 bits, if any, are folded into ``k1``.
3. Per element, in int32 lanes (wrapping multiply, masked shifts), two xorshift-multiply
   rounds of the "lowbias32" integer hash, with the key injected before each::

       x = (i mod 2^32)·0x9E3779B1 + k0
       x ^= x >>> 16;  x *= 0x7FEB352D;  x ^= k1
       x ^= x >>> 15;  x *= 0x846CA68B

   ``u = x + 2^31 (mod 2^32)``, as an unsigned number, is the element's uniform 32-bit
   integer (the last multiply leaves the top bits, which the comparison below reads
   first, the best mixed).
4. The entry is kept when ``u < T`` with ``T = round(density·2^32)``: the keep probability
   has a resolution of 2^-32 (it is exactly ``T / 2^32``). Since ``u < T`` is
   ``x < T - 2^31`` on the signed lane, one signed comparison makes the decision.

int32 wrapping arithmetic, arithmetic right shifts (masked to logical ones) and XOR behave
identically in torch on CPU and CUDA, so the masks are bit-identical across devices;
int32 lanes are several times faster than int64 ones on the CPU. Work proceeds in bounded
chunks, so memory beyond the returned mask stays O(chunk).

On the CPU, where the fused C extension is built (:mod:`merge_kernels.fused`), one
vectorised pass per thread writes the mask (or the draws) instead: the same 32-bit
arithmetic in C, so the same bits, several times faster than the torch lanes' many passes
over memory. Without the extension, and on CUDA, the torch lanes do the work.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from functools import lru_cache

import torch

from merge_kernels import fused

_M32 = 0xFFFFFFFF
_M64 = 0xFFFFFFFFFFFFFFFF
_LANE_MUL = 0x9E3779B1  # odd: i ↦ i·m is a bijection of the 32-bit index
_MUL_1 = 0x7FEB352D  # lowbias32 multipliers (C. Wellons, hash-prospector)
_MUL_2 = 0x846CA68B
_SHIFT_1 = 16
_SHIFT_2 = 15
_CPU_CHUNK = 1 << 20  # int32 lanes per CPU chunk: buffers stay in cache, few parallel regions
_CUDA_CHUNK = 1 << 22
_KEY_PERSON = b"tureen-dare-v1"  # BLAKE2b personalisation: keys of no other use collide
# Whether CPU masks may come from the C extension; tests turn it off to check the torch lanes.
_USE_EXTENSION = True


def dare_key(seed: int, model_index: int, tensor_name: str) -> int:
    """The 63-bit key of one model's DARE mask on one tensor.

    Args:
        seed: The merge's random seed (any int).
        model_index: Which model of the merge, ``>= 0``.
        tensor_name: The tensor's name in the checkpoint.

    Returns:
        A non-negative int below 2^63, a BLAKE2b digest of the three values.

    Raises:
        TypeError: an argument has the wrong type.
        ValueError: ``model_index`` is negative.
    """
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}")
    if isinstance(model_index, bool) or not isinstance(model_index, int):
        raise TypeError(f"model_index must be an int, got {type(model_index).__name__}")
    if model_index < 0:
        raise ValueError(f"model_index must be >= 0, got {model_index}")
    if not isinstance(tensor_name, str):
        raise TypeError(f"tensor_name must be a str, got {type(tensor_name).__name__}")
    # Decimal fields separated by NUL cannot run into each other or into the name.
    message = f"{seed}\0{model_index}\0".encode() + tensor_name.encode("utf-8")
    digest = hashlib.blake2b(message, digest_size=8, person=_KEY_PERSON).digest()
    return int.from_bytes(digest, "little") >> 1


def keep_mask(
    key: int,
    density: float,
    numel: int,
    *,
    offset: int = 0,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Which flat elements ``[offset, offset + numel)`` of a tensor DARE keeps.

    Element ``i`` is kept when its uniform 32-bit hash ``u(key, i)`` is below
    ``round(density·2^32)``, so a slice of the whole tensor's mask is the mask of the slice.

    Args:
        key: From :func:`dare_key`, in ``[0, 2^63)``.
        density: The keep probability, in ``(0, 1]``; realised as ``round(density·2^32) /
            2^32``, so densities below 2^-33 keep nothing.
        numel: How many elements.
        offset: The flat index of the first one.
        device: Where to build the mask.

    Returns:
        A 1-D bool tensor of length ``numel``; all True when ``density == 1``.

    Raises:
        TypeError: an argument has the wrong type.
        ValueError: ``density`` is not in ``(0, 1]``, or ``key``, ``numel`` or ``offset``
            is out of range.
    """
    threshold = _threshold(density)
    _check_range(key, numel, offset)
    dev = torch.device(device)
    out = torch.empty(numel, dtype=torch.bool, device=dev)
    if threshold > _M32:
        return out.fill_(True)
    if _extension_takes(out):
        fused.dare_keep_into(out, key, offset, threshold)
        return out
    signed_limit = threshold - (1 << 31)  # u < T  ⇔  x < T − 2^31 on the signed lane
    out_bytes = out.view(torch.uint8)
    for start, end, lanes in _hash_chunks(key, numel, offset, dev):
        torch.lt(lanes, signed_limit, out=out_bytes[start:end])
    return out


def keep_mask_with_probabilities(
    key: int, probabilities: torch.Tensor, *, offset: int = 0
) -> torch.Tensor:
    """:func:`keep_mask` with a keep probability per element (DELLA's MagPrune).

    Element ``i`` is kept when ``u(key, i) < round(pᵢ·2^32)``: the same draws as
    :func:`keep_mask`, so with every ``pᵢ`` equal to ``d`` the masks are identical, and a
    slice of the probabilities gives the slice of the mask.

    Args:
        key: From :func:`dare_key`, in ``[0, 2^63)``.
        probabilities: Keep probabilities in ``[0, 1]``, any shape, on the mask's device;
            compared in float64, so float32 probabilities are used exactly.
        offset: The flat index of the first element.

    Returns:
        A bool tensor shaped like ``probabilities``.

    Raises:
        TypeError, ValueError: ``key`` or ``offset`` is out of range, or a probability is
            outside ``[0, 1]`` (NaN included).
    """
    flat = probabilities.reshape(-1)
    numel = flat.numel()
    _check_range(key, numel, offset)
    out = torch.empty(numel, dtype=torch.bool, device=flat.device)
    if _extension_takes(out, flat):
        if not fused.dare_keep_with_probabilities_into(out, key, offset, flat):
            raise ValueError(_PROBABILITY_RANGE)
        return out.view(probabilities.shape)
    if numel and not bool(((flat >= 0) & (flat <= 1)).all()):
        raise ValueError(_PROBABILITY_RANGE)
    for start, end, lanes in _hash_chunks(key, numel, offset, flat.device):
        # u < T  ⇔  x < T − 2^31 on the signed lane; T = 2^32 keeps every draw.
        limit = flat[start:end].double().mul(float(1 << 32)).round_().sub_(float(1 << 31))
        torch.lt(lanes.to(torch.float64), limit, out=out[start:end])
    return out.view(probabilities.shape)


def uniform_at(
    key: int, numel: int, *, offset: int = 0, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """The uniform draws behind :func:`keep_mask`: ``u(key, i) / 2^32`` in ``[0, 1)``.

    ``keep_mask(key, d, n, offset=o)`` equals ``uniform_at(key, n, offset=o) * 2**32 <
    round(d * 2**32)`` exactly (float64 holds every ``u``). Meant for statistics and tests.

    Args:
        key: From :func:`dare_key`, in ``[0, 2^63)``.
        numel: How many elements.
        offset: The flat index of the first one.
        device: Where to build the result.

    Returns:
        A 1-D float64 tensor of length ``numel``.

    Raises:
        TypeError, ValueError: ``key``, ``numel`` or ``offset`` is out of range.
    """
    _check_range(key, numel, offset)
    dev = torch.device(device)
    out = torch.empty(numel, dtype=torch.float64, device=dev)
    draws = torch.empty(numel, dtype=torch.int32) if dev.type == "cpu" else None
    if draws is not None and _extension_takes(draws):
        fused.dare_uniform_into(draws, key, offset)
        torch.mul(draws.view(torch.uint32).to(torch.float64), 1.0 / (1 << 32), out=out)
        return out
    for start, end, lanes in _hash_chunks(key, numel, offset, dev):
        torch.add(lanes.to(torch.float64), float(1 << 31), out=out[start:end])
    return out.mul_(1.0 / (1 << 32))


_PROBABILITY_RANGE = "keep probabilities must lie in [0, 1]"


def _extension_takes(out: torch.Tensor, probabilities: torch.Tensor | None = None) -> bool:
    """Whether the C loop writes ``out`` (CPU, extension built and not turned off)."""
    return _USE_EXTENSION and fused.dare_hash_handles(out, probabilities)


def _threshold(density: float) -> int:
    """``round(density·2^32)``, or 2^32 + 1 meaning "keep all"."""
    if isinstance(density, bool) or not isinstance(density, (int, float)):
        raise TypeError(f"density must be a float, got {type(density).__name__}")
    if not (0.0 < density <= 1.0):  # also rejects NaN
        raise ValueError(f"density must be in (0, 1] (the probability to keep), got {density}")
    if density == 1.0:
        return _M32 + 2
    return min(_M32, round(density * (1 << 32)))


def _check_range(key: int, numel: int, offset: int) -> None:
    for name, value in (("key", key), ("numel", numel), ("offset", offset)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if not 0 <= key < 1 << 63:
        raise ValueError(f"key must be in [0, 2^63) (see dare_key), got {key}")
    if numel < 0 or offset < 0:
        raise ValueError(f"numel and offset must be >= 0, got numel={numel}, offset={offset}")
    if offset + numel > 1 << 63:
        raise ValueError("offset + numel must not exceed 2^63")


def _signed32(value: int) -> int:
    value &= _M32
    return value - (1 << 32) if value >= 1 << 31 else value


def _splitmix64(value: int) -> int:
    z = (value + 0x9E3779B97F4A7C15) & _M64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _M64
    return z ^ (z >> 31)


def _mix32(value: int) -> int:
    """lowbias32 on the host, for folding an index's high word into the key (0 ↦ 0)."""
    x = value & _M32
    x ^= x >> 16
    x = (x * _MUL_1) & _M32
    x ^= x >> 15
    x = (x * _MUL_2) & _M32
    return x ^ (x >> 16)


def _round_keys(key: int, high: int) -> tuple[int, int]:
    """``(k0, k1)`` for the indices whose top 32+ bits are ``high``."""
    expanded = _splitmix64(key)
    return expanded & _M32, ((expanded >> 32) ^ _mix32(high)) & _M32


@lru_cache(maxsize=8)
def _lanes(device: torch.device, size: int) -> torch.Tensor:
    """``j·0x9E3779B1 mod 2^32`` for ``j < size``, as int32: the index part of step 3."""
    lanes = torch.arange(size, dtype=torch.int32, device=device)
    return lanes.mul_(_signed32(_LANE_MUL))


def _hash_chunks(
    key: int, numel: int, offset: int, device: torch.device
) -> Iterator[tuple[int, int, torch.Tensor]]:
    """``(start, end, x)`` per chunk: ``x`` holds the signed hash lanes of elements
    ``offset + start .. offset + end``; the buffer is reused by the next chunk."""
    size = _CPU_CHUNK if device.type == "cpu" else _CUDA_CHUNK
    lane_mul = _lanes(device, size)
    x = torch.empty(min(size, numel), dtype=torch.int32, device=device)
    t = torch.empty_like(x)
    mul_1, mul_2 = _signed32(_MUL_1), _signed32(_MUL_2)
    keep_1 = (1 << (32 - _SHIFT_1)) - 1  # clears the sign copies an arithmetic shift brings
    keep_2 = (1 << (32 - _SHIFT_2)) - 1
    start = 0
    while start < numel:
        index = offset + start
        # A chunk never straddles a multiple of 2^32, so its high index word is constant.
        end = min(numel, start + size, start + (1 << 32) - (index & _M32))
        m = end - start
        k0, k1 = _round_keys(key, index >> 32)
        xs, ts = x[:m], t[:m]
        torch.add(lane_mul[:m], _signed32(k0 + (index & _M32) * _LANE_MUL), out=xs)
        torch.bitwise_right_shift(xs, _SHIFT_1, out=ts)
        ts &= keep_1
        xs ^= ts
        xs *= mul_1
        xs ^= _signed32(k1)
        torch.bitwise_right_shift(xs, _SHIFT_2, out=ts)
        ts &= keep_2
        xs ^= ts
        xs *= mul_2
        yield start, end, xs
        start = end


def _reference_u32(key: int, index: int) -> int:
    """The uniform 32-bit integer of one element, in plain Python (the specification)."""
    k0, k1 = _round_keys(key, index >> 32)
    x = ((index & _M32) * _LANE_MUL + k0) & _M32
    x ^= x >> _SHIFT_1
    x = (x * _MUL_1) & _M32
    x ^= k1
    x ^= x >> _SHIFT_2
    x = (x * _MUL_2) & _M32
    return (x + (1 << 31)) & _M32
