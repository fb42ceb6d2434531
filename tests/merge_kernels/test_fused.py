"""The fused CPU loops give the torch kernels' exact bits, and decline what they don't handle."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

import merge_kernels.piece_merger as piece_merger
from merge_kernels import fused
from merge_kernels.fused import WeightedSum, weighted_sum_into
from merge_kernels.recipe import parse_recipe
from merge_kernels.registry import get_method
from merge_kernels.runner import MergeOptions, run_merge

pytestmark = pytest.mark.skipif(
    not fused.available(), reason="the C extension was not built (no C compiler)"
)

DTYPES = [torch.bfloat16, torch.float32, torch.float16]


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view({2: torch.int16, 4: torch.int32}[t.element_size()])


def _torch_path(
    method: str,
    models: list[torch.Tensor],
    base: torch.Tensor | None,
    params: dict[str, Any],
    weights: list[float],
    out_dtype: torch.dtype,
) -> torch.Tensor:
    merged = get_method(method).merge_tensors(
        [m.float() for m in models],
        base=base.float() if base is not None else None,
        params=params,
        model_params=[{"weight": w} for w in weights],
    )
    return merged.to(out_dtype)


def _fused_path(
    method: str,
    models: list[torch.Tensor],
    base: torch.Tensor | None,
    params: dict[str, Any],
    weights: list[float],
    out_dtype: torch.dtype,
) -> torch.Tensor:
    spec = get_method(method)
    resolved = spec.params.model_validate(params)
    per_model = tuple(spec.model_params.model_validate({"weight": w}) for w in weights)
    assert spec.weighted_form is not None
    form = spec.weighted_form(resolved, per_model)
    out = torch.empty(models[0].shape, dtype=out_dtype)
    assert weighted_sum_into(out, models, form, base)
    return out


@pytest.mark.parametrize("in_dtype", DTYPES)
@pytest.mark.parametrize("out_dtype", DTYPES)
@pytest.mark.parametrize("count", [1, 2, 3, 5, 8])
def test_linear_matches_the_torch_kernel(
    in_dtype: torch.dtype, out_dtype: torch.dtype, count: int
) -> None:
    generator = torch.Generator().manual_seed(count)
    models = [torch.randn(4099, generator=generator).to(in_dtype) for _ in range(count)]
    weights = [float(w) for w in torch.rand(count, generator=generator) - 0.2]
    for normalize in (True, False):
        params = {"normalize": normalize}
        expected = _torch_path("linear", models, None, params, weights, out_dtype)
        got = _fused_path("linear", models, None, params, weights, out_dtype)
        assert torch.equal(_bits(got), _bits(expected))


@pytest.mark.parametrize("in_dtype", DTYPES)
@pytest.mark.parametrize("count", [1, 3, 7])
def test_task_arithmetic_matches_the_torch_kernel(in_dtype: torch.dtype, count: int) -> None:
    generator = torch.Generator().manual_seed(10 + count)
    base = torch.randn(33, 65, generator=generator).to(in_dtype)
    models = [
        (base.float() + 0.01 * torch.randn(33, 65, generator=generator)).to(in_dtype)
        for _ in range(count)
    ]
    weights = [0.3 + i for i in range(count)]
    for params in ({"lambda": 0.7}, {"lambda": 1.3, "normalize": True}, {}):
        for out_dtype in DTYPES:
            expected = _torch_path("task_arithmetic", models, base, params, weights, out_dtype)
            got = _fused_path("task_arithmetic", models, base, params, weights, out_dtype)
            assert torch.equal(_bits(got), _bits(expected)), (params, out_dtype)


finite_floats = st.floats(allow_nan=False, allow_infinity=True, width=32)


@settings(max_examples=80, deadline=None)
@given(
    values=st.lists(st.lists(finite_floats, min_size=3, max_size=3), min_size=1, max_size=40),
    weights=st.lists(st.floats(-4, 4, width=32), min_size=3, max_size=3),
    lam=st.floats(-2, 2, width=32),
)
def test_edge_values_round_as_torch_does(
    values: list[list[float]], weights: list[float], lam: float
) -> None:
    """Infinities, subnormals, overflow to inf and ties in the last bf16 bit."""
    columns = torch.tensor(values, dtype=torch.float32).T.contiguous()
    base, models = columns[0].bfloat16(), [columns[1].bfloat16(), columns[2].bfloat16()]
    for out_dtype in (torch.bfloat16, torch.float32):
        params = {"lambda": lam}
        expected = _torch_path("task_arithmetic", models, base, params, weights[:2], out_dtype)
        got = _fused_path("task_arithmetic", models, base, params, weights[:2], out_dtype)
        assert torch.equal(_bits(got), _bits(expected))
        if sum(weights[:2]) != 0:
            expected = _torch_path("linear", models, None, {}, weights[:2], out_dtype)
            got = _fused_path("linear", models, None, {}, weights[:2], out_dtype)
            assert torch.equal(_bits(got), _bits(expected))


def test_nan_becomes_torchs_nan() -> None:
    models = [torch.tensor([float("nan"), 1.0]).bfloat16(), torch.tensor([1.0, 2.0]).bfloat16()]
    expected = _torch_path("linear", models, None, {}, [1.0, 1.0], torch.bfloat16)
    got = _fused_path("linear", models, None, {}, [1.0, 1.0], torch.bfloat16)
    assert torch.equal(_bits(got), _bits(expected))


def test_what_the_loop_does_not_handle_is_left_to_torch() -> None:
    form = WeightedSum((1.0, 1.0))
    a, b = torch.ones(8, dtype=torch.bfloat16), torch.ones(8, dtype=torch.float32)
    out = torch.full((8,), 7.0)
    assert not weighted_sum_into(out, [a, b], form)  # mixed input dtypes
    assert not weighted_sum_into(out, [a, a[:4]], form)  # sizes differ
    strided = torch.ones(16, dtype=torch.bfloat16)[::2]
    assert not weighted_sum_into(out, [a, strided], form)  # not contiguous
    assert not weighted_sum_into(out, [a.to(torch.int32), a.to(torch.int32)], form)
    nine = [a] * 9
    assert not weighted_sum_into(out, nine, WeightedSum((1.0,) * 9))  # more than 8 models
    assert torch.equal(out, torch.full((8,), 7.0))
    with pytest.raises(ValueError, match="2 weights for 3 models"):
        weighted_sum_into(out, [a, a, a], form)


def _write_model(folder: Path, seed: int, dtype: torch.dtype) -> None:
    generator = torch.Generator().manual_seed(seed)
    folder.mkdir()
    tensors = {
        "embed.weight": torch.randn(37, 16, generator=generator).to(dtype),
        "layer.weight": torch.randn(16, 16, generator=generator).to(dtype),
        "norm.weight": torch.randn(16, generator=generator).to(dtype),
    }
    save_file(tensors, folder / "model.safetensors")
    (folder / "config.json").write_text('{"model_type": "llama"}')


@pytest.mark.parametrize("method", ["linear", "task_arithmetic"])
def test_a_merge_writes_the_same_bytes_with_and_without_the_loop(
    tmp_path: Path, method: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    for seed in range(3):
        _write_model(tmp_path / f"m{seed}", seed, torch.bfloat16)
    document: dict[str, Any] = {
        "merge_method": method,
        "models": [
            {"model": str(tmp_path / f"m{seed}"), "parameters": {"weight": 0.2 + seed}}
            for seed in (1, 2)
        ],
        "dtype": "bfloat16",
    }
    if method == "task_arithmetic":
        document["base_model"] = str(tmp_path / "m0")
        document["parameters"] = {"lambda": 0.8}
    calls: list[bool] = []

    def counted(*args: Any) -> bool:
        calls.append(weighted_sum_into(*args))
        return calls[-1]

    monkeypatch.setattr(piece_merger, "weighted_sum_into", counted)
    # Row chunks of 4 rows: the output buffers are reused from piece to piece.
    options = MergeOptions(chunk_elements=64)
    run_merge(parse_recipe(document), tmp_path / "fused", options)
    assert calls and all(calls)
    monkeypatch.setattr(piece_merger, "weighted_sum_into", lambda *args: False)
    run_merge(parse_recipe(document), tmp_path / "torch", options)
    fused_out = load_file(tmp_path / "fused" / "model.safetensors")
    torch_out = load_file(tmp_path / "torch" / "model.safetensors")
    assert fused_out.keys() == torch_out.keys()
    for name, tensor in torch_out.items():
        assert torch.equal(_bits(fused_out[name]), _bits(tensor)), name
    assert (tmp_path / "fused" / "model.safetensors").read_bytes() == (
        tmp_path / "torch" / "model.safetensors"
    ).read_bytes()
