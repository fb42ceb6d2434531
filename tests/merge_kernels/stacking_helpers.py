"""Shared pieces of the layer-stacking tests: tiny checkpoints, both engines, comparison."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from merge_kernels.recipe import parse_recipe
from merge_kernels.runner import MergeOptions, run_merge


def load_output(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a merged folder (all its safetensors files)."""
    tensors: dict[str, torch.Tensor] = {}
    for path in sorted(folder.glob("*.safetensors")):
        tensors.update(load_file(path))
    return tensors


def config_of(folder: Path) -> dict[str, Any]:
    return dict(json.loads((folder / "config.json").read_text()))


def tureen_merge(document: dict[str, Any], out: Path) -> dict[str, torch.Tensor]:
    run_merge(parse_recipe(document), out, MergeOptions())
    return load_output(out)


def mergekit_merge(document: dict[str, Any], out: Path) -> dict[str, torch.Tensor]:
    """The same config merged by mergekit itself (installed for the tests only), on CPU."""
    from mergekit.config import MergeConfiguration
    from mergekit.merge import MergeOptions as MergekitOptions
    from mergekit.merge import run_merge as mergekit_run

    config = MergeConfiguration.model_validate(document)
    mergekit_run(config, str(out), MergekitOptions(copy_tokenizer=False, lazy_unpickle=False))
    return load_output(out)


def assert_same_tensors(ours: dict[str, torch.Tensor], theirs: dict[str, torch.Tensor]) -> None:
    """Same names, shapes, and values within 1e-6 relative L2."""
    assert sorted(ours) == sorted(theirs)
    for name, expected in theirs.items():
        got = ours[name]
        assert got.shape == expected.shape, name
        error = torch.linalg.vector_norm(got.double() - expected.double())
        scale = torch.linalg.vector_norm(expected.double()).clamp_min(1e-30)
        assert error / scale <= 1e-6, f"{name}: relative L2 error {float(error / scale):.3g}"
