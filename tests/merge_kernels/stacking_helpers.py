"""Shared pieces of the layer-stacking tests: tiny checkpoints, both engines, comparison."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from pydantic import Field
from safetensors.torch import load_file

from merge_kernels import registry
from merge_kernels.methods.kernel import MergeInputs, MethodParams, ModelParams, TensorContext
from merge_kernels.recipe import parse_recipe
from merge_kernels.registry import MethodSpec
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


class _Scale(ModelParams):
    scale: float | None = Field(None, description="Multiplies the source's tensors.")


def _passthrough(inputs: MergeInputs, params: MethodParams, ctx: TensorContext) -> torch.Tensor:
    (model,) = inputs.models
    (own,) = inputs.model_params
    scale = getattr(own, "scale", None)
    return model.clone() if scale is None else model * scale


@contextmanager
def passthrough_method() -> Iterator[str]:
    """The name ``passthrough``: the registered method, or a minimal stand-in for the test."""
    try:
        registry.get_method("passthrough")
    except Exception:
        spec = MethodSpec(
            name="passthrough",
            title="Passthrough (test stand-in)",
            paper="mergekit's passthrough",
            params=MethodParams,
            model_params=_Scale,
            kernel=_passthrough,
            needs_base=False,
            description="Copies its one source.",
            max_models=1,
            chunkable=lambda params: True,
        )
        registry._REGISTRY["passthrough"] = spec
        try:
            yield "passthrough"
        finally:
            registry._REGISTRY.pop("passthrough", None)
        return
    yield "passthrough"
