"""Exact top-k by magnitude: agreement with a sort-based reference, ties, chunks, streams."""

from __future__ import annotations

import math
from collections.abc import Iterator

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from merge_kernels.methods import magnitude_select as ms
from merge_kernels.methods.magnitude_select import (
    MagnitudeThreshold,
    StreamingMagnitudeSelect,
    apply_threshold_mask,
    magnitude_threshold,
    top_k_magnitude_mask,
)


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    # Results do not depend on the thread count; one thread keeps the file fast when other
    # processes share the cores (OpenMP barriers stall badly on an oversubscribed machine).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# Above the direct path (<= 2^16 entries), so the sampled bracket runs; a tensor this size
# is worked in about eight chunks, the last one ragged.
LARGE = 300_007


def reference(x: torch.Tensor, k: int) -> tuple[MagnitudeThreshold, torch.Tensor]:
    """Threshold and exact_k mask from a stable sort by (-|x|, flat index)."""
    mags = x.reshape(-1).double().abs()
    n = mags.numel()
    mask = torch.zeros(n, dtype=torch.bool)
    if k == 0:
        return MagnitudeThreshold(math.inf, 0, 0), mask.view(x.shape)
    # A stable descending sort keeps equal magnitudes in flat order.
    order = torch.sort(mags, descending=True, stable=True).indices
    mask[order[:k]] = True
    value = float(mags[order[k - 1]])
    keep = k - int((mags > value).sum())
    return MagnitudeThreshold(value, keep, k), mask.view(x.shape)


