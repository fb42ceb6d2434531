"""ISO-C and ISO-CTS against a transcription of FusionBench's reference, by hand and end to end.

``reference_iso_c`` and ``reference_iso_cts`` below are FusionBench's
``fusion_bench/method/isotropic_merging/iso_utils.py`` functions, transcribed with the
device moves and logging left out.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file

from merge_kernels.methods.iso import common_space_size, iso_c_matrix, iso_cts_matrix
from merge_kernels.recipe import parse_recipe
from merge_kernels.registry import get_method
from merge_kernels.runner import run_merge
from merge_kernels.synthetic import LlamaShape, write_checkpoint

StateDict = dict[str, torch.Tensor]


def reference_iso_c(task_vectors: list[StateDict], exclude_keys: list[str]) -> StateDict:
    new_vector = {}
    for key in task_vectors[0]:
        tvs = [task_vector[key] for task_vector in task_vectors]
        num_tvs = len(tvs)
        new_vector[key] = sum(tvs) / num_tvs
        if len(task_vectors[0][key].shape) == 2 and key not in exclude_keys:
            new_vector[key] *= num_tvs
            u, s, v = torch.linalg.svd(new_vector[key], full_matrices=False)
            s_mean = torch.ones_like(s) * s.mean()
            new_vector[key] = torch.linalg.multi_dot((u, torch.diag(s_mean), v))
    return new_vector


def reference_iso_cts(
    task_vectors: list[StateDict], common_space_fraction: float, exclude_keys: list[str]
) -> StateDict:
    new_vector: StateDict = {}
    for key in task_vectors[0]:
        shape_ = task_vectors[0][key].shape
        if not ((len(shape_) == 2) and (key not in exclude_keys)):
            for i, task_vector in enumerate(task_vectors):
                vec = task_vector[key]
                if i == 0:
                    new_vector[key] = vec.clone()
                else:
                    new_vector[key] += (vec - new_vector[key]) / (i + 1)
            continue
        combined_w = sum([task_vector[key] for task_vector in task_vectors])
        common_space_index_s = int(min(shape_) * common_space_fraction)
        _task_specific_total_space_index_s = round(
            (min(shape_) - common_space_index_s) / len(task_vectors)
        ) * len(task_vectors)
        common_space_index_s = min(shape_) - _task_specific_total_space_index_s
        u, s, v = torch.linalg.svd(combined_w, full_matrices=False)
        common_space_u = u[:, :common_space_index_s]
        common_space_s = s[:common_space_index_s]
        common_space_v = v[:common_space_index_s, :]
        n_dims_per_task = int((min(shape_) - common_space_index_s) / len(task_vectors))
        for i, task_vector in enumerate(task_vectors):
            w = task_vector[key]
            w_ts = w - common_space_u @ common_space_u.T @ w
            u_ts, s_ts, v_ts = torch.linalg.svd(w_ts, full_matrices=False)
            if i == 0:
                combined_space_u = torch.zeros_like(u_ts)
                combined_space_s = torch.zeros_like(s_ts)
                combined_space_v = torch.zeros_like(v_ts)
            combined_space_u[:, i * n_dims_per_task : (i + 1) * n_dims_per_task] = u_ts[
                :, :n_dims_per_task
            ]
            combined_space_s[i * n_dims_per_task : (i + 1) * n_dims_per_task] = s_ts[
                :n_dims_per_task
            ]
            combined_space_v[i * n_dims_per_task : (i + 1) * n_dims_per_task, :] = v_ts[
                :n_dims_per_task, :
            ]
        end = len(task_vectors) * n_dims_per_task
        combined_space_u[:, end : end + common_space_index_s] = common_space_u
        combined_space_s[end : end + common_space_index_s] = common_space_s
        combined_space_v[end : end + common_space_index_s, :] = common_space_v
        u_u, _, v_u = torch.linalg.svd(combined_space_u, full_matrices=False)
        u_v, _, v_v = torch.linalg.svd(combined_space_v, full_matrices=False)
        combined_space_u = u_u @ v_u
        combined_space_v = u_v @ v_v
        combined_space_s = torch.ones_like(combined_space_s) * combined_space_s.mean()
        new_vector[key] = torch.linalg.multi_dot(
            (combined_space_u, torch.diag(combined_space_s), combined_space_v)
        )
    return new_vector


def reference_merge(
    base: StateDict,
    models: list[StateDict],
    method: str,
    scaling_factor: float = 1.0,
    common_space_fraction: float = 0.8,
    exclude_keys: tuple[str, ...] = (),
) -> StateDict:
    """The reference's run(): base + scaling_factor · merged task vector."""
    taus = [{key: model[key] - base[key] for key in base} for model in models]
    if method == "iso_c":
        merged = reference_iso_c(taus, list(exclude_keys))
    else:
        merged = reference_iso_cts(taus, common_space_fraction, list(exclude_keys))
    return {key: base[key] + merged[key] * scaling_factor for key in base}


def relative_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    difference = torch.linalg.vector_norm((got - expected).double())
    return float(difference) / max(float(torch.linalg.vector_norm(expected.double())), 1e-30)


