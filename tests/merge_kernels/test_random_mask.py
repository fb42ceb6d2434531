"""DARE keep-masks: a pure function of (key, element index), with Bernoulli statistics."""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from merge_kernels.methods import random_mask as rm
from merge_kernels.methods.random_mask import dare_key, keep_mask, uniform_at

N = 1 << 20
KEY = dare_key(1234, 0, "model.layers.0.self_attn.q_proj.weight")


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    # Masks do not depend on the thread count; one thread keeps the file fast when other
    # processes share the cores.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def python_u32(key: int, index: int) -> int:
    """The hash written out again from the module's docstring, with explicit 32-bit masks.

    Independent of the torch code path: if torch's int32 lanes did not wrap like this on
    some device, the masks would differ there.
    """
    m32, m64 = 0xFFFFFFFF, 0xFFFFFFFFFFFFFFFF
    z = (key + 0x9E3779B97F4A7C15) & m64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & m64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & m64
    z ^= z >> 31
    high = index >> 32
    h = high & m32
    h ^= h >> 16
    h = (h * 0x7FEB352D) & m32
    h ^= h >> 15
    h = (h * 0x846CA68B) & m32
    h ^= h >> 16
    k0, k1 = z & m32, ((z >> 32) ^ h) & m32
    x = ((index & m32) * 0x9E3779B1 + k0) & m32
    x ^= x >> 16
    x = (x * 0x7FEB352D) & m32
    x ^= k1
    x ^= x >> 15
    x = (x * 0x846CA68B) & m32
    return (x + (1 << 31)) & m32


@pytest.mark.parametrize(
    "key", [0, 1, KEY, (1 << 63) - 1, dare_key(-7, 3, "lm_head.weight"), 0x5555555555555555]
)
@pytest.mark.parametrize("offset", [0, 12345, (1 << 31) - 3, (1 << 32) - 4, (5 << 40) + 17])
def test_torch_lanes_match_python_arithmetic(key: int, offset: int) -> None:
    u = uniform_at(key, 9, offset=offset)
    for i in range(9):
        expected = python_u32(key, offset + i)
        assert u[i].item() * 2**32 == expected
        assert rm._reference_u32(key, offset + i) == expected


def test_module_reference_matches_on_many_indices() -> None:
    u = uniform_at(KEY, 4096, offset=777)
    assert [int(v) for v in (u * 2**32).tolist()] == [
        rm._reference_u32(KEY, 777 + i) for i in range(4096)
    ]


def test_mask_is_threshold_of_uniform() -> None:
    density = 0.37
    u = uniform_at(KEY, N)
    mask = keep_mask(KEY, density, N)
    assert torch.equal(mask, u * 2**32 < round(density * 2**32))


@settings(max_examples=30, deadline=None)
@given(
    cuts=st.lists(st.integers(0, 3000), min_size=1, max_size=5),
    offset=st.sampled_from([0, 99, (1 << 32) - 1500]),
    density=st.floats(0.01, 0.99),
)
def test_slices_match_whole(cuts: list[int], offset: int, density: float) -> None:
    total = 3000
    whole = keep_mask(KEY, density, total, offset=offset)
    bounds = sorted({0, total, *cuts})
    parts = [
        keep_mask(KEY, density, end - start, offset=offset + start)
        for start, end in itertools.pairwise(bounds)
    ]
    assert torch.equal(torch.cat(parts), whole)


def test_chunking_inside_the_module_does_not_show(monkeypatch: pytest.MonkeyPatch) -> None:
    whole = keep_mask(KEY, 0.5, 100_000, offset=5)
    monkeypatch.setattr(rm, "_CPU_CHUNK", 4093)
    assert torch.equal(keep_mask(KEY, 0.5, 100_000, offset=5), whole)


def test_crossing_a_multiple_of_2_to_the_32() -> None:
    start = (1 << 32) - 1000
    whole = uniform_at(KEY, 2000, offset=start)
    assert torch.equal(whole[1000:], uniform_at(KEY, 1000, offset=1 << 32))
    # The high index word changes the key: elements 2^32 apart are unrelated.
    assert not torch.equal(whole[1000:], uniform_at(KEY, 1000, offset=0))


def test_deterministic_across_calls_and_threads() -> None:
    first = keep_mask(KEY, 0.3, N)
    assert torch.equal(first, keep_mask(KEY, 0.3, N))
    torch.set_num_threads(2)
    assert torch.equal(first, keep_mask(KEY, 0.3, N))


