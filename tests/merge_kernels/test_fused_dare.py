"""DARE in the fused CPU loops gives the torch kernels' exact bits, and declines what it
doesn't handle."""

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
from merge_kernels.fused_dare import DareForm, dare_into
from merge_kernels.methods import random_mask
from merge_kernels.methods.kernel import MergeInputs, TensorContext
from merge_kernels.recipe import parse_recipe
from merge_kernels.registry import get_method
from merge_kernels.runner import MergeOptions, run_merge

pytestmark = pytest.mark.skipif(
    not fused.available(), reason="the C extension was not built (no C compiler)"
)

DTYPES = [torch.bfloat16, torch.float32, torch.float16]
DENSITIES = [0.1, 0.5, 1.0, 2.0**-34, 3e-10, 0.999, 0.3]  # 2^-34 keeps nothing; 1.0 all
WEIGHTS = [0.7, 1.3, -0.4, 2.0, 0.25]
LINEAR_OPTIONS: list[dict[str, Any]] = [
    {},
    {"normalize": True, "lambda": 0.6},
    {"rescale": False},
]
TIES_OPTIONS: list[dict[str, Any]] = [
    {},
    {"weighted_election": True, "divisor": "weight_sum"},
    {"majority_sign_method": "frequency", "lambda": 1.4},
    {"normalize": False, "lambda": 0.5},
    {"rescale": False, "weighted_election": True},
]