def draw(shape: tuple[int, ...], count: int, seed: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=generator)
    return base, [base + 0.1 * torch.randn(shape, generator=generator) for _ in range(count)]


SHAPES = [(12, 7), (7, 12), (16, 16), (1, 5), (9,), (2, 3, 4)]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("count", [1, 2, 3, 5])
@pytest.mark.parametrize("scaling_factor", [1.0, 0.6])
def test_iso_c_matches_the_reference(
    shape: tuple[int, ...], count: int, scaling_factor: float
) -> None:
    base, models = draw(shape, count, seed=count)
    expected = reference_merge({"w": base}, [{"w": m} for m in models], "iso_c", scaling_factor)
    got = get_method("iso_c").merge_tensors(
        models, base=base, params={"scaling_factor": scaling_factor}
    )
    assert relative_error(got, expected["w"]) <= 1e-5


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("count", [1, 2, 3, 5])
@pytest.mark.parametrize("fraction", [0.8, 0.5, 0.25, 1.0])
def test_iso_cts_matches_the_reference(shape: tuple[int, ...], count: int, fraction: float) -> None:
    base, models = draw(shape, count, seed=10 + count)
    expected = reference_merge({"w": base}, [{"w": m} for m in models], "iso_cts", 1.3, fraction)
    got = get_method("iso_cts").merge_tensors(
        models, base=base, params={"scaling_factor": 1.3, "common_space_fraction": fraction}
    )
    assert relative_error(got, expected["w"]) <= 1e-5


@pytest.mark.parametrize("name", ["iso_c", "iso_cts"])
def test_spectral_false_is_the_mean_as_the_reference_excludes_keys(name: str) -> None:
    base, models = draw((6, 4), 3, seed=5)
    expected = reference_merge(
        {"w": base}, [{"w": m} for m in models], name, 0.5, exclude_keys=("w",)
    )
    got = get_method(name).merge_tensors(
        models, base=base, params={"scaling_factor": 0.5, "spectral": False}
    )
    assert relative_error(got, expected["w"]) <= 1e-6
    mean = base + 0.5 * sum(m - base for m in models) / 3
    assert torch.allclose(got, mean, atol=1e-6)


def test_iso_c_by_hand() -> None:
    # Σ τ = diag(2, 4): singular values 4, 2, their mean 3, so the merge is θ₀ + 3·I.
    base = torch.zeros(2, 2)
    models = [torch.tensor([[2.0, 0.0], [0.0, 0.0]]), torch.tensor([[0.0, 0.0], [0.0, 4.0]])]
    got = get_method("iso_c").merge_tensors(models, base=base)
    assert torch.allclose(got, 3 * torch.eye(2), atol=1e-6)
    # A vector takes the task vectors' mean: (2 + 4) / 2.
    vectors = [torch.tensor([2.0, 0.0]), torch.tensor([4.0, 2.0])]
    got = get_method("iso_c").merge_tensors(vectors, base=torch.zeros(2))
    assert torch.equal(got, torch.tensor([3.0, 1.0]))


def test_iso_cts_by_hand() -> None:
    # Rank 4, fraction 0.5: the common subspace is Σ τ's top two directions e1 (4) and e2
    # (3); each task adds its top direction off them: e3 (1) for the first, e4 (2) for the
    # second. The kept values 1, 2, 4, 3 have mean 2.5 and the bases are orthonormal.
    base = torch.zeros(4, 4)
    models = [torch.diag(torch.tensor([4.0, 0, 1, 0])), torch.diag(torch.tensor([0.0, 3, 0, 2]))]
    got = get_method("iso_cts").merge_tensors(
        models, base=base, params={"common_space_fraction": 0.5}
    )
    assert torch.allclose(got, 2.5 * torch.eye(4), atol=1e-6)


@pytest.mark.parametrize(
    ("rank", "count", "fraction", "common"),
    [
        (10, 3, 0.8, 7),  # int(8) common, remainder 2 rounds to 3 task directions
        (16, 2, 0.8, 12),  # int(12.8) = 12 common, remainder 4 divides evenly
        (4, 2, 0.5, 2),
        (1, 2, 0.8, 1),  # round(0.5) = 0: no task directions
        (5, 2, 0.0, 1),  # round(2.5) = 2 (half to even): 4 task directions
        (3, 2, 0.0, 1),  # round(1.5) = 2 would ask 4 > 3 directions: one multiple lower
        (6, 3, 1.0, 6),
    ],
)
def test_common_space_size(rank: int, count: int, fraction: float, common: int) -> None:
    assert common_space_size(rank, count, fraction) == common


matrix_seeds = st.integers(0, 2**31 - 1)
matrix_shapes = st.tuples(st.integers(1, 8), st.integers(1, 8))


def gaussian(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(seed).standard_normal(shape).astype(np.float32))


def orthogonal(size: int, seed: int) -> torch.Tensor:
    q, _ = torch.linalg.qr(gaussian((size, size), seed).double())
    return q.float()


