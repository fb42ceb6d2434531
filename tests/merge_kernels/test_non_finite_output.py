"""A merge whose result holds NaN or infinities fails naming the tensor, unless allowed.

Finite parameters can still overflow (a weight of 1e300, λ = 1e308, a DARE density of
1e-300, an output dtype too narrow), and an input may already hold NaN; each is caught as
the piece is produced, on the fused loops and on the torch path, in whole tensors and in
row chunks, and nothing is published.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from merge_kernels.errors import NonFiniteOutputError
from merge_kernels.finite_check import is_finite
from merge_kernels.recipe import parse_recipe
from merge_kernels.runner import MergeOptions, run_merge
from merge_kernels.synthetic import LlamaShape, write_checkpoint

SHAPE = LlamaShape(hidden_size=32, intermediate_size=64, num_hidden_layers=2, vocab_size=96)
POISONED = "model.layers.1.mlp.up_proj.weight"


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A base, two fine-tunes, and ``nan_ft``: a fine-tune with one NaN in one tensor."""
    root = tmp_path_factory.mktemp("models")
    write_checkpoint(root / "base", SHAPE, seed=0)
    for index in (1, 2):
        write_checkpoint(root / f"ft{index}", SHAPE, seed=index, base_seed=0, delta_scale=0.05)
    write_checkpoint(root / "nan_ft", SHAPE, seed=3, base_seed=0, delta_scale=0.05)
    path = root / "nan_ft" / "model.safetensors"
    tensors = load_file(path)
    tensors[POISONED][3, 5] = float("nan")
    save_file(tensors, path, metadata={"format": "pt"})
    return root


def _recipe(
    root: Path,
    method: str,
    model_params: dict[str, Any],
    params: dict[str, Any] | None = None,
    models: tuple[str, ...] = ("ft1", "ft2"),
    **extra: Any,
) -> dict[str, Any]:
    return {
        "merge_method": method,
        "base_model": str(root / "base"),
        "models": [{"model": str(root / m), "parameters": model_params} for m in models],
        "parameters": params or {},
        **extra,
    }


OVERFLOWS = {
    "task_arithmetic_weight": ("task_arithmetic", {"weight": 1e300}, {}, {}),
    "linear_weight": ("linear", {"weight": 1e300}, {"normalize": False}, {}),
    "ties_lambda": ("ties", {"weight": 1.0, "density": 0.5}, {"lambda": 1e308}, {}),
    "dare_linear_density": ("dare_linear", {"weight": 1.0, "density": 1e-300}, {}, {}),
    "dare_ties_density": ("dare_ties", {"weight": 1.0, "density": 1e-300}, {}, {}),
    "float16_range": ("task_arithmetic", {"weight": 1e9}, {}, {"out_dtype": "float16"}),
}


@pytest.mark.parametrize("chunk_elements", [4 * 1024 * 1024, 256])
@pytest.mark.parametrize("case", OVERFLOWS)
def test_overflowing_parameters_fail_naming_the_tensor(
    models: Path, tmp_path: Path, case: str, chunk_elements: int
) -> None:
    method, model_params, params, extra = OVERFLOWS[case]
    recipe = parse_recipe(_recipe(models, method, model_params, params, **extra))
    out = tmp_path / "merged"
    with pytest.raises(NonFiniteOutputError) as caught:
        run_merge(recipe, out, MergeOptions(chunk_elements=chunk_elements))
    error = caught.value
    assert error.code == "non_finite_output"
    assert error.details["tensor"] == "model.embed_tokens.weight"
    assert "'model.embed_tokens.weight'" in error.message
    assert error.details["inputs_with_non_finite"] == []
    assert "overflow" in error.message and "allow_non_finite" in error.message
    assert not out.exists()


@pytest.mark.parametrize(
    ("method", "model_params"),
    [
        ("linear", {"weight": 1.0}),  # fused weighted sum
        ("ties", {"weight": 1.0, "density": 0.5}),  # fused TIES
        ("dare_ties", {"weight": 1.0, "density": 0.5}),  # torch path
    ],
)
def test_an_input_holding_nan_is_named(
    models: Path, tmp_path: Path, method: str, model_params: dict[str, Any]
) -> None:
    recipe = parse_recipe(_recipe(models, method, model_params, models=("ft1", "nan_ft")))
    out = tmp_path / "merged"
    with pytest.raises(NonFiniteOutputError) as caught:
        run_merge(recipe, out)
    assert caught.value.details["tensor"] == POISONED
    assert caught.value.details["inputs_with_non_finite"] == [str(models / "nan_ft")]
    assert "already holds NaN" in caught.value.message
    assert not out.exists()


def test_allow_non_finite_writes_the_merge(models: Path, tmp_path: Path) -> None:
    document = _recipe(models, "task_arithmetic", {"weight": 1e300}, allow_non_finite=True)
    result = run_merge(parse_recipe(document), tmp_path / "merged")
    merged = load_file(result.out_dir / "model.safetensors")
    assert not bool(torch.isfinite(merged["model.embed_tokens.weight"]).any())


def test_a_finite_merge_is_unchanged_by_the_check(models: Path, tmp_path: Path) -> None:
    document = _recipe(models, "task_arithmetic", {"weight": 0.5})
    result = run_merge(parse_recipe(document), tmp_path / "merged")
    merged = load_file(result.out_dir / "model.safetensors")
    assert all(bool(torch.isfinite(t).all()) for t in merged.values())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_is_finite_sees_one_bad_value(dtype: torch.dtype, bad: float) -> None:
    piece = torch.randn(1000).to(dtype)
    assert is_finite(piece)
    piece[777] = bad
    assert not is_finite(piece)


def test_integer_and_empty_pieces_are_finite() -> None:
    assert is_finite(torch.arange(10))
    assert is_finite(torch.empty(0))


def test_nan_under_a_model_wide_trim_is_an_input_error(models: Path, tmp_path: Path) -> None:
    document = _recipe(
        models,
        "ties",
        {"weight": 1.0, "density": 0.5},
        {"trim_scope": "model"},
        models=("ft1", "nan_ft"),
    )
    out = tmp_path / "merged"
    with pytest.raises(NonFiniteOutputError) as caught:
        run_merge(parse_recipe(document), out)
    assert "holds NaN" in caught.value.message
    assert not out.exists()