@pytest.fixture(params=["whole", "split"])
def parts(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Run each loop in one call, or split between five threads (as on a 5-core machine)."""
    if request.param == "split":
        monkeypatch.setattr(fused, "_SPLIT_FROM", 1000)
        monkeypatch.setattr(fused.os, "cpu_count", lambda: 5)
    return str(request.param)


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view({2: torch.int16, 4: torch.int32}[t.element_size()])


def _inputs(
    seed: int, shape: tuple[int, ...], count: int, dtype: torch.dtype
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=generator)
    models = [
        (base + 0.01 * torch.randn(shape, generator=generator)).to(dtype) for _ in range(count)
    ]
    return base.to(dtype), models


def _resolved(
    method: str, params: dict[str, Any], weights: list[float], densities: list[float]
) -> tuple[Any, tuple[Any, ...]]:
    spec = get_method(method)
    per_model = tuple(
        spec.model_params.model_validate({"weight": w, "density": d})
        for w, d in zip(weights, densities, strict=True)
    )
    return spec.params.model_validate(params), per_model


def _torch_path(
    method: str,
    base: torch.Tensor,
    models: list[torch.Tensor],
    resolved: tuple[Any, tuple[Any, ...]],
    ctx: TensorContext,
) -> torch.Tensor:
    """The kernel, its masks drawn on the torch int32 lanes rather than the C mask loop: the
    fused loops are checked against an independent implementation of the hash."""
    params, per_model = resolved
    inputs = MergeInputs(
        base=base.float(), models=[m.float() for m in models], model_params=per_model
    )
    saved = random_mask._USE_EXTENSION
    random_mask._USE_EXTENSION = False
    try:
        return get_method(method).kernel(inputs, params, ctx).to(base.dtype)
    finally:
        random_mask._USE_EXTENSION = saved


def _form(method: str, resolved: tuple[Any, tuple[Any, ...]]) -> DareForm:
    spec = get_method(method)
    assert spec.dare_form is not None
    form = spec.dare_form(*resolved)
    assert form is not None
    return form


def _fused_path(
    method: str,
    base: torch.Tensor,
    models: list[torch.Tensor],
    resolved: tuple[Any, tuple[Any, ...]],
    ctx: TensorContext,
) -> torch.Tensor:
    out = torch.empty_like(base)
    assert dare_into(out, base, models, _form(method, resolved), ctx)
    return out


def _check(
    method: str,
    params: dict[str, Any],
    dtype: torch.dtype,
    count: int,
    *,
    shape: tuple[int, ...] = (61, 53),
    offset: int = 0,
    seed: int = 0,
) -> None:
    base, models = _inputs(seed, shape, count, dtype)
    resolved = _resolved(method, params, WEIGHTS[:count], DENSITIES[:count])
    ctx = TensorContext(
        name="model.layers.0.mlp.up_proj.weight",
        seed=seed,
        model_indices=tuple(range(3, 3 + 2 * count, 2)),
        offset=offset,
    )
    expected = _torch_path(method, base, models, resolved, ctx)
    merged = _fused_path(method, base, models, resolved, ctx)
    assert torch.equal(_bits(merged), _bits(expected))


@pytest.mark.parametrize("params", LINEAR_OPTIONS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("count", [1, 2, 3, 5])
@pytest.mark.usefixtures("parts")
def test_dare_linear_matches_the_torch_kernel(
    params: dict[str, Any], dtype: torch.dtype, count: int
) -> None:
    _check("dare_linear", params, dtype, count)


@pytest.mark.parametrize("params", TIES_OPTIONS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("count", [1, 2, 3, 5])
@pytest.mark.usefixtures("parts")
def test_dare_ties_matches_the_torch_kernel(
    params: dict[str, Any], dtype: torch.dtype, count: int
) -> None:
    _check("dare_ties", params, dtype, count)


@pytest.mark.parametrize("method", ["dare_linear", "dare_ties"])
@pytest.mark.parametrize(
    "offset",
    [
        12_345,
        (1 << 32) - 1000,  # the pieces cross 2^32, where the key's high word changes
        (3 << 32) - 1,
        (1 << 63) - 61 * 53,  # the last entries the hash takes
    ],
)
@pytest.mark.usefixtures("parts")
def test_offsets_and_the_high_index_word_match_the_torch_kernel(method: str, offset: int) -> None:
    _check(method, {}, torch.bfloat16, 3, offset=offset)


@pytest.mark.parametrize("method", ["dare_linear", "dare_ties"])
def test_row_chunks_give_the_whole_tensors_bits(method: str) -> None:
    base, models = _inputs(4, (40, 37), 3, torch.bfloat16)
    resolved = _resolved(method, {}, WEIGHTS[:3], [0.2, 0.6, 0.9])
    whole = _fused_path(method, base, models, resolved, TensorContext(name="w", seed=1))
    chunks = []
    for start in range(0, 40, 7):
        ctx = TensorContext(name="w", seed=1, offset=start * 37)
        rows = slice(start, min(40, start + 7))
        chunks.append(_fused_path(method, base[rows], [m[rows] for m in models], resolved, ctx))
    assert torch.equal(_bits(torch.cat(chunks)), _bits(whole))


def test_the_drop_is_keyed_by_seed_model_and_name() -> None:
    base, models = _inputs(5, (64, 64), 2, torch.float32)
    resolved = _resolved("dare_linear", {}, [1.0, 1.0], [0.5, 0.5])
    merged = {
        (seed, indices, name): _fused_path(
            "dare_linear",
            base,
            models,
            resolved,
            TensorContext(name=name, seed=seed, model_indices=indices),
        )
        for seed, indices, name in [
            (0, (0, 1), "a"),
            (1, (0, 1), "a"),
            (0, (1, 0), "a"),
            (0, (0, 1), "b"),
        ]
    }
    outputs = list(merged.values())
    for index, first in enumerate(outputs):
        for second in outputs[index + 1 :]:
            assert not torch.equal(first, second)


def test_nan_merges_as_torch_merges_it() -> None:
    """No trim ranks magnitudes, so a NaN is merged (and the runner's check reports it)."""
    base, models = _inputs(6, (50, 20), 3, torch.float32)
    models[1][3, 4] = float("nan")
    models[2][7, 1] = float("inf")
    for method in ("dare_linear", "dare_ties"):
        resolved = _resolved(method, {}, WEIGHTS[:3], [1.0, 1.0, 0.5])
        ctx = TensorContext(name="w", seed=2)
        expected = _torch_path(method, base, models, resolved, ctx)
        merged = _fused_path(method, base, models, resolved, ctx)
        assert torch.equal(torch.isnan(merged), torch.isnan(expected))
        assert torch.isnan(merged[3, 4])
        finite = torch.isfinite(expected)
        assert torch.equal(merged[finite], expected[finite])


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    shape=st.lists(st.integers(1, 40), min_size=1, max_size=3).map(tuple),
    count=st.integers(1, 5),
    densities=st.lists(st.floats(1e-3, 1.0), min_size=5, max_size=5),
    weights=st.lists(st.floats(-2.0, 2.0), min_size=5, max_size=5),
    offset=st.sampled_from([0, 977, (1 << 32) - 500, 5 << 32]),
    dtype=st.sampled_from(DTYPES),
    linear=st.booleans(),
    option=st.integers(0, 4),
)
def test_random_shapes_and_parameters_match_the_torch_kernel(
    seed: int,
    shape: tuple[int, ...],
    count: int,
    densities: list[float],
    weights: list[float],
    offset: int,
    dtype: torch.dtype,
    linear: bool,
    option: int,
) -> None:
    method = "dare_linear" if linear else "dare_ties"
    params = LINEAR_OPTIONS[option % len(LINEAR_OPTIONS)] if linear else TIES_OPTIONS[option]
    if linear and params.get("normalize") and sum(weights[:count]) == 0:
        return
    base, models = _inputs(seed, shape, count, dtype)
    resolved = _resolved(method, params, weights[:count], densities[:count])
    ctx = TensorContext(name=f"t{seed}", seed=seed, offset=offset)
    expected = _torch_path(method, base, models, resolved, ctx)
    merged = _fused_path(method, base, models, resolved, ctx)
    assert torch.equal(_bits(merged), _bits(expected))


def test_what_the_loops_do_not_handle_is_left_to_torch() -> None:
    linear, ties = get_method("dare_linear"), get_method("dare_ties")
    assert linear.dare_form is not None and ties.dare_form is not None
    models = (linear.model_params.model_validate({"density": 0.5}),)
    # The L1 rescale needs whole-tensor norms; the majority zero sign the tensor's signs.
    assert linear.dare_form(linear.params.model_validate({"rescale_method": "l1"}), models) is None
    assert ties.dare_form(ties.params.model_validate({"rescale_method": "l1"}), models) is None
    assert ties.dare_form(ties.params.model_validate({"zero_sign": "majority"}), models) is None
    assert (
        linear.dare_form(
            linear.params.model_validate({"rescale": False, "rescale_method": "l1"}), models
        )
        is not None
    )
    base, tuned = _inputs(7, (30, 30), 1, torch.bfloat16)
    ctx = TensorContext(name="w", seed=0)
    for method in ("dare_linear", "dare_ties"):
        form = _form(method, _resolved(method, {}, [1.0], [0.5]))
        out = torch.full((30, 30), 7.0)
        assert not dare_into(out, base.float(), tuned, form, ctx)  # dtypes differ
        assert not dare_into(out.t(), base.float(), [tuned[0].float()], form, ctx)  # strided
        assert torch.equal(out, torch.full((30, 30), 7.0))
        with pytest.raises(ValueError, match="densities"):
            dare_into(out, base.float(), [tuned[0].float()] * 2, form, ctx)
    # bf16 inputs to a float16 output: built for the weighted loop, not the TIES loop.
    half = torch.empty(30, 30, dtype=torch.float16)
    assert dare_into(
        half, base, tuned, _form("dare_linear", _resolved("dare_linear", {}, [1.0], [0.5])), ctx
    )
    assert not dare_into(
        half, base, tuned, _form("dare_ties", _resolved("dare_ties", {}, [1.0], [0.5])), ctx
    )


def test_the_extension_checks_the_drop_arguments() -> None:
    ext = fused.extension()
    assert ext is not None
    x = torch.ones(8)
    out = torch.empty(8)
    p = x.data_ptr()
    common = (out.data_ptr(), 0, [p], 0, [1.0], False, 1.0)
    with pytest.raises(ValueError, match="base"):
        ext.weighted(*common, 0, 1.0, 8, [5], [1 << 31], [0.5], 0)
    with pytest.raises(ValueError, match="2\\^63"):
        ext.weighted(*common, p, 1.0, 8, [5], [1 << 31], [0.5], (1 << 63) - 4)
    with pytest.raises(ValueError, match="negative"):
        ext.weighted(*common, p, 1.0, 8, [-5], [1 << 31], [0.5], 0)
    with pytest.raises(ValueError, match="expected 1 values"):
        ext.weighted(*common, p, 1.0, 8, [5, 6], [1 << 31], [0.5], 0)
    with pytest.raises(TypeError, match="together"):
        ext.ties(out.data_ptr(), 0, [p], p, 0, [1.0], [0], [0], False, False, 0, 1.0, 8, [5])


def _write_models(folder: Path) -> None:
    generator = torch.Generator().manual_seed(11)
    shapes = {"embed.weight": (300, 64), "mlp.weight": (96, 64), "norm.weight": (64,)}
    base = {name: torch.randn(shape, generator=generator) for name, shape in shapes.items()}
    for index in range(4):
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
        ("dare_linear", {"normalize": True}),
        ("dare_ties", {}),
        ("dare_ties", {"weighted_election": True, "divisor": "weight_sum", "rescale": False}),
    ],
)
@pytest.mark.parametrize("chunk_elements", [1 << 22, 1000])
def test_a_merge_writes_the_same_bytes_with_and_without_the_loops(
    tmp_path: Path,
    method: str,
    extra: dict[str, Any],
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
                "parameters": {"weight": 0.4 * i, "density": 0.1 * i + 0.2},
            }
            for i in (1, 2, 3)
        ],
        "parameters": extra,
        "dtype": "bfloat16",
        "seed": 5,
    }
    calls: list[bool] = []

    def counted(*args: Any) -> bool:
        calls.append(dare_into(*args))
        return calls[-1]

    options = MergeOptions(chunk_elements=chunk_elements)
    monkeypatch.setattr(piece_merger, "dare_into", counted)
    run_merge(parse_recipe(document), tmp_path / "fused", options)
    assert calls and all(calls)
    if chunk_elements == 1000:  # embed and mlp in row chunks, norm whole
        assert len(calls) > 3
    monkeypatch.setattr(piece_merger, "dare_into", lambda *args: False)
    run_merge(parse_recipe(document), tmp_path / "torch", options)
    assert (tmp_path / "fused" / "model.safetensors").read_bytes() == (
        tmp_path / "torch" / "model.safetensors"
    ).read_bytes()


def test_an_extension_built_without_the_dare_loops_is_left_to_torch(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """An extension built from an earlier source takes no DARE arguments: decline, don't call."""
    base, models = _inputs(8, (20, 20), 2, torch.bfloat16)
    resolved = _resolved("dare_ties", {}, [1.0, 1.0], [0.5, 0.5])
    form = _form("dare_ties", resolved)
    monkeypatch.delattr(fused.extension(), "DARE_LOOPS")
    out = torch.empty_like(base)
    assert not dare_into(out, base, models, form, TensorContext(name="w", seed=0))