@settings(max_examples=40, deadline=None)
@given(shape=matrix_shapes, seed=matrix_seeds)
def test_iso_c_of_one_task_has_the_flat_spectrum_of_its_mean(
    shape: tuple[int, int], seed: int
) -> None:
    tau = gaussian(shape, seed)
    merged = iso_c_matrix([tau])
    values = torch.linalg.svdvals(merged)
    expected = torch.linalg.svdvals(tau).mean()
    assert torch.allclose(values, expected.expand_as(values), rtol=1e-4, atol=1e-5)
    # The flat spectrum keeps the singular vectors: ⟨merged, τ⟩ = s̄ Σ sᵢ.
    assert math.isclose(
        float((merged * tau).sum()),
        float(expected * torch.linalg.svdvals(tau).sum()),
        rel_tol=1e-4,
    )


@settings(max_examples=40, deadline=None)
@given(shape=matrix_shapes, seed=matrix_seeds, count=st.integers(1, 4))
def test_iso_c_commutes_with_rotations(shape: tuple[int, int], seed: int, count: int) -> None:
    taus = [gaussian(shape, seed + i) for i in range(count)]
    left, right = orthogonal(shape[0], seed + 100), orthogonal(shape[1], seed + 200)
    rotated = iso_c_matrix([left @ tau @ right for tau in taus])
    assert torch.allclose(rotated, left @ iso_c_matrix(taus) @ right, atol=1e-4)


@settings(max_examples=40, deadline=None)
@given(
    shape=matrix_shapes,
    seed=matrix_seeds,
    count=st.integers(1, 4),
    fraction=st.floats(0.0, 1.0),
)
def test_iso_cts_has_a_flat_spectrum(
    shape: tuple[int, int], seed: int, count: int, fraction: float
) -> None:
    taus = [gaussian(shape, seed + i) for i in range(count)]
    merged = iso_cts_matrix(taus, fraction)
    values = torch.linalg.svdvals(merged)
    assert torch.allclose(values, values.mean().expand_as(values), rtol=1e-4, atol=1e-5)


@settings(max_examples=30, deadline=None)
@given(shape=matrix_shapes, seed=matrix_seeds, count=st.integers(1, 4))
def test_iso_cts_with_the_whole_rank_common_is_iso_c(
    shape: tuple[int, int], seed: int, count: int
) -> None:
    taus = [gaussian(shape, seed + i) for i in range(count)]
    assert torch.allclose(iso_cts_matrix(taus, 1.0), iso_c_matrix(taus), atol=1e-4)


SHAPE = LlamaShape(hidden_size=16, intermediate_size=24, num_hidden_layers=1, vocab_size=32)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("iso")
    write_checkpoint(root / "base", SHAPE, seed=0)
    for index in (1, 2, 3):
        write_checkpoint(root / f"ft{index}", SHAPE, seed=index, base_seed=0, delta_scale=0.3)
    return root


@pytest.mark.parametrize(
    ("method", "parameters", "reference"),
    [
        ("iso_c", {"scaling_factor": 0.8}, {"scaling_factor": 0.8}),
        (
            "iso_cts",
            {
                "scaling_factor": 1.2,
                "common_space_fraction": 0.5,
                "spectral": [{"filter": "embed_tokens", "value": False}, {"value": True}],
            },
            {
                "scaling_factor": 1.2,
                "common_space_fraction": 0.5,
                "exclude_keys": ("model.embed_tokens.weight",),
            },
        ),
    ],
)
def test_runner_merges_checkpoints_as_the_reference(
    checkpoints: Path,
    tmp_path: Path,
    method: str,
    parameters: dict[str, Any],
    reference: dict[str, Any],
) -> None:
    recipe = {
        "merge_method": method,
        "base_model": str(checkpoints / "base"),
        "models": [{"model": str(checkpoints / f"ft{i}")} for i in (1, 2, 3)],
        "parameters": parameters,
        "dtype": "float32",
    }
    run_merge(parse_recipe(recipe), tmp_path / "out")
    ours = load_file(tmp_path / "out" / "model.safetensors")
    base = load_file(checkpoints / "base" / "model.safetensors")
    models = [load_file(checkpoints / f"ft{i}" / "model.safetensors") for i in (1, 2, 3)]
    expected = reference_merge(base, models, method, **reference)
    assert ours.keys() == expected.keys()
    for name, tensor in expected.items():
        assert relative_error(ours[name], tensor) <= 1e-5, name


@pytest.mark.parametrize("name", ["iso_c", "iso_cts"])
def test_the_result_does_not_depend_on_the_thread_count(name: str) -> None:
    # LAPACK's SVD of a tall matrix rounds differently on 1 and 2 threads.
    base, models = draw((172, 64), 3, seed=7)
    previous = torch.get_num_threads()
    try:
        results = []
        for threads in (1, 2):
            torch.set_num_threads(threads)
            results.append(get_method(name).merge_tensors(models, base=base))
            assert torch.get_num_threads() == threads
    finally:
        torch.set_num_threads(previous)
    assert torch.equal(results[0], results[1])
