"""Magnitude trims on task vectors with heavy ties at the threshold, against a sorting reference.

A bf16 fine-tune one unit in the last place away from its base (base ~ N(0, 0.02²), noise
N(0, (0.01·0.02)²)) has a task vector of few distinct values: at TIES' density 0.2 the k-th
largest magnitude is shared by about a sixth of the entries. Every way a trim is computed
(whole tensors, row chunks carrying the ties seen, a model-wide stream, the fused CPU loops)
must keep exactly the entries a stable sort keeps: under ``exact_k`` the first tied entries
in flat order, under ``threshold`` all of them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

import merge_kernels.piece_merger as piece_merger
from merge_kernels import fused
from merge_kernels.fused import ConsensusForm, ties_into, trim_threshold
from merge_kernels.methods import device_select
from merge_kernels.methods.kernel import TrimState
from merge_kernels.methods.magnitude_select import (
    StreamingMagnitudeSelect,
    apply_threshold_mask,
    magnitude_threshold,
    magnitude_threshold_with_ties,
    top_k_magnitude_mask,
)
from merge_kernels.recipe import parse_recipe
from merge_kernels.registry import get_method
from merge_kernels.runner import MergeOptions, run_merge

RULES = ["exact_k", "threshold"]


def heavy_pair(seed: int, n: int, dtype: torch.dtype = torch.bfloat16) -> tuple[torch.Tensor, ...]:
    """A base and a fine-tune one ulp apart, as a bf16 fine-tune is (heavy ties)."""
    generator = torch.Generator().manual_seed(seed)
    base = (torch.randn(n, generator=generator) * 0.02).to(dtype)
    return base, fine_tune(base, seed + 1)


def fine_tune(base: torch.Tensor, seed: int) -> torch.Tensor:
    """``base`` plus noise N(0, (0.01·0.02)²), rounded to its dtype."""
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn(base.shape, generator=generator) * 2e-4
    return (base.float() + noise).to(base.dtype)


def at_threshold(seed: int, n: int) -> tuple[torch.Tensor, int]:
    """A vector whose k-th largest magnitude is held by a block of ties around the middle,
    both signs, scattered at random; and that k."""
    generator = torch.Generator().manual_seed(seed)
    above, tied = n // 5, n // 3
    magnitudes = torch.cat(
        [torch.full((above,), 3.0), torch.full((tied,), 2.0), torch.ones(n - above - tied)]
    )
    signs = torch.where(torch.rand(n, generator=generator) < 0.5, -1.0, 1.0)
    values = (magnitudes * signs)[torch.randperm(n, generator=generator)]
    return values, above + tied // 2


def reference_mask(tau: torch.Tensor, k: int, ties: str) -> torch.Tensor:
    """The trim by a stable sort: the k largest magnitudes, ties first-come in flat order."""
    mags = tau.reshape(-1).abs()
    mask = torch.zeros(mags.numel(), dtype=torch.bool)
    if k == 0:
        return mask.view(tau.shape)
    order = torch.sort(mags, descending=True, stable=True).indices
    if ties == "exact_k":
        mask[order[:k]] = True
    else:
        mask = mags >= mags[order[k - 1]]
    return mask.view(tau.shape)


def _tau(base: torch.Tensor, model: torch.Tensor) -> torch.Tensor:
    return model.float() - base.float()


def test_the_heavy_tie_data_has_heavy_ties() -> None:
    """The data this module is about: at density 0.2 a large share of entries tie."""
    tau = _tau(*heavy_pair(0, 200_000))
    k = 40_000
    threshold, tied = magnitude_threshold_with_ties(tau, k)
    assert tied > 20_000  # ties far outnumber any sample's bracket
    assert 0 < threshold.keep_at_value < tied


@settings(max_examples=12, deadline=None)
@given(
    seed=st.integers(0, 1000),
    density=st.sampled_from([0.05, 0.2, 0.5, 0.9]),
    dtype=st.sampled_from([torch.bfloat16, torch.float16]),
    ties=st.sampled_from(RULES),
)
def test_whole_tensor_masks_match_the_sort(
    seed: int, density: float, dtype: torch.dtype, ties: str
) -> None:
    tau = _tau(*heavy_pair(seed, 150_001, dtype)).view(-1, 1)  # odd length: a partial chunk
    k = int(density * tau.numel())
    mask = top_k_magnitude_mask(tau, k, ties=ties)  # type: ignore[arg-type]
    assert torch.equal(mask, reference_mask(tau, k, ties))


@pytest.mark.parametrize("ties", RULES)
@pytest.mark.parametrize("offset", [-1, 0, 1])
def test_ties_exactly_at_the_threshold(ties: str, offset: int) -> None:
    """k inside, at the first and at the last entry of a block of ties."""
    values, k = at_threshold(3, 120_000)
    above, tied = 24_000, 40_000
    for target in (k, above + 1, above + tied):
        mask = top_k_magnitude_mask(values, target + offset, ties=ties)  # type: ignore[arg-type]
        assert torch.equal(mask, reference_mask(values, target + offset, ties))


def _periodic(n: int) -> torch.Tensor:
    """Large values exactly where the one-shot path samples, small ones elsewhere."""
    x = torch.full((n,), 0.001)
    want = min(device_select._SAMPLE_MAX, max(device_select._SAMPLE_MIN, n // 64))
    stride = max(1, n // want) | 1
    x[stride // 2 :: stride] = torch.linspace(5.0, 6.0, x[stride // 2 :: stride].numel())
    return x


@pytest.mark.parametrize("ties", RULES)
def test_the_one_shot_mask_matches_the_sort(ties: str) -> None:
    """The GPU's one-shot selection, run here on the CPU: heavy ties, a block of ties at
    the threshold, infinities and negative zeros, and a sample that misleads."""
    tau = _tau(*heavy_pair(11, 1_500_001))
    tau[::1000] = -0.0
    tau[5::100_000] = float("inf")
    values, block_k = at_threshold(4, 1_200_000)
    periodic = _periodic(1_300_000)
    cases = [(tau, k) for k in (1, 300_000, 1_000_000, tau.numel() - 1)]
    cases += [(values, k) for k in (block_k, 240_001, 640_000)]
    cases += [(periodic, k) for k in (10, 650_000)]
    for x, k in cases:
        mask = device_select.one_shot_mask(x, k, exact_k=ties == "exact_k")
        assert torch.equal(mask, reference_mask(x, k, ties)), k


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.gpu
@pytest.mark.parametrize("ties", RULES)
@pytest.mark.parametrize("one_shot", [True, False])
def test_gpu_masks_match_the_sort(
    ties: str, one_shot: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The GPU's one-shot mask (and, without the memory for it, the chunked one) keeps the
    entries the sort keeps, on heavy ties, a block of ties, infinities and negative zeros."""
    if not one_shot:
        monkeypatch.setattr(device_select, "_free_bytes", lambda device: 0)
    tau = _tau(*heavy_pair(9, 3_000_001))
    tau[::1000] = -0.0
    tau[5::100_000] = float("inf")
    tau[7::100_000] = float("-inf")
    values, block_k = at_threshold(4, 1_200_000)
    cases = [(tau, k) for k in (1, 30, 600_000, 2_000_000, tau.numel() - 1)]
    cases += [(values, k) for k in (block_k, 240_001, 640_000)]
    for x, k in cases:
        mask = top_k_magnitude_mask(x.cuda(), k, ties=ties)  # type: ignore[arg-type]
        assert torch.equal(mask.cpu(), reference_mask(x, k, ties)), k


