"""``reference: mergekit`` against mergekit 0.1.5 itself, on tiny checkpoints.

mergekit is the oracle here (installed for the tests only): the same config is merged by
``mergekit.merge.run_merge`` and by tureen, and the outputs are compared tensor by tensor.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from merge_kernels.methods.compute_dtype import compute_dtype, computes_in_dtype
from merge_kernels.methods.steps import magnitude_trim
from merge_kernels.parameter_settings import layer_position
from merge_kernels.recipe import parse_recipe
from merge_kernels.runner import MergeOptions, run_merge
from merge_kernels.synthetic import LlamaShape, write_checkpoint

mergekit_config = pytest.importorskip("mergekit.config")
mergekit_merge = pytest.importorskip("mergekit.merge")
mergekit_options = pytest.importorskip("mergekit.options")
mergekit_sparsify = pytest.importorskip("mergekit.sparsify")

SHAPE = LlamaShape(
    vocab_size=32,
    hidden_size=16,
    intermediate_size=24,
    num_hidden_layers=3,
    num_attention_heads=2,
    num_key_value_heads=1,
)
Tensors = dict[str, torch.Tensor]


@pytest.fixture(autouse=True)
def _quiet_mergekit() -> Iterator[None]:
    logging.disable(logging.WARNING)
    yield
    logging.disable(logging.NOTSET)


def _write_models(root: Path, dtype: torch.dtype) -> Path:
    write_checkpoint(root / "base", SHAPE, seed=0, dtype=dtype)
    for index in (1, 2):
        write_checkpoint(
            root / f"ft{index}", SHAPE, seed=index, base_seed=0, dtype=dtype, delta_scale=0.05
        )
    return root


@pytest.fixture(scope="module")
def bf16_models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _write_models(tmp_path_factory.mktemp("bf16"), torch.bfloat16)


@pytest.fixture(scope="module")
def f32_models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _write_models(tmp_path_factory.mktemp("f32"), torch.float32)


def _config(method: str, root: Path, dtype: str, **parameters: Any) -> dict[str, Any]:
    weights = {"ft1": 0.3, "ft2": 0.7}
    models = [
        {"model": str(root / name), "parameters": {"weight": weight, **parameters}}
        for name, weight in weights.items()
    ]
    config: dict[str, Any] = {"merge_method": method, "base_model": str(root / "base")}
    config["dtype"] = dtype
    if method == "slerp":  # a gradient: the rule for tensors outside the blocks matters
        config["models"] = [{"model": str(root / "ft1")}]
        config["parameters"] = {"t": [0.1, 0.5, 0.9]}
    elif method == "linear":
        config["models"] = models
        del config["base_model"]
    else:
        config["models"] = models
        config["parameters"] = {"lambda": 0.8}
    return config


def _mergekit(config: dict[str, Any], out: Path, seed: int = 0) -> Tensors:
    torch.manual_seed(seed)  # DARE's masks come from torch's global generator
    mergekit_merge.run_merge(
        mergekit_config.MergeConfiguration.model_validate(config),
        str(out),
        options=mergekit_options.MergeOptions(copy_tokenizer=False),
    )
    return load_file(out / "model.safetensors")


def _tureen(config: dict[str, Any], out: Path, **options: Any) -> Tensors:
    run_merge(parse_recipe({**config, "reference": "mergekit"}), out, MergeOptions(**options))
    return load_file(out / "model.safetensors")


def _relative_l2(expected: torch.Tensor, got: torch.Tensor) -> float:
    expected, got = expected.double(), got.double()
    return float((got - expected).norm() / expected.norm())


def test_gradients_outside_the_blocks_follow_the_reference() -> None:
    layers = 3
    for name in ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"):
        assert layer_position(name, layers, "mergekit") == 0.0
    assert layer_position("model.embed_tokens.weight", layers) == 0.0
    assert layer_position("model.norm.weight", layers) == 1.0
    assert layer_position("lm_head.weight", layers) == 1.0
    for reference in ("peft", "mergekit", "paper"):
        assert layer_position("model.layers.1.mlp.up_proj.weight", layers, reference) == 0.5
        assert layer_position("model.layers.2.mlp.up_proj.weight", layers, reference) == 1.0
        assert layer_position("model.layers.0.mlp.up_proj.weight", 1, reference) == 1.0


def test_compute_dtype_follows_the_reference_unless_set() -> None:
    def recipe(**keys: Any) -> Any:
        return parse_recipe(
            {"merge_method": "linear", "models": [{"model": "a"}, {"model": "b"}], **keys}
        )

    bf16 = [torch.zeros(2, dtype=torch.bfloat16)] * 2
    mixed = [torch.zeros(2, dtype=torch.bfloat16), torch.zeros(2, dtype=torch.float16)]
    assert not computes_in_dtype(recipe(dtype="bf16"))
    assert compute_dtype(recipe(dtype="bf16"), bf16) == torch.float32
    assert compute_dtype(recipe(reference="mergekit", dtype="fp16"), bf16) == torch.float16
    assert compute_dtype(recipe(reference="mergekit"), bf16) == torch.bfloat16
    assert compute_dtype(recipe(reference="mergekit"), mixed) == torch.float32  # promoted
    fp8 = [torch.zeros(2, dtype=torch.float8_e4m3fn)] * 2
    assert compute_dtype(recipe(reference="mergekit"), fp8) == torch.float32
    assert not computes_in_dtype(recipe(reference="mergekit", compute_dtype="float32"))
    assert compute_dtype(recipe(compute_dtype="dtype", dtype="bfloat16"), bf16) == torch.bfloat16


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
@pytest.mark.parametrize(
    ("method", "parameters"),
    [
        ("linear", {}),
        ("task_arithmetic", {}),
        ("slerp", {}),
        # density 1 keeps every entry, so DARE's random masks play no part and the sign
        # election, disjoint mean and scaling are compared bit for bit
        ("dare_ties", {"density": 1.0}),
    ],
)
def test_deterministic_methods_are_bit_identical_to_mergekit(
    bf16_models: Path, tmp_path: Path, method: str, parameters: dict[str, Any], dtype: str
) -> None:
    config = _config(method, bf16_models, dtype, **parameters)
    expected = _mergekit(config, tmp_path / "mergekit")
    got = _tureen(config, tmp_path / "tureen")
    assert expected.keys() == got.keys()
    for name, tensor in expected.items():
        assert got[name].dtype == tensor.dtype, name
        assert torch.equal(got[name], tensor), (name, _relative_l2(tensor, got[name]))


def test_row_chunks_and_a_trim_prepass_give_mergekit_s_numbers(
    bf16_models: Path, f32_models: Path, tmp_path: Path
) -> None:
    """Chunked pieces and thresholds streamed before the merge compute in the dtype too
    (and the whole-tensor TIES is compared with mergekit below)."""
    small = {"chunk_elements": 128, "whole_trim_elements": 400}
    config = _config("task_arithmetic", bf16_models, "bfloat16")
    expected = _mergekit(config, tmp_path / "mk_ta")
    got = _tureen(config, tmp_path / "ta", **small)
    assert all(torch.equal(got[name], tensor) for name, tensor in expected.items())
    # float32 inputs converted to bfloat16: the streamed thresholds must rank the bfloat16
    # task vectors, as the whole-tensor trim does
    config = _config("ties", f32_models, "bfloat16", density=0.4)
    got = _tureen(config, tmp_path / "ties", **small)
    whole = _tureen(config, tmp_path / "ties_whole")
    assert all(torch.equal(got[name], tensor) for name, tensor in whole.items())


def _task_vectors(root: Path, name: str, dtype: torch.dtype) -> list[torch.Tensor]:
    base = load_file(root / "base" / "model.safetensors")[name].to(dtype)
    return [load_file(root / f"ft{i}" / "model.safetensors")[name].to(dtype) - base for i in (1, 2)]


def _tied_at_threshold(tau: torch.Tensor, density: float) -> torch.Tensor:
    """The entries whose magnitude equals the k-th largest, when the trim must choose
    among more of them than it keeps (else nothing)."""
    magnitudes = tau.float().abs().reshape(-1)
    k = max(1, int(density * magnitudes.numel()))
    threshold = magnitudes.sort(descending=True).values[k - 1]
    tied = magnitudes == threshold
    above = int((magnitudes > threshold).sum())
    if above + int(tied.sum()) == k:
        tied = torch.zeros_like(tied)
    return tied.reshape(tau.shape)


def test_ties_matches_mergekit_on_float32_inputs_without_ties(
    f32_models: Path, tmp_path: Path
) -> None:
    density = 0.4
    config = _config("ties", f32_models, "float32", density=density)
    for name in load_file(f32_models / "base" / "model.safetensors"):
        for tau in _task_vectors(f32_models, name, torch.float32):
            assert not _tied_at_threshold(tau, density).any(), name
    expected = _mergekit(config, tmp_path / "mergekit")
    got = _tureen(config, tmp_path / "tureen")
    for name, tensor in expected.items():
        assert _relative_l2(tensor, got[name]) <= 1e-6, name


def test_ties_with_ties_at_the_threshold_differs_from_mergekit_only_there(
    bf16_models: Path, tmp_path: Path
) -> None:
    """bf16 task vectors tie at the k-th magnitude; mergekit's unstable argsort keeps some of
    the tied entries, tureen's exact_k the first in flat order: the same number of them."""
    density = 0.4
    config = _config("ties", bf16_models, "bfloat16", density=density)
    expected = _mergekit(config, tmp_path / "mergekit")
    got = _tureen(config, tmp_path / "tureen")
    tied_entries = 0
    for name, tensor in expected.items():
        taus = _task_vectors(bf16_models, name, torch.bfloat16)
        tied = torch.zeros(tensor.shape, dtype=torch.bool)
        for tau in taus:
            ours = magnitude_trim(tau.float(), density)
            theirs = mergekit_sparsify.magnitude(tau, density).float()
            assert int((ours != 0).sum()) == int((theirs != 0).sum()), name
            choice = _tied_at_threshold(tau, density)
            assert torch.equal(ours[~choice], theirs[~choice]), name
            tied |= choice
        tied_entries += int(tied.sum())
        assert torch.equal(got[name][~tied], tensor[~tied]), name
    assert tied_entries > 100  # the comparison above really met ties