def test_keys_differ_by_every_input() -> None:
    keys = {
        dare_key(seed, model, name)
        for seed in (0, 1, -1, 2**70)
        for model in (0, 1, 2)
        for name in ("a", "b", "model.layers.1.mlp.down_proj.weight", "")
    }
    assert len(keys) == 4 * 3 * 4
    assert all(0 <= key < 1 << 63 for key in keys)
    assert max(keys).bit_length() >= 60  # the full 63 bits are used
    assert dare_key(0, 1, "2") != dare_key(0, 12, "")  # fields cannot run together


def test_different_keys_give_different_masks() -> None:
    masks = [
        keep_mask(dare_key(seed, model, name), 0.5, 4096)
        for seed, model, name in [(0, 0, "w"), (1, 0, "w"), (0, 1, "w"), (0, 0, "v")]
    ]
    for i in range(len(masks)):
        for j in range(i):
            agree = (masks[i] == masks[j]).float().mean().item()
            assert 0.45 < agree < 0.55


def binomial_bound(n: int, p: float, sigmas: float = 6.0) -> float:
    return sigmas * math.sqrt(n * p * (1 - p))


@pytest.mark.parametrize("density", [0.01, 0.1, 0.5, 0.9, 0.999])
def test_kept_fraction(density: float) -> None:
    kept = int(keep_mask(KEY, density, N).sum())
    assert abs(kept - density * N) < binomial_bound(N, density)


def test_uniformity_chi_square() -> None:
    u = uniform_at(KEY, N, offset=3)
    assert float(u.min()) >= 0.0 and float(u.max()) < 1.0
    for bins in (16, 256):
        counts = torch.histc(u, bins=bins, min=0.0, max=1.0)
        expected = N / bins
        chi2 = float(((counts - expected) ** 2 / expected).sum())
        dof = bins - 1
        # Far in the tail: about 6 standard deviations of a chi-square with `dof` dof.
        assert chi2 < dof + 6 * math.sqrt(2 * dof)


def test_neighbours_are_uncorrelated() -> None:
    u = uniform_at(KEY, N) - 0.5
    for lag in (1, 2, 64, 4096):
        corr = float((u[:-lag] * u[lag:]).mean() / (u * u).mean())
        assert abs(corr) < 6 / math.sqrt(N)
    # Low bits of the index must not leak into the draw: compare even and odd positions.
    assert abs(float(u[0::2].mean() - u[1::2].mean())) < 6 * math.sqrt(2 / 12 / (N / 2))


@pytest.mark.parametrize(("d1", "d2"), [(0.5, 0.5), (0.1, 0.9), (0.3, 0.3)])
def test_two_models_masks_are_independent(d1: float, d2: float) -> None:
    m1 = keep_mask(dare_key(7, 0, "w"), d1, N)
    m2 = keep_mask(dare_key(7, 1, "w"), d2, N)
    both = int((m1 & m2).sum())
    p = d1 * d2
    assert abs(both - p * N) < binomial_bound(N, p)


def test_density_one_keeps_all_and_tiny_sizes() -> None:
    assert keep_mask(KEY, 1.0, 1000).all()
    assert keep_mask(KEY, 1, 3).all()
    assert keep_mask(KEY, 0.5, 0).shape == (0,)
    assert keep_mask(KEY, 0.5, 1).dtype == torch.bool


@pytest.mark.parametrize("density", [0.0, -0.1, 1.0000001, math.nan, math.inf])
def test_bad_density(density: float) -> None:
    with pytest.raises(ValueError, match=r"density must be in \(0, 1\]"):
        keep_mask(KEY, density, 10)


def test_bad_arguments() -> None:
    with pytest.raises(TypeError, match="density"):
        keep_mask(KEY, True, 10)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="key"):
        keep_mask(-1, 0.5, 10)
    with pytest.raises(ValueError, match="key"):
        keep_mask(1 << 63, 0.5, 10)
    with pytest.raises(ValueError, match="numel"):
        keep_mask(KEY, 0.5, -1)
    with pytest.raises(ValueError, match="offset"):
        uniform_at(KEY, 10, offset=-5)
    with pytest.raises(ValueError, match="model_index"):
        dare_key(0, -1, "w")
    with pytest.raises(TypeError, match="tensor_name"):
        dare_key(0, 0, b"w")  # type: ignore[arg-type]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.gpu
def test_cuda_matches_cpu() -> None:
    for offset in (0, (1 << 32) - 100_000):
        cpu = keep_mask(KEY, 0.3, 3_000_000, offset=offset)
        gpu = keep_mask(KEY, 0.3, 3_000_000, offset=offset, device="cuda")
        assert torch.equal(cpu, gpu.cpu())
        assert torch.equal(
            uniform_at(KEY, 1000, offset=offset),
            uniform_at(KEY, 1000, offset=offset, device="cuda").cpu(),
        )
