"""WUDI merging against a transcription of FusionBench's reference, by hand and end to end.

``reference_wudi`` below is FusionBench's ``fusion_bench/method/wudi/wudi.py::wudi_merging``,
transcribed with the device moves and progress bars left out, and with ``lr`` a parameter
(the reference fixes it at 1e-5).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file

from merge_kernels.methods.wudi import interference_loss, wudi_matrix
from merge_kernels.recipe import parse_recipe
from merge_kernels.registry import get_method
from merge_kernels.runner import run_merge
from merge_kernels.synthetic import LlamaShape, write_checkpoint

StateDict = dict[str, torch.Tensor]


def reference_wudi(
    task_vectors: list[StateDict], iter_num: int, exclude_keys: list[str], lr: float = 1e-5
) -> StateDict:
    new_vector = {}
    for key in task_vectors[0]:
        tvs = torch.stack([task_vector[key] for task_vector in task_vectors])
        num_tvs = len(tvs)
        new_vector[key] = torch.nn.Parameter(torch.sum(tvs, dim=0))
        if len(task_vectors[0][key].shape) == 2 and key not in exclude_keys:
            optimizer = torch.optim.Adam([new_vector[key]], lr=lr, weight_decay=0)
            l2_norms = torch.square(torch.norm(tvs.reshape(tvs.shape[0], -1), p=2, dim=-1))
            for _ in range(iter_num):
                disturbing_vectors = new_vector[key].unsqueeze(0) - tvs
                product = torch.matmul(disturbing_vectors, tvs.transpose(1, 2))
                loss = torch.sum(torch.square(product) / l2_norms.unsqueeze(-1).unsqueeze(-1))
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
        else:
            new_vector[key] = new_vector[key] / num_tvs
        new_vector[key] = new_vector[key].detach()
    return new_vector


def reference_merge(
    base: StateDict,
    models: list[StateDict],
    iter_num: int,
    lr: float = 1e-5,
    exclude_keys: tuple[str, ...] = (),
) -> StateDict:
    """The reference's run(): base + the merged task vector."""
    taus = [{key: model[key] - base[key] for key in base} for model in models]
    merged = reference_wudi(taus, iter_num, list(exclude_keys), lr)
    return {key: base[key] + merged[key] for key in base}


def relative_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    difference = torch.linalg.vector_norm((got - expected).double())
    return float(difference) / max(float(torch.linalg.vector_norm(expected.double())), 1e-30)


def draw(shape: tuple[int, ...], count: int, seed: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=generator)
    return base, [base + 0.1 * torch.randn(shape, generator=generator) for _ in range(count)]


SHAPES = [(12, 7), (7, 12), (16, 16), (1, 5), (9,), (2, 3, 4)]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("count", [1, 2, 4])
@pytest.mark.parametrize(("iter_num", "lr"), [(12, 1e-5), (25, 1e-2)])
def test_wudi_matches_the_reference(
    shape: tuple[int, ...], count: int, iter_num: int, lr: float
) -> None:
    base, models = draw(shape, count, seed=count)
    expected = reference_merge({"w": base}, [{"w": m} for m in models], iter_num, lr)
    got = get_method("wudi").merge_tensors(
        models, base=base, params={"iter_num": iter_num, "lr": lr}
    )
    assert relative_error(got, expected["w"]) <= 1e-5


def test_optimize_false_is_the_mean_as_the_reference_excludes_keys() -> None:
    base, models = draw((6, 4), 3, seed=5)
    expected = reference_merge({"w": base}, [{"w": m} for m in models], 5, exclude_keys=("w",))
    got = get_method("wudi").merge_tensors(
        models, base=base, params={"iter_num": 5, "optimize": False}
    )
    assert torch.equal(got, expected["w"])
    assert torch.allclose(got, base + sum(m - base for m in models) / 3, atol=1e-6)


def test_scaling_factor_scales_the_merged_task_vector() -> None:
    base, models = draw((5, 3), 2, seed=6)
    spec = get_method("wudi")
    plain = spec.merge_tensors(models, base=base, params={"iter_num": 3, "lr": 1e-3})
    scaled = spec.merge_tensors(
        models, base=base, params={"iter_num": 3, "lr": 1e-3, "scaling_factor": 0.5}
    )
    assert torch.allclose(scaled - base, 0.5 * (plain - base), atol=1e-6)


def test_no_steps_is_the_task_vectors_sum() -> None:
    base = torch.zeros(2, 2)
    models = [torch.tensor([[1.0, 0.0], [0.0, 0.0]]), torch.tensor([[0.0, 2.0], [0.0, 3.0]])]
    got = get_method("wudi").merge_tensors(models, base=base, params={"iter_num": 0})
    assert torch.equal(got, torch.tensor([[1.0, 2.0], [0.0, 3.0]]))