@pytest.mark.parametrize("method", ["dare_linear", "dare_ties"])
def test_dare_differs_from_mergekit_as_mergekit_differs_between_seeds(
    bf16_models: Path, tmp_path: Path, method: str
) -> None:
    """DARE's masks are random: tureen's are its own, mergekit's come from torch's
    generator. Statistically the merges agree: tureen is as far from mergekit as mergekit
    with another seed is, and the L1 rescale gives task vectors of the same size."""
    config = _config(method, bf16_models, "bfloat16", density=0.5)
    expected = _mergekit(config, tmp_path / "mergekit")
    other_seed = _mergekit(config, tmp_path / "mergekit_seed1", seed=1)
    got = _tureen(config, tmp_path / "tureen")
    base = load_file(bf16_models / "base" / "model.safetensors")
    ours, theirs = [], []
    for name, tensor in expected.items():
        if tensor.numel() < 256:
            continue  # too few entries for the statistics
        reference = tensor.float() - base[name].float()
        ours.append(_relative_l2(reference, got[name].float() - base[name].float()))
        theirs.append(_relative_l2(reference, other_seed[name].float() - base[name].float()))
        l1 = (got[name].float() - base[name].float()).abs().sum() / reference.abs().sum()
        assert 0.85 < float(l1) < 1.15, name
    median_ours = sorted(ours)[len(ours) // 2]
    median_theirs = sorted(theirs)[len(theirs) // 2]
    assert 0.8 < median_ours / median_theirs < 1.25