@pytest.mark.parametrize("ties", RULES)
@pytest.mark.parametrize("chunk", [1000, 65_536, 99_999])
def test_row_chunks_carry_the_ties_seen(ties: str, chunk: int) -> None:
    tau = _tau(*heavy_pair(5, 200_000))
    k = 40_000
    threshold = magnitude_threshold(tau, k)
    pieces, seen = [], 0
    for start in range(0, tau.numel(), chunk):
        mask, seen = apply_threshold_mask(tau[start : start + chunk], threshold, seen, ties=ties)  # type: ignore[arg-type]
        pieces.append(mask)
    assert torch.equal(torch.cat(pieces), reference_mask(tau, k, ties))
    assert seen == int((tau.abs() == threshold.value).sum())


@pytest.mark.parametrize("ties", RULES)
def test_a_model_wide_stream_matches_the_sort_of_the_whole(ties: str) -> None:
    """trim_scope: model: one threshold over every tensor of a model, ties in stream order."""
    tensors = [_tau(*heavy_pair(seed, n)) for seed, n in enumerate([70_000, 1_000, 130_000, 5])]
    values, _ = at_threshold(9, 40_000)
    tensors.insert(2, values * 2e-4)  # ties at another scale, in the middle of the stream
    whole = torch.cat(tensors)
    for k in (0, 1, int(0.2 * whole.numel()), whole.numel() - 1):
        selector = StreamingMagnitudeSelect(whole.numel(), k)
        while selector.needs_pass():
            for tensor in reversed(tensors):  # a pass may visit the tensors in any order
                selector.update(tensor)
            selector.end_pass()
        threshold = selector.result()
        masks, seen = [], 0
        for tensor in tensors:
            mask, seen = apply_threshold_mask(tensor, threshold, seen, ties=ties)  # type: ignore[arg-type]
            masks.append(mask)
        assert torch.equal(torch.cat(masks), reference_mask(whole, k, ties)), k


# --- the fused CPU loops -------------------------------------------------------------------

fused_only = pytest.mark.skipif(
    not fused.available(), reason="the C extension was not built (no C compiler)"
)


def _form(ties: str) -> ConsensusForm:
    spec = get_method("ties")
    assert spec.consensus_form is not None
    form = spec.consensus_form(spec.params.model_validate({"trim_ties": ties}))
    assert form is not None
    return form