def test_one_adam_step_by_hand() -> None:
    # One task τ = diag(1, 2), ‖τ‖² = 5; from τ the loss and its gradient are 0, so Adam
    # leaves τ where it is. Two tasks e₁e₁ᵀ and e₂e₂ᵀ start from I: (I − τᵢ) τᵢᵀ = 0 too,
    # so the sum of orthogonal task vectors is already interference-free.
    tau = torch.diag(torch.tensor([1.0, 2.0]))
    assert torch.equal(wudi_matrix([tau], iter_num=3, lr=0.1), tau)
    units = [torch.diag(torch.tensor([1.0, 0.0])), torch.diag(torch.tensor([0.0, 1.0]))]
    assert torch.equal(wudi_matrix(units, iter_num=3, lr=0.1), torch.eye(2))
    # Overlapping tasks τ₁ = [[1, 1]], τ₂ = [[1, 0]] (1 × 2): from τ = [[2, 1]] the products
    # are (τ − τ₁)τ₁ᵀ = 1 and (τ − τ₂)τ₂ᵀ = 1, so L = 1/2 + 1/1 and ∇L = 2·1·τ₁/2 + 2·1·τ₂
    # = [[3, 1]]; Adam's first step moves every entry by −lr · sign(∇L).
    overlapping = [torch.tensor([[1.0, 1.0]]), torch.tensor([[1.0, 0.0]])]
    stacked = torch.stack(overlapping)
    norms = torch.tensor([2.0, 1.0])
    assert float(interference_loss(torch.tensor([[2.0, 1.0]]), stacked, norms)) == 1.5
    stepped = wudi_matrix(overlapping, iter_num=1, lr=0.01)
    assert torch.allclose(stepped, torch.tensor([[1.99, 0.99]]), atol=1e-7)


def test_a_zero_task_vector_is_left_out_of_the_loss() -> None:
    base, models = draw((6, 5), 2, seed=9)
    with_zero = get_method("wudi").merge_tensors(
        [*models, base.clone()], base=base, params={"iter_num": 10, "lr": 1e-3}
    )
    without = get_method("wudi").merge_tensors(
        models, base=base, params={"iter_num": 10, "lr": 1e-3}
    )
    assert torch.isfinite(with_zero).all()
    assert torch.allclose(with_zero, without, atol=1e-6)
    zero = get_method("wudi").merge_tensors([base, base], base=base)
    assert torch.equal(zero, base)


def gaussian(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(seed).standard_normal(shape).astype(np.float32))


@settings(max_examples=25, deadline=None)
@given(
    shape=st.tuples(st.integers(1, 6), st.integers(1, 6)),
    seed=st.integers(0, 2**31 - 1),
    count=st.integers(2, 4),
)
def test_the_interference_does_not_grow(shape: tuple[int, int], seed: int, count: int) -> None:
    taus = [gaussian(shape, seed + i) for i in range(count)]
    stacked = torch.stack(taus)
    norms = torch.square(torch.norm(stacked.reshape(count, -1), dim=-1))
    start = float(interference_loss(stacked.sum(0), stacked, norms))
    merged = wudi_matrix(taus, iter_num=30, lr=1e-2)
    assert float(interference_loss(merged, stacked, norms)) <= start * (1 + 1e-5) + 1e-6


@settings(max_examples=20, deadline=None)
@given(shape=st.tuples(st.integers(1, 6), st.integers(1, 6)), seed=st.integers(0, 2**31 - 1))
def test_the_order_of_the_tasks_does_not_matter(shape: tuple[int, int], seed: int) -> None:
    taus = [gaussian(shape, seed + i) for i in range(3)]
    forward = wudi_matrix(taus, iter_num=5, lr=1e-2)
    backward = wudi_matrix(taus[::-1], iter_num=5, lr=1e-2)
    assert torch.allclose(forward, backward, atol=1e-5)


def test_the_result_does_not_depend_on_the_thread_count() -> None:
    base, models = draw((96, 64), 3, seed=7)
    previous = torch.get_num_threads()
    try:
        results = []
        for threads in (1, 2):
            torch.set_num_threads(threads)
            results.append(get_method("wudi").merge_tensors(models, base=base))
            assert torch.get_num_threads() == threads
    finally:
        torch.set_num_threads(previous)
    assert torch.equal(results[0], results[1])


def test_it_runs_under_inference_mode() -> None:
    base, models = draw((4, 3), 2, seed=3)
    expected = get_method("wudi").merge_tensors(models, base=base, params={"iter_num": 4})
    with torch.inference_mode():
        got = get_method("wudi").merge_tensors(models, base=base, params={"iter_num": 4})
    assert torch.equal(got, expected)


SHAPE = LlamaShape(hidden_size=16, intermediate_size=24, num_hidden_layers=1, vocab_size=32)


def test_runner_merges_checkpoints_as_the_reference(tmp_path: Path) -> None:
    write_checkpoint(tmp_path / "base", SHAPE, seed=0)
    for index in (1, 2, 3):
        write_checkpoint(tmp_path / f"ft{index}", SHAPE, seed=index, base_seed=0, delta_scale=0.3)
    recipe = {
        "merge_method": "wudi",
        "base_model": str(tmp_path / "base"),
        "models": [{"model": str(tmp_path / f"ft{i}")} for i in (1, 2, 3)],
        "parameters": {
            "iter_num": 20,
            "lr": 1e-3,
            "optimize": [{"filter": "embed_tokens", "value": False}, {"value": True}],
        },
        "dtype": "float32",
    }
    run_merge(parse_recipe(recipe), tmp_path / "out")
    ours = load_file(tmp_path / "out" / "model.safetensors")
    base = load_file(tmp_path / "base" / "model.safetensors")
    models = [load_file(tmp_path / f"ft{i}" / "model.safetensors") for i in (1, 2, 3)]
    expected = reference_merge(
        base, models, 20, lr=1e-3, exclude_keys=("model.embed_tokens.weight",)
    )
    assert ours.keys() == expected.keys()
    for name, tensor in expected.items():
        assert relative_error(ours[name], tensor) <= 1e-5, name