def make(kind: str, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    n = math.prod(shape)
    if kind == "normal":
        flat = torch.randn(n, generator=g)
    elif kind == "levels":  # a handful of magnitudes, both signs, many zeros
        flat = torch.randint(-3, 4, (n,), generator=g).float() * 0.25
    elif kind == "bf16_delta":  # task vector of bf16 checkpoints: few distinct values
        base = torch.randn(n, generator=g).bfloat16()
        tuned = (base.float() + 0.01 * torch.randn(n, generator=g)).bfloat16()
        flat = tuned.float() - base.float()
    elif kind == "bf16_rounded":  # 8 bits of mantissa: a few thousand distinct magnitudes
        flat = (torch.randn(n, generator=g) * 1e-3).bfloat16().float()
    elif kind == "signed_zeros":
        flat = torch.where(torch.rand(n, generator=g) < 0.5, -0.0, 0.0)
        flat[torch.rand(n, generator=g) < 0.1] = 1.5
        flat[torch.rand(n, generator=g) < 0.1] = -1.5
    elif kind == "heavy_tail":
        flat = torch.randn(n, generator=g) ** 5
        flat[:: max(1, n // 7)] = math.inf
    else:
        raise AssertionError(kind)
    return flat.view(shape)


def ks_for(n: int) -> list[int]:
    return sorted({0, 1, 2, n // 5, n // 2, n - 1, n} & set(range(n + 1)))


def check(x: torch.Tensor, k: int) -> None:
    expected, expected_mask = reference(x, k)
    assert magnitude_threshold(x, k) == expected
    mask = top_k_magnitude_mask(x, k)
    assert mask.shape == x.shape and mask.dtype == torch.bool
    assert int(mask.sum()) == k
    assert torch.equal(mask, expected_mask)
    loose = top_k_magnitude_mask(x, k, ties="threshold")
    if k == 0:
        assert not loose.any()
    else:
        assert torch.equal(loose, x.abs() >= expected.value)
        assert bool((loose | ~mask).all())  # the threshold rule keeps a superset


@pytest.mark.parametrize(
    "kind", ["normal", "levels", "bf16_delta", "bf16_rounded", "signed_zeros", "heavy_tail"]
)
@pytest.mark.parametrize("shape", [(1,), (7,), (1000,), (40, 33), (3, 50, 7), (LARGE,)])
def test_matches_sort_reference(kind: str, shape: tuple[int, ...]) -> None:
    x = make(kind, shape, seed=sum(shape) + len(kind))
    for k in ks_for(x.numel()):
        check(x, k)


@pytest.mark.parametrize("kind", ["normal", "bf16_delta", "levels"])
def test_large_tensor_middle_densities(kind: str) -> None:
    x = make(kind, (600, 1001), seed=3)
    n = x.numel()
    for density in (0.01, 0.2, 0.9):
        check(x, int(density * n))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    values=st.lists(
        st.sampled_from([0.0, -0.0, 0.5, -0.5, 1.0, -1.0, 2.5, math.inf, -math.inf, 1e-40]),
        min_size=1,
        max_size=60,
    ),
    data=st.data(),
)
def test_hypothesis_tied_values(values: list[float], data: st.DataObject) -> None:
    x = torch.tensor(values, dtype=torch.float32)
    k = data.draw(st.integers(0, x.numel()))
    check(x, k)


@settings(max_examples=40, deadline=None)
@given(
    values=st.lists(
        st.floats(width=32, allow_nan=False, allow_infinity=True), min_size=1, max_size=80
    ),
    rows=st.integers(1, 4),
    data=st.data(),
)
def test_hypothesis_arbitrary_floats(values: list[float], rows: int, data: st.DataObject) -> None:
    values = values[: len(values) - len(values) % rows] or values[:1]
    x = torch.tensor(values, dtype=torch.float32)
    if x.numel() % rows == 0:
        x = x.view(rows, -1)
    check(x, data.draw(st.integers(0, x.numel())))


def test_negative_zero_is_zero() -> None:
    x = torch.tensor([-0.0, 0.0, -0.0, 1.0])
    threshold = magnitude_threshold(x, 3)
    assert threshold == MagnitudeThreshold(0.0, 2, 3)
    assert top_k_magnitude_mask(x, 3).tolist() == [True, True, False, True]
    assert top_k_magnitude_mask(x, 3, ties="threshold").all()


def test_one_element() -> None:
    x = torch.tensor([-2.0])
    assert magnitude_threshold(x, 0) == MagnitudeThreshold(math.inf, 0, 0)
    assert magnitude_threshold(x, 1) == MagnitudeThreshold(2.0, 1, 1)
    assert top_k_magnitude_mask(x, 1).tolist() == [True]
    assert top_k_magnitude_mask(x, 0).tolist() == [False]


def test_k_zero_keeps_nothing_even_infinities() -> None:
    x = torch.tensor([math.inf, -math.inf, 1.0])
    assert not top_k_magnitude_mask(x, 0).any()
    assert not top_k_magnitude_mask(x, 0, ties="threshold").any()
    mask, _ = apply_threshold_mask(x, magnitude_threshold(x, 0), 0, ties="threshold")
    assert not mask.any()


def test_exact_k_picks_lowest_flat_index_among_ties() -> None:
    x = torch.tensor([[1.0, 3.0, -1.0], [1.0, -3.0, 1.0]])
    assert magnitude_threshold(x, 4) == MagnitudeThreshold(1.0, 2, 4)
    assert top_k_magnitude_mask(x, 4).tolist() == [[True, True, True], [False, True, False]]
    assert top_k_magnitude_mask(x, 4, ties="threshold").all()


def test_tie_run_at_either_end_of_the_bracket() -> None:
    # 40% of the entries share one magnitude between two continuous ranges: depending on k
    # the k-th largest is the run's value reached from above (the bracket's low end), from
    # below (its high end) or from inside, with some but not all of the run kept.
    g = torch.Generator().manual_seed(17)
    n = LARGE
    x = torch.rand(n, generator=g) + 1.0  # (1, 2)
    x[torch.rand(n, generator=g) < 0.4] = 1.0
    low = torch.rand(n, generator=g) < 0.3
    x[low] = -torch.rand(int(low.sum()), generator=g)  # (-1, 0]
    above = int((x.abs() > 1.0).sum())
    run = int((x.abs() == 1.0).sum())
    for k in (above + 1, above + 12_000, above + run // 3, above + run - 40, above + run - 1):
        check(x, k)


@pytest.mark.parametrize("ties", ["exact_k", "threshold"])
@pytest.mark.parametrize("kind", ["bf16_delta", "levels", "normal"])
def test_row_chunks_match_whole_tensor(ties: ms.TieRule, kind: str) -> None:
    x = make(kind, (517, 389), seed=11)
    for k in (1, x.numel() // 3, x.numel() - 1):
        threshold = magnitude_threshold(x, k)
        whole = top_k_magnitude_mask(x, k, ties=ties)
        parts = []
        seen = 0
        for rows in torch.split(x, [1, 100, 0, 250, 166]):
            mask, seen = apply_threshold_mask(rows, threshold, seen, ties=ties)
            assert mask.shape == rows.shape
            parts.append(mask)
        assert torch.equal(torch.cat(parts), whole)
        assert seen == int((x.abs() == threshold.value).sum())


def test_chunk_mask_counts_ties_past_the_budget() -> None:
    x = torch.tensor([2.0, 1.0, 1.0, 1.0])
    threshold = magnitude_threshold(x, 2)  # value 1.0, one tie kept
    mask, seen = apply_threshold_mask(x[:2], threshold, 0)
    assert mask.tolist() == [True, True] and seen == 1
    mask, seen = apply_threshold_mask(x[2:], threshold, seen)
    assert mask.tolist() == [False, False] and seen == 3


def stream_threshold(tensors: list[torch.Tensor], k: int) -> tuple[MagnitudeThreshold, int]:
    selector = StreamingMagnitudeSelect(sum(t.numel() for t in tensors), k)
    passes = 0
    while selector.needs_pass():
        for tensor in tensors:
            selector.update(tensor)
        selector.end_pass()
        passes += 1
    return selector.result(), passes


@pytest.mark.parametrize("kind", ["normal", "bf16_delta", "levels", "heavy_tail", "signed_zeros"])
def test_stream_matches_concatenation(kind: str) -> None:
    tensors = [
        make(kind, (300, 200), seed=1),
        make(kind, (17,), seed=2),
        make(kind, (5, 4, 3), seed=3),
        make(kind, (70_001,), seed=4),
    ]
    whole = torch.cat([t.reshape(-1) for t in tensors])
    for k in ks_for(whole.numel()):
        result, passes = stream_threshold(tensors, k)
        assert result == reference(whole, k)[0]
        assert passes <= 2


def test_stream_threshold_drives_chunk_masks() -> None:
    tensors = [make("bf16_delta", (64, 64), seed=s) for s in range(3)]
    whole = torch.cat([t.reshape(-1) for t in tensors])
    k = whole.numel() // 4
    threshold, _ = stream_threshold(tensors, k)
    seen = 0
    masks = []
    for tensor in tensors:
        mask, seen = apply_threshold_mask(tensor, threshold, seen)
        masks.append(mask.reshape(-1))
    assert torch.equal(torch.cat(masks), reference(whole, k)[1])


def test_stream_validates_its_passes() -> None:
    selector = StreamingMagnitudeSelect(10, 3)
    selector.update(torch.ones(4))
    with pytest.raises(ValueError, match="saw 4 entries"):
        selector.end_pass()
    with pytest.raises(ValueError, match="more than the 10"):
        selector.update(torch.ones(7))
    with pytest.raises(RuntimeError):
        selector.result()
    empty = StreamingMagnitudeSelect(0, 0)
    assert not empty.needs_pass()
    assert empty.result() == MagnitudeThreshold(math.inf, 0, 0)


def test_nan_raises() -> None:
    x = torch.randn(LARGE)
    x[12345] = math.nan
    for k in (0, 5, LARGE):
        with pytest.raises(ValueError, match="NaN"):
            magnitude_threshold(x, k)
        with pytest.raises(ValueError, match="NaN"):
            top_k_magnitude_mask(x, k)
    with pytest.raises(ValueError, match="NaN"):
        apply_threshold_mask(x, MagnitudeThreshold(1.0, 1, 10), 0)
    selector = StreamingMagnitudeSelect(LARGE + 3, 10)
    selector.update(x)
    selector.update(torch.ones(3))
    with pytest.raises(ValueError, match="NaN"):
        selector.end_pass()


def test_inf_minus_inf_is_not_nan() -> None:
    x = torch.tensor([math.inf, -math.inf, 1.0])  # the NaN screen's float sum is NaN here
    assert magnitude_threshold(x, 2) == MagnitudeThreshold(math.inf, 2, 2)


def test_bad_arguments() -> None:
    x = torch.randn(10)
    with pytest.raises(ValueError, match="k must be in"):
        magnitude_threshold(x, 11)
    with pytest.raises(ValueError, match="k must be in"):
        top_k_magnitude_mask(x, -1)
    with pytest.raises(TypeError, match="k must be an int"):
        magnitude_threshold(x, 2.0)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="float32"):
        magnitude_threshold(x.double(), 2)
    with pytest.raises(ValueError, match="ties"):
        top_k_magnitude_mask(x, 2, ties="nearest")  # type: ignore[arg-type]


def test_half_precision_inputs_are_widened() -> None:
    x = make("normal", (2000,), seed=5).bfloat16()
    assert magnitude_threshold(x, 100) == reference(x.float(), 100)[0]


# --- the fallbacks behind the sampled bracket ------------------------------------------


@pytest.mark.parametrize("kind", ["normal", "bf16_delta", "levels"])
def test_radix_fallback_is_exact(kind: str) -> None:
    x = make(kind, (LARGE,), seed=8)
    for k in ks_for(x.numel())[1:]:
        selection = ms._select_radix(x, k)
        expected = reference(x, k)[0]
        assert selection.threshold == expected
        assert selection.count_at_value == int((x.abs() == expected.value).sum())


@pytest.mark.parametrize("kind", ["normal", "bf16_delta"])
def test_misleading_brackets_still_give_the_exact_answer(kind: str) -> None:
    x = make(kind, (LARGE,), seed=9)
    mags = x.abs()
    for k in (1, LARGE // 3, LARGE):
        expected = reference(x, k)[0]
        value = expected.value
        brackets = [(0.0, 1e-30), (1e30, math.inf), (0.1, 0.1), (None, 1e-3), (5.0, None)]
        brackets += [(value, value), (0.0, value), (value, math.inf), (None, value)]
        brackets += [(value * 0.98, value * 1.02), (value, value * 1.02), (value * 0.98, value)]
        resolved = 0
        for lo, hi in brackets:
            for lo_tied, hi_tied in [(False, False), (True, True), (True, False), (False, True)]:
                bracket = ms._Bracket(lo, lo_tied, hi, hi_tied)
                outcome = ms._bracket_pass(x, k, bracket)
                if isinstance(outcome, ms._Selection):
                    resolved += 1
                    assert outcome.threshold == expected
                    assert outcome.count_at_value == int((mags == value).sum())
        assert resolved >= 8


def test_sampling_fooled_by_periodic_structure_falls_back(monkeypatch: pytest.MonkeyPatch) -> None:
    # Every sampled position holds a large value, every other one a small value: the
    # sample's bracket is far off, and the answer must still be exact.
    x = torch.full((LARGE,), 0.001)
    want = min(ms._SAMPLE_MAX, max(ms._SAMPLE_MIN, LARGE // ms._SAMPLE_SHARE))
    stride = max(1, LARGE // want) | 1
    x[stride // 2 :: stride] = torch.linspace(5.0, 6.0, x[stride // 2 :: stride].numel())
    x[::7] += torch.linspace(0.0, 1e-4, x[::7].numel())
    for k in (LARGE // 2, 10):
        assert magnitude_threshold(x, k) == reference(x, k)[0]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["normal", "bf16_delta", "levels", "heavy_tail"])
def test_cuda_matches_cpu(kind: str) -> None:
    x = make(kind, (1000, 3001), seed=21)
    gpu = x.cuda()
    for k in (1, x.numel() // 5, x.numel() - 1):
        threshold = magnitude_threshold(x, k)
        assert magnitude_threshold(gpu, k) == threshold
        for ties in ("exact_k", "threshold"):
            assert torch.equal(
                top_k_magnitude_mask(gpu, k, ties=ties).cpu(), top_k_magnitude_mask(x, k, ties=ties)
            )
        seen = 0
        parts = []
        for rows in torch.split(gpu, 300):
            mask, seen = apply_threshold_mask(rows, threshold, seen)
            parts.append(mask.cpu())
        assert torch.equal(torch.cat(parts), top_k_magnitude_mask(x, k))
        assert seen == int((x.abs() == threshold.value).sum())
        assert ms._select_radix(gpu.reshape(-1), k).threshold == threshold
    result, _ = stream_threshold([gpu, x[:10]], x.numel() // 3)
    assert result == reference(torch.cat([x.reshape(-1), x[:10].reshape(-1)]), x.numel() // 3)[0]
