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
from merge_kernels.fused import (
    ConsensusForm,
    WeightedSum,
    ties_into,
    trim_threshold,
    weighted_sum_into,
)
from merge_kernels.methods.kernel import TrimState
from merge_kernels.methods.magnitude_select import magnitude_threshold_with_ties
from merge_kernels.recipe import parse_recipe
from merge_kernels.registry import get_method
from merge_kernels.runner import MergeOptions, run_merge

pytestmark = pytest.mark.skipif(
    not fused.available(), reason="the C extension was not built (no C compiler)"
)

DTYPES = [torch.bfloat16, torch.float32, torch.float16]


@pytest.fixture(params=["whole", "split"])
def parts(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Run each loop in one call, or split between five threads (as on a 5-core machine)."""
    if request.param == "split":
        monkeypatch.setattr(fused, "_SPLIT_FROM", 1000)
        monkeypatch.setattr(fused.os, "cpu_count", lambda: 5)
    return str(request.param)


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
@pytest.mark.usefixtures("parts")
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
@pytest.mark.usefixtures("parts")
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


# --- TIES ----------------------------------------------------------------------------------


def _task_pair(seed: int, n: int, dtype: torch.dtype, step: float) -> tuple[torch.Tensor, ...]:
    """A base and a fine-tune; ``step`` > 0 rounds the change to multiples of it (ties)."""
    generator = torch.Generator().manual_seed(seed)
    base = torch.randn(n, generator=generator)
    change = 0.01 * torch.randn(n, generator=generator)
    if step:
        change = torch.round(change / step) * step
    return base.to(dtype), (base + change).to(dtype)


@settings(max_examples=25, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    n=st.integers(65_537, 300_000),
    density=st.sampled_from([0.01, 0.1, 0.2, 0.5, 0.9]),
    step=st.sampled_from([0.0, 0.001, 0.004]),
    dtype=st.sampled_from([torch.bfloat16, torch.float32, torch.float16]),
)
def test_trim_threshold_is_the_exact_selection(
    seed: int, n: int, density: float, step: float, dtype: torch.dtype
) -> None:
    base, model = _task_pair(seed, n, dtype, step)
    k = int(density * n)
    found = trim_threshold(model, base, k)
    tau = model.float() - base.float()
    expected = magnitude_threshold_with_ties(tau, k)
    # None hands the selection to the torch path; an answer must be the exact one.
    if found is not None:
        assert (found.threshold, found.count_at_value) == expected
        assert found.cutoff == _last_kept_tie(tau, *expected)


def _last_kept_tie(tau: torch.Tensor, threshold: Any, count: int) -> int:
    """The flat index of the last tied entry exact_k keeps (numel when it keeps them all)."""
    if threshold.keep_at_value == count:
        return tau.numel()
    tied = torch.nonzero(tau.abs().view(-1) == threshold.value).view(-1)
    return int(tied[threshold.keep_at_value - 1])


def test_trim_threshold_answers_typical_task_vectors() -> None:
    """The sampled bracket is not a fallback in disguise: it answers the usual case."""
    for seed, dtype in enumerate([torch.bfloat16, torch.float32]):
        base, model = _task_pair(seed, 500_000, dtype, 0.0)
        for density in (0.1, 0.2, 0.5):
            k = int(density * 500_000)
            found = trim_threshold(model, base, k)
            expected = magnitude_threshold_with_ties(model.float() - base.float(), k)
            assert found is not None
            assert (found.threshold, found.count_at_value) == expected


def test_trim_threshold_declines_what_torch_does_better() -> None:
    base, model = _task_pair(0, 1000, torch.bfloat16, 0.0)
    assert trim_threshold(model, base, 200) is None  # small
    base, model = _task_pair(0, 100_000, torch.bfloat16, 0.0)
    assert trim_threshold(model, base, 0) is None
    assert trim_threshold(model, base, 100_000) is None
    assert trim_threshold(model, base.float(), 20_000) is None  # dtypes differ
    poisoned = model.clone()
    poisoned[5000] = float("nan")
    assert trim_threshold(poisoned, base, 20_000) is None


TIES_OPTIONS: list[dict[str, Any]] = [
    {},
    {"weighted_election": True, "divisor": "weight_sum"},
    {"majority_sign_method": "frequency"},
    {"trim_ties": "threshold"},
    {"normalize": False, "lambda": 0.5},
]


def _form(params: dict[str, Any]) -> ConsensusForm:
    spec = get_method("ties")
    assert spec.consensus_form is not None
    form = spec.consensus_form(spec.params.model_validate(params))
    assert form is not None
    return form


@pytest.mark.parametrize("params", TIES_OPTIONS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.usefixtures("parts")
def test_ties_matches_the_torch_kernel(params: dict[str, Any], dtype: torch.dtype) -> None:
    n, weights, densities = 100_003, [0.5, 1.0, 1.5], [0.2, 0.1, 0.3]
    base, first = _task_pair(1, n, dtype, 0.002)  # many ties at the thresholds
    models = [first] + [_task_pair(seed, n, dtype, 0.002)[1] for seed in (2, 3)]
    models[1] = (base.float() + (models[1].float() - models[1].float().mean()) * 0.1).to(dtype)
    trims = []
    for model, density in zip(models, densities, strict=True):
        tau = model.float() - base.float()
        trims.append(TrimState(magnitude_threshold_with_ties(tau, int(density * n))[0], 0))
    expected = (
        get_method("ties")
        .merge_tensors(
            [m.float() for m in models],
            base=base.float(),
            params=params,
            model_params=[
                {"weight": w, "density": d} for w, d in zip(weights, densities, strict=True)
            ],
        )
        .to(dtype)
    )
    out = torch.empty(n, dtype=dtype)
    seen = ties_into(out, base, models, _form(params), weights, trims)
    assert torch.equal(_bits(out), _bits(expected))
    tau_bits = [(m.float() - base.float()).abs() for m in models]
    assert seen == [
        int((t == s.threshold.value).sum()) for t, s in zip(tau_bits, trims, strict=True)
    ]
    # In pieces, each starting from the ties the previous one met, the bits are the same.
    pieces = torch.empty(n, dtype=dtype)
    before = [0, 0, 0]
    for start in range(0, n, 7919):
        stop = min(n, start + 7919)
        states = [TrimState(s.threshold, b) for s, b in zip(trims, before, strict=True)]
        after = ties_into(
            pieces[start:stop],
            base[start:stop],
            [m[start:stop] for m in models],
            _form(params),
            weights,
            states,
        )
        assert after is not None
        before = after
    assert torch.equal(_bits(pieces), _bits(expected))


@pytest.mark.parametrize("params", [{}, {"trim_ties": "threshold"}])
def test_ties_reports_nan_instead_of_merging_it(params: dict[str, Any]) -> None:
    """Whether or not the loop counts ties first (it stops once the tie budget is spent,
    and never does under the threshold rule), a NaN is reported."""
    base, model = _task_pair(0, 1000, torch.bfloat16, 0.0)
    model[900] = float("nan")
    trim = TrimState(magnitude_threshold_with_ties(torch.ones(4), 2)[0], 0)
    out = torch.empty(1000, dtype=torch.bfloat16)
    assert ties_into(out, base, [model], _form(params), [1.0], [trim]) is None


@pytest.mark.parametrize(
    ("chunk_elements", "whole_trim_elements"), [(1 << 22, 1 << 26), (2048, 4096)]
)
@pytest.mark.usefixtures("parts")
def test_a_ties_merge_writes_the_same_bytes_with_and_without_the_loops(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    chunk_elements: int,
    whole_trim_elements: int,
) -> None:
    """Whole tensors (thresholds found by the fused pass) and row chunks (thresholds from
    the streaming pre-pass, ties carried from chunk to chunk)."""
    generator = torch.Generator().manual_seed(7)
    shapes = {"embed.weight": (520, 256), "mlp.weight": (300, 256), "norm.weight": (256,)}
    base = {name: torch.randn(shape, generator=generator) for name, shape in shapes.items()}
    for index in range(4):
        folder = tmp_path / f"m{index}"
        folder.mkdir()
        tensors = {
            name: (
                t + torch.round(0.01 * torch.randn(t.shape, generator=generator) / 0.002) * 0.002
                if index
                else t
            ).bfloat16()
            for name, t in base.items()
        }
        save_file(tensors, folder / "model.safetensors")
        (folder / "config.json").write_text('{"model_type": "llama"}')
    document: dict[str, Any] = {
        "merge_method": "ties",
        "base_model": str(tmp_path / "m0"),
        "models": [
            {"model": str(tmp_path / f"m{i}"), "parameters": {"weight": 0.5 * i, "density": 0.2}}
            for i in (1, 2, 3)
        ],
        "dtype": "bfloat16",
    }
    options = MergeOptions(chunk_elements=chunk_elements, whole_trim_elements=whole_trim_elements)
    results: list[Any] = []
    thresholds: list[Any] = []

    def counted_ties(*args: Any) -> Any:
        results.append(ties_into(*args))
        return results[-1]

    def counted_threshold(*args: Any) -> Any:
        thresholds.append(trim_threshold(*args))
        return thresholds[-1]

    monkeypatch.setattr(piece_merger, "ties_into", counted_ties)
    monkeypatch.setattr(fused, "trim_threshold", counted_threshold)
    run_merge(parse_recipe(document), tmp_path / "fused", options)
    assert results and all(r is not None for r in results)
    if whole_trim_elements > 1 << 20:  # embed and mlp of 3 models; norm is too small
        assert sum(t is not None for t in thresholds) == 6
    monkeypatch.setattr(piece_merger, "ties_into", lambda *args: None)
    monkeypatch.setattr(fused, "trim_threshold", lambda *args: None)
    run_merge(parse_recipe(document), tmp_path / "torch", options)
    assert (tmp_path / "fused" / "model.safetensors").read_bytes() == (
        tmp_path / "torch" / "model.safetensors"
    ).read_bytes()


def test_ties_declines_dtype_pairs_its_loop_was_not_built_for() -> None:
    """bf16 inputs to a float16 output: the TIES loop is not built for it (the torch path
    merges it); asking must not raise."""
    base, model = _task_pair(0, 1000, torch.bfloat16, 0.0)
    out = torch.empty(1000, dtype=torch.float16)
    trim = TrimState(magnitude_threshold_with_ties(torch.ones(4), 2)[0], 0)
    assert not fused.handles("ties", out, [model], [base, model])
    assert ties_into(out, base, [model], _form({}), [1.0], [trim]) is None
