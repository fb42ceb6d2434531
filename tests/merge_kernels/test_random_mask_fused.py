"""DARE's keep masks from the fused C loop: the same bits as the torch int32 lanes and the
plain-Python specification, and the same merged checkpoints with and without the loop."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

import merge_kernels.piece_merger as piece_merger
from merge_kernels import fused
from merge_kernels.methods import random_mask as rm
from merge_kernels.methods.random_mask import (
    dare_key,
    keep_mask,
    keep_mask_with_probabilities,
    uniform_at,
)
from merge_kernels.recipe import parse_recipe
from merge_kernels.runner import MergeOptions, run_merge

pytestmark = pytest.mark.skipif(
    not fused.dare_hash_handles(torch.empty(1)), reason="the C extension is not built"
)

KEY = dare_key(99, 2, "model.layers.3.mlp.up_proj.weight")
TWO_32 = 1 << 32


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def both_paths(call: Any, monkeypatch: pytest.MonkeyPatch) -> tuple[Any, Any]:
    """``call()`` with the C loop, then on the torch lanes."""
    with monkeypatch.context() as patch:
        calls: list[int] = []
        for name in ("dare_keep_into", "dare_uniform_into", "dare_keep_with_probabilities_into"):
            original = getattr(fused, name)

            def counted(*args: Any, _original: Any = original) -> Any:
                calls.append(1)
                return _original(*args)

            patch.setattr(fused, name, counted)
        with_loop = call()
        assert calls, "the C loop was not used"
        patch.setattr(rm, "_USE_EXTENSION", False)
        on_torch = call()
    return with_loop, on_torch


def reference_u32(indices: list[int], key: int = KEY) -> torch.Tensor:
    return torch.tensor([rm._reference_u32(key, i) for i in indices], dtype=torch.float64)


DENSITIES = [
    2.0**-34,  # rounds to T = 0: nothing kept
    3e-10,  # T = 1
    1e-6,
    0.5,
    1.0 - 1e-12,  # T = 2^32 - 1 (the largest below "keep all")
    1.0 - 2.0**-33,
    1.0,
]


@pytest.mark.parametrize("density", DENSITIES)
@pytest.mark.parametrize(
    ("offset", "numel"),
    [(0, 0), (5, 1), (0, 1023), (TWO_32 - 37, 101), ((7 << 40) - 2, 5), (123, 70_001)],
)
def test_keep_mask_same_bits_as_torch_and_reference(
    density: float, offset: int, numel: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    with_loop, on_torch = (
        both_paths(lambda: keep_mask(KEY, density, numel, offset=offset), monkeypatch)
        if density < 1.0
        else (keep_mask(KEY, density, numel, offset=offset),) * 2
    )
    assert with_loop.dtype == torch.bool and with_loop.shape == (numel,)
    assert torch.equal(with_loop, on_torch)
    threshold = TWO_32 if density == 1.0 else min(TWO_32 - 1, round(density * TWO_32))
    head = list(range(offset, offset + min(numel, 2000)))
    assert torch.equal(with_loop[: len(head)], reference_u32(head) < threshold)


@settings(max_examples=40, deadline=None)
@given(
    key=st.integers(0, (1 << 63) - 1),
    offset=st.one_of(
        st.integers(0, 1 << 20),
        st.integers(TWO_32 - 300, TWO_32 + 300),
        st.integers(0, (1 << 62)),
    ),
    numel=st.integers(0, 600),
    density=st.floats(1e-9, 1.0, exclude_max=True),
)
def test_random_keys_offsets_lengths(key: int, offset: int, numel: int, density: float) -> None:
    mask = keep_mask(key, density, numel, offset=offset)
    u = uniform_at(key, numel, offset=offset)
    expected = reference_u32(list(range(offset, offset + numel)), key)
    assert torch.equal(u * 2.0**32, expected)
    assert torch.equal(mask, expected < round(density * TWO_32))


@pytest.mark.parametrize("start", [TWO_32 - 1_500_001, (9 << 32) - 700_000])
def test_threaded_run_across_a_multiple_of_2_to_the_32(
    start: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A run long enough to be split between threads, one part on each side of the high
    word's change: equal to the torch lanes everywhere, to the reference on a stride."""
    numel = 3_000_003
    monkeypatch.setattr(fused.os, "cpu_count", lambda: 4)
    with_loop, on_torch = both_paths(lambda: keep_mask(KEY, 0.3, numel, offset=start), monkeypatch)
    assert torch.equal(with_loop, on_torch)
    where = [
        *range(0, numel, 9973),
        *range(TWO_32 - start % TWO_32 - 3, TWO_32 - start % TWO_32 + 3),
    ]
    expected = reference_u32([start + j for j in where]) < round(0.3 * TWO_32)
    assert torch.equal(with_loop[where], expected)


@pytest.mark.parametrize("offset", [0, TWO_32 - 50, (3 << 50) + 1])
def test_uniform_same_as_torch(offset: int, monkeypatch: pytest.MonkeyPatch) -> None:
    with_loop, on_torch = both_paths(lambda: uniform_at(KEY, 4099, offset=offset), monkeypatch)
    assert with_loop.dtype == torch.float64
    assert torch.equal(with_loop, on_torch)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("offset", [0, TWO_32 - 1000])