@fused_only
@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 1000), density=st.sampled_from([0.1, 0.2, 0.6]))
def test_the_fused_trim_finds_the_threshold_and_the_last_kept_tie(
    seed: int, density: float
) -> None:
    base, model = heavy_pair(seed, 120_000)
    tau = _tau(base, model)
    k = int(density * tau.numel())
    found = trim_threshold(model, base, k)
    assert found is not None  # heavy ties are the loop's to answer, not the torch path's
    assert (found.threshold, found.count_at_value) == magnitude_threshold_with_ties(tau, k)
    expected = reference_mask(tau, k, "exact_k")
    tied = (tau.abs() == found.threshold.value).nonzero().view(-1)
    kept = tied[expected[tied]]
    assert found.cutoff == (tau.numel() if kept.numel() == tied.numel() else int(kept[-1]))


@fused_only
@pytest.mark.parametrize("ties", RULES)
@pytest.mark.parametrize("split", [False, True])
def test_the_fused_merge_keeps_the_sorted_ties(
    ties: str, split: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Whole (cutoffs from the trim), in pieces (ties carried, the cutoff searched for), and
    split between threads: the torch kernel's bits every time."""
    if split:
        monkeypatch.setattr(fused, "_SPLIT_FROM", 1000)
        monkeypatch.setattr(fused.os, "cpu_count", lambda: 3)
    n = 100_003
    base, first = heavy_pair(11, n)
    models = [first, fine_tune(base, 12), fine_tune(base, 13)]
    densities = [0.2, 0.1, 0.5]
    ks = [int(d * n) for d in densities]
    found = [trim_threshold(m, base, k) for m, k in zip(models, ks, strict=True)]
    assert all(f is not None for f in found)
    trims = [TrimState(f.threshold, 0) for f in found if f is not None]
    params = [{"weight": 1.0, "density": d} for d in densities]
    expected = (
        get_method("ties")
        .merge_tensors(
            [m.float() for m in models],
            base=base.float(),
            params={"trim_ties": ties},
            model_params=params,
        )
        .bfloat16()
    )
    out = torch.empty(n, dtype=torch.bfloat16)
    cutoffs = [f.cutoff if f is not None else None for f in found]
    assert ties_into(out, base, models, _form(ties), [1.0] * 3, trims, cutoffs) is not None
    assert torch.equal(out.view(torch.int16), expected.view(torch.int16))
    pieces, before = torch.empty(n, dtype=torch.bfloat16), [0, 0, 0]
    for start in range(0, n, 7001):
        stop = min(n, start + 7001)
        states = [TrimState(t.threshold, b) for t, b in zip(trims, before, strict=True)]
        after = ties_into(
            pieces[start:stop],
            base[start:stop],
            [m[start:stop] for m in models],
            _form(ties),
            [1.0] * 3,
            states,
        )
        assert after is not None
        before = after
    assert torch.equal(pieces.view(torch.int16), expected.view(torch.int16))
    taus = [_tau(base, m).abs() for m in models]
    assert before == [int((t == s.threshold.value).sum()) for t, s in zip(taus, trims, strict=True)]


@fused_only
@pytest.mark.parametrize(
    ("ties", "scope", "whole_trim_elements"),
    [
        ("exact_k", "tensor", 1 << 26),  # whole tensors: the fused trim
        ("exact_k", "tensor", 4096),  # row chunks: the streaming pre-pass, ties carried
        ("exact_k", "model", 1 << 26),
        ("threshold", "model", 4096),
    ],
)
def test_heavy_tie_merges_write_the_torch_paths_bytes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, ties: str, scope: str, whole_trim_elements: int
) -> None:
    """End to end, per tensor (whole or in row chunks) and model-wide: the fused loops and
    the torch path write the same file."""
    shapes = {"embed.weight": (300, 256), "mlp.weight": (200, 256), "norm.weight": (256,)}
    for index in range(4):
        folder = tmp_path / f"m{index}"
        folder.mkdir()
        tensors = {}
        for position, (name, shape) in enumerate(shapes.items()):
            base = heavy_pair(100 * position, int(torch.tensor(shape).prod()))[0].view(shape)
            tensors[name] = fine_tune(base, 100 * position + 50 + index) if index else base
        save_file(tensors, folder / "model.safetensors")
        (folder / "config.json").write_text('{"model_type": "llama"}')
    document: dict[str, Any] = {
        "merge_method": "ties",
        "base_model": str(tmp_path / "m0"),
        "models": [
            {"model": str(tmp_path / f"m{i}"), "parameters": {"weight": 1.0, "density": 0.2}}
            for i in (1, 2, 3)
        ],
        "parameters": {"trim_ties": ties, "trim_scope": scope},
        "dtype": "bfloat16",
    }
    options = MergeOptions(chunk_elements=2048, whole_trim_elements=whole_trim_elements)
    run_merge(parse_recipe(document), tmp_path / "fused", options)
    monkeypatch.setattr(piece_merger, "ties_into", lambda *args: None)
    monkeypatch.setattr(fused, "trim_threshold", lambda *args: None)
    run_merge(parse_recipe(document), tmp_path / "torch", options)
    assert (tmp_path / "fused" / "model.safetensors").read_bytes() == (
        tmp_path / "torch" / "model.safetensors"
    ).read_bytes()
