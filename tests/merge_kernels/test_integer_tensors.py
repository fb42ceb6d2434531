"""Integer and boolean tensors in a float merge: copied unchanged, or refused, never cast."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from merge_kernels.errors import IncompatibleCheckpointsError
from merge_kernels.recipe import parse_recipe
from merge_kernels.runner import run_merge
from merge_kernels.synthetic import LlamaShape, write_checkpoint

SHAPE = LlamaShape(hidden_size=32, intermediate_size=64, num_hidden_layers=2, vocab_size=96)
BUFFER = "model.position_ids"
MLP = "model.layers.0.mlp.up_proj.weight"


def _edit(folder: Path, changes: dict[str, torch.Tensor]) -> None:
    path = folder / "model.safetensors"
    tensors = load_file(path)
    tensors.update(changes)
    save_file(tensors, path, metadata={"format": "pt"})


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """base, ft1, ft2 with an int64 buffer; ``int_mlp``: ft whose MLP weight is int8;
    ``float_buffer``: ft whose buffer is float32."""
    root = tmp_path_factory.mktemp("models")
    positions = torch.arange(16, dtype=torch.int64).unsqueeze(0)
    write_checkpoint(root / "base", SHAPE, seed=0)
    _edit(root / "base", {BUFFER: positions})
    for name, seed in (("ft1", 1), ("ft2", 2), ("int_mlp", 3), ("float_buffer", 4)):
        write_checkpoint(root / name, SHAPE, seed=seed, base_seed=0, delta_scale=0.05)
        _edit(root / name, {BUFFER: positions})
    mlp = load_file(root / "int_mlp" / "model.safetensors")[MLP]
    _edit(root / "int_mlp", {MLP: (mlp * 100).to(torch.int8)})
    _edit(root / "float_buffer", {BUFFER: positions.float()})
    return root


def _recipe(root: Path, *models: str) -> dict[str, object]:
    return {
        "merge_method": "task_arithmetic",
        "base_model": str(root / "base"),
        "models": [{"model": str(root / m), "parameters": {"weight": 0.5}} for m in models],
    }


def test_an_integer_buffer_every_input_holds_is_copied_unchanged(
    models: Path, tmp_path: Path
) -> None:
    result = run_merge(parse_recipe(_recipe(models, "ft1", "ft2")), tmp_path / "merged")
    merged = load_file(result.out_dir / "model.safetensors")
    assert merged[BUFFER].dtype == torch.int64
    assert torch.equal(merged[BUFFER], torch.arange(16, dtype=torch.int64).unsqueeze(0))


@pytest.mark.parametrize(
    ("other", "tensor", "dtypes"),
    [("int_mlp", MLP, ("F32", "I8")), ("float_buffer", BUFFER, ("I64", "F32"))],
)
def test_a_tensor_float_in_one_input_and_integer_in_another_is_refused(
    models: Path, tmp_path: Path, other: str, tensor: str, dtypes: tuple[str, str]
) -> None:
    out = tmp_path / "merged"
    with pytest.raises(IncompatibleCheckpointsError) as caught:
        run_merge(parse_recipe(_recipe(models, "ft1", other)), out)
    (problem,) = [p for p in caught.value.problems if tensor in p]
    assert f"{models / 'base'} {dtypes[0]}" in problem
    assert f"{models / other} {dtypes[1]}" in problem
    assert "never cast" in problem
    assert not out.exists()