def test_probabilities_same_as_torch(
    dtype: torch.dtype, offset: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    generator = torch.Generator().manual_seed(3)
    p = torch.rand(61, 67, generator=generator, dtype=dtype)
    flat = p.view(-1)
    flat[:5] = torch.tensor([0.0, 1.0, 2.0**-33, 2.0**-32, 1.0 - 2.0**-24], dtype=dtype)
    flat[5:20] = 0.5  # ties of u with the limit are impossible, but the rounding is exercised
    with_loop, on_torch = both_paths(
        lambda: keep_mask_with_probabilities(KEY, p, offset=offset), monkeypatch
    )
    assert with_loop.shape == p.shape
    assert torch.equal(with_loop, on_torch)
    u = reference_u32(list(range(offset, offset + p.numel())))
    assert torch.equal(with_loop.view(-1), u < (flat.double() * 2.0**32).round())
    assert with_loop.view(-1)[1] and not with_loop.view(-1)[0]


@pytest.mark.parametrize("bad", [float("nan"), -1e-7, 1.0000001])
def test_probabilities_out_of_range_raise_on_both_paths(
    bad: float, monkeypatch: pytest.MonkeyPatch
) -> None:
    p = torch.full((1000,), 0.5)
    p[777] = bad
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        keep_mask_with_probabilities(KEY, p)
    monkeypatch.setattr(rm, "_USE_EXTENSION", False)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        keep_mask_with_probabilities(KEY, p)


def test_half_precision_probabilities_and_views_take_the_torch_path() -> None:
    p = torch.rand(300, dtype=torch.float64)
    expected = keep_mask_with_probabilities(KEY, p)
    assert not fused.dare_hash_handles(torch.empty(300, dtype=torch.bool), p.half())
    assert not fused.dare_hash_handles(torch.empty(150, dtype=torch.bool), p[::2])
    assert torch.equal(
        keep_mask_with_probabilities(KEY, p.half()),
        keep_mask_with_probabilities(KEY, p.half().double()),
    )
    view = p.view(30, 10)[:, :5]  # not contiguous: reshaped to a copy first
    assert torch.equal(
        keep_mask_with_probabilities(KEY, view),
        keep_mask_with_probabilities(KEY, view.contiguous()),
    )
    assert torch.equal(keep_mask_with_probabilities(KEY, p[:150]), expected[:150])


def test_the_extension_checks_its_arguments() -> None:
    out = torch.empty(4, dtype=torch.uint8)
    ext = fused._fused
    assert ext is not None
    with pytest.raises(ValueError, match="dare"):
        ext.dare(out.data_ptr(), 0, KEY, 0, 4, TWO_32)  # threshold must be below 2^32
    with pytest.raises(ValueError, match="dare"):
        ext.dare(out.data_ptr(), 0, 1 << 63, 0, 4, 5)
    with pytest.raises(ValueError, match="dare"):
        ext.dare(out.data_ptr(), 0, KEY, (1 << 63) - 3, 4, 5)
    with pytest.raises(ValueError, match="dare"):
        ext.dare(out.data_ptr(), 2, KEY, 0, 4, 0, 0)  # probabilities without a pointer
    with pytest.raises(ValueError, match="dare"):
        ext.dare(out.data_ptr(), 7, KEY, 0, 4)


def _write_models(folder: Path) -> None:
    generator = torch.Generator().manual_seed(11)
    shapes = {"embed.weight": (300, 64), "mlp.weight": (96, 64), "norm.weight": (64,)}
    base = {name: torch.randn(shape, generator=generator) for name, shape in shapes.items()}
    for index in range(3):
        model = folder / f"m{index}"
        model.mkdir()
        tensors = {
            name: (t + 0.02 * index * torch.randn(t.shape, generator=generator)).bfloat16()
            for name, t in base.items()
        }
        save_file(tensors, model / "model.safetensors")
        (model / "config.json").write_text('{"model_type": "llama"}')


@pytest.mark.parametrize(
    ("method", "extra"),
    [
        ("dare_linear", {}),
        ("dare_ties", {}),
        ("della", {"epsilon": 0.05}),
        ("della_linear", {"epsilon": 0.05}),
    ],
)
@pytest.mark.parametrize("chunk_elements", [1 << 22, 1000])
def test_merges_write_the_same_bytes_with_and_without_the_loop(
    tmp_path: Path,
    method: str,
    extra: dict[str, float],
    chunk_elements: int,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    _write_models(tmp_path)
    document: dict[str, Any] = {
        "merge_method": method,
        "base_model": str(tmp_path / "m0"),
        "models": [
            {
                "model": str(tmp_path / f"m{i}"),
                "parameters": {"weight": 0.4 * i, "density": 0.3, **extra},
            }
            for i in (1, 2)
        ],
        "dtype": "bfloat16",
    }
    options = MergeOptions(chunk_elements=chunk_elements)
    # The kernels' masks, not the fused DARE loops (test_fused_dare.py checks those).
    monkeypatch.setattr(piece_merger, "dare_into", lambda *args: False)
    with_loop, on_torch = both_paths(
        lambda: _merged_bytes(document, tmp_path / "a", options), monkeypatch
    )
    assert with_loop == on_torch


def _merged_bytes(document: dict[str, Any], out: Path, options: MergeOptions) -> bytes:
    shutil.rmtree(out, ignore_errors=True)
    run_merge(parse_recipe(document), out, options)
    return (out / "model.safetensors").read_bytes()
