"""TSV-M against a transcription of FusionBench's reference, by hand, invariants, end to end."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file

from merge_kernels.errors import RecipeError
from merge_kernels.methods.kernel import MergeInputs, TensorContext
from merge_kernels.methods.tsv import components_per_task
from merge_kernels.recipe import parse_recipe
from merge_kernels.registry import get_method
from merge_kernels.runner import MergeOptions, run_merge
from merge_kernels.synthetic import LlamaShape, write_checkpoint
from merge_kernels.tensor_parameters import resolve_parameters

TSV = get_method("tsv_merge")


def reference_tsvm(
    task_vectors: list[dict[str, torch.Tensor]], exclude_keys: list[str]
) -> dict[str, torch.Tensor]:
    """``compute_and_sum_svd_mem_reduction`` of fusion_bench (TSVM_utils.py), transcribed
    without its prints, device moves and ``return_single_task_models`` branch."""
    num_tasks = len(task_vectors)
    sv_reduction = 1 / num_tasks
    new_vector: dict[str, torch.Tensor] = {}
    for key in task_vectors[0]:
        for i, task_vector in enumerate(task_vectors):
            vec = task_vector[key]
            if len(task_vector[key].shape) == 2 and key not in exclude_keys:
                u, s, vh = torch.linalg.svd(vec, full_matrices=False)
                if i == 0:
                    sum_u = torch.zeros_like(u)
                    sum_s = torch.zeros_like(s)
                    sum_vh = torch.zeros_like(vh)
                reduced_index_s = int(s.shape[0] * sv_reduction)
                sum_u[:, i * reduced_index_s : (i + 1) * reduced_index_s] = u[:, :reduced_index_s]
                sum_s[i * reduced_index_s : (i + 1) * reduced_index_s] = s[:reduced_index_s]
                sum_vh[i * reduced_index_s : (i + 1) * reduced_index_s, :] = vh[:reduced_index_s, :]
            else:
                if i == 0:
                    new_vector[key] = vec.clone()
                else:
                    new_vector[key] += (vec - new_vector[key]) / (i + 1)
        if len(task_vector[key].shape) == 2 and key not in exclude_keys:
            u_u, _, vh_u = torch.linalg.svd(sum_u, full_matrices=False)
            u_vh, _, vh_vh = torch.linalg.svd(sum_vh, full_matrices=False)
            new_vector[key] = torch.linalg.multi_dot((u_u, vh_u, torch.diag(sum_s), u_vh, vh_vh))
    return new_vector


def reference_run(
    base: dict[str, torch.Tensor],
    models: list[dict[str, torch.Tensor]],
    alpha: float | list[float],
    exclude_keys: list[str],
) -> dict[str, torch.Tensor]:
    """``TaskSingularVectorMerging.run``: task vectors, list-alpha scaling, merge, float alpha."""
    task_vectors = [{k: m[k] - base[k] for k in base} for m in models]
    if isinstance(alpha, list):
        task_vectors = [
            {k: v * a for k, v in tv.items()} for tv, a in zip(task_vectors, alpha, strict=True)
        ]
    merged = reference_tsvm(task_vectors, exclude_keys)
    if isinstance(alpha, float):
        merged = {k: v * alpha for k, v in merged.items()}
    return {k: merged[k] + base[k] for k in base}


SHAPES = {
    "tall.weight": (12, 5),
    "wide.weight": (4, 9),
    "square.weight": (7, 7),
    "row.weight": (1, 6),
    "bias": (6,),
    "conv.weight": (3, 2, 2),
    "head.weight": (5, 8),
}


def random_state(generator: torch.Generator, base: dict[str, torch.Tensor] | None):
    return {
        name: (base[name] if base else 0) + torch.randn(shape, generator=generator)
        for name, shape in SHAPES.items()
    }


@pytest.mark.parametrize("count", [1, 2, 3, 4])
@pytest.mark.parametrize("alpha", [1.0, 0.4, [0.5, 1.5, -0.7, 2.0]])
def test_parity_with_the_reference(count: int, alpha: float | list[float]) -> None:
    generator = torch.Generator().manual_seed(count)
    base = random_state(generator, None)
    models = [random_state(generator, base) for _ in range(count)]
    scales = alpha[:count] if isinstance(alpha, list) else alpha
    expected = reference_run(base, models, scales, exclude_keys=["head.weight"])
    for name in SHAPES:
        params: dict[str, Any] = {"exclude_from_svd": name == "head.weight"}
        if not isinstance(scales, list):
            params["alpha"] = scales
        ours = TSV.merge_tensors(
            [m[name] for m in models],
            base=base[name],
            params=params,
            model_params=[{"weight": w} for w in scales] if isinstance(scales, list) else None,
            context=TensorContext(name=name),
        )
        torch.testing.assert_close(ours, expected[name], rtol=1e-5, atol=1e-6)


def test_orthogonal_tasks_of_rank_r_over_t_add_up_as_task_arithmetic() -> None:
    # τ₁ and τ₂ have rank 2 = 4/2 each on orthogonal row and column spaces: nothing is
    # truncated and the stacked singular vectors are already orthonormal.
    base = torch.arange(16, dtype=torch.float32).reshape(4, 4) / 10
    tau_1 = torch.zeros(4, 4)
    tau_1[0, 0], tau_1[1, 1] = 3.0, 2.0
    tau_2 = torch.zeros(4, 4)
    tau_2[2, 3], tau_2[3, 2] = 4.0, -1.0
    out = TSV.merge_tensors([base + tau_1, base + tau_2], base=base)
    torch.testing.assert_close(out, base + tau_1 + tau_2, rtol=0, atol=1e-6)
    arithmetic = get_method("task_arithmetic").merge_tensors(
        [base + tau_1, base + tau_2], base=base
    )
    torch.testing.assert_close(out, arithmetic, rtol=0, atol=1e-6)


def test_each_task_keeps_its_top_r_over_t_components() -> None:
    # r = 3, T = 2: d = 1, so τ₁'s second singular value (1) is dropped.
    base = torch.zeros(3, 3)
    out = TSV.merge_tensors(
        [torch.diag(torch.tensor([3.0, 1.0, 0.0])), torch.diag(torch.tensor([0.0, 0.0, 2.0]))],
        base=base,
        params={"alpha": 0.5},
    )
    torch.testing.assert_close(out, torch.diag(torch.tensor([1.5, 0.0, 1.0])), rtol=0, atol=1e-6)


def test_fewer_singular_values_than_tasks_keeps_the_base() -> None:
    # A 1 × n matrix has one singular value; int(1 · 1/2) = 0 components per task.
    base = torch.ones(1, 5)
    out = TSV.merge_tensors([base + 1, base - 3], base=base)
    assert torch.equal(out, base)
    assert components_per_task(49, 49) == 0  # 49 · (1/49) < 1 in floating point, as the reference


def test_other_tensors_take_the_scaled_mean() -> None:
    base = torch.tensor([1.0, 2.0, 3.0])
    models = [base + torch.tensor([1.0, 0.0, -2.0]), base + torch.tensor([3.0, 4.0, 0.0])]
    out = TSV.merge_tensors(models, base=base, params={"alpha": 2.0})
    assert torch.equal(out, base + torch.tensor([4.0, 4.0, -2.0]))


def test_the_thread_count_changes_no_bit() -> None:
    # LAPACK's SVD on a matrix this size differs in its low bits between 1 and 2 threads.
    base, *models = gaussian_tasks(5, (160, 96), 4)
    previous = torch.get_num_threads()
    try:
        outputs = []
        for threads in (1, 2):
            torch.set_num_threads(threads)
            outputs.append(TSV.merge_tensors(models, base=base))
            assert torch.get_num_threads() == threads  # restored after the merge
    finally:
        torch.set_num_threads(previous)
    assert torch.equal(outputs[0], outputs[1])


def test_a_base_is_required() -> None:
    with pytest.raises(RecipeError):
        parse_recipe({"merge_method": "tsv_merge", "models": [{"model": "a"}, {"model": "b"}]})


def gaussian_tasks(seed: int, shape: tuple[int, int], count: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=generator) for _ in range(count)]


matrix_shapes = st.tuples(st.integers(2, 8), st.integers(2, 8))


def merge64(
    taus: list[torch.Tensor], base: torch.Tensor, params: dict[str, Any] | None = None
) -> torch.Tensor:
    """TSV-M's kernel on float64 tensors: the invariants hold to rounding there, where a
    float32 SVD of a small random matrix may move an entry by 1e-3 of its size."""
    inputs = MergeInputs(
        base=base,
        models=taus,
        model_params=[TSV.model_params.model_validate({}) for _ in taus],
    )
    return TSV.kernel(inputs, TSV.params.model_validate(params or {}), TensorContext(name="w"))


@settings(max_examples=30, deadline=None)
@given(
    seed=st.integers(0, 2**31),
    shape=matrix_shapes,
    count=st.integers(1, 4),
    data=st.data(),
)
def test_invariants_on_tasks_in_general_position(
    seed: int, shape: tuple[int, int], count: int, data: st.DataObject
) -> None:
    taus = [t.double() for t in gaussian_tasks(seed, shape, count)]
    zero = torch.zeros(shape, dtype=torch.float64)
    merged = merge64(taus, base=zero)
    # Order of the tasks does not matter.
    order = data.draw(st.permutations(range(count)))
    torch.testing.assert_close(
        merge64([taus[i] for i in order], base=zero), merged, rtol=1e-7, atol=1e-9
    )
    # Positive homogeneity, and alpha scales the merged task vector.
    scale = data.draw(st.floats(0.25, 4.0))
    torch.testing.assert_close(
        merge64([t * scale for t in taus], base=zero),
        merged * scale,
        rtol=1e-7,
        atol=1e-9,
    )
    torch.testing.assert_close(
        merge64(taus, base=zero, params={"alpha": scale}),
        merged * scale,
        rtol=1e-7,
        atol=1e-9,
    )
    # Rotating every task's output space rotates the merge.
    rotation, _ = torch.linalg.qr(
        torch.randn(
            shape[0],
            shape[0],
            generator=torch.Generator().manual_seed(seed + 1),
            dtype=torch.float64,
        )
    )
    torch.testing.assert_close(
        merge64([rotation @ t for t in taus], base=zero),
        rotation @ merged,
        rtol=1e-7,
        atol=1e-9,
    )
    # The merge has rank at most T·d, and a single task is returned unchanged.
    d = components_per_task(min(shape), count)
    assert int(torch.linalg.matrix_rank(merged, atol=1e-4)) <= count * d
    if count == 1:
        torch.testing.assert_close(merged, taus[0], rtol=1e-7, atol=1e-9)
    # The base is added: a shifted base shifts the result.
    shift = torch.full(shape, 0.5, dtype=torch.float64)
    torch.testing.assert_close(
        merge64([t + shift for t in taus], base=shift),
        merged + shift,
        rtol=1e-7,
        atol=1e-9,
    )


LLAMA = LlamaShape(hidden_size=16, intermediate_size=24, num_hidden_layers=1, vocab_size=40)
DOCUMENT: dict[str, Any] = {
    "merge_method": "tsv_merge",
    "base_model": "base",
    "models": [
        {"model": "ft1", "parameters": {"weight": 0.8}},
        {"model": "ft2"},
        {"model": "ft3", "parameters": {"weight": 1.2}},
    ],
    "parameters": {
        "alpha": 0.9,
        "exclude_from_svd": [{"filter": "lm_head", "value": True}, {"value": False}],
    },
}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("models")
    write_checkpoint(root / "base", LLAMA, seed=0)
    for index in (1, 2, 3):
        write_checkpoint(root / f"ft{index}", LLAMA, seed=index, base_seed=0, delta_scale=0.05)
    return root


def test_runner_merges_as_the_reference(checkpoints: Path, tmp_path: Path) -> None:
    recipe = parse_recipe(DOCUMENT)
    run_merge(recipe, tmp_path / "out", MergeOptions(base_dir=checkpoints, chunk_elements=100))
    written = load_file(tmp_path / "out" / "model.safetensors")
    base = load_file(checkpoints / "base" / "model.safetensors")
    models = [load_file(checkpoints / f"ft{i}" / "model.safetensors") for i in (1, 2, 3)]
    assert written.keys() == base.keys()
    tvs = [
        {k: (m[k] - base[k]) * w for k in base}
        for m, w in zip(models, (0.8, 1.0, 1.2), strict=True)
    ]
    merged = reference_tsvm(tvs, exclude_keys=["lm_head.weight"])
    for name, tensor in base.items():
        params = resolve_parameters(recipe, name, 0.0)
        assert params.method.exclude_from_svd == (name == "lm_head.weight")  # type: ignore[attr-defined]
        torch.testing.assert_close(written[name], merged[name] * 0.9 + tensor, rtol=1e-5, atol=1e-6)
    assert not torch.equal(
        written["model.layers.0.mlp.up_proj.weight"], base["model.layers.0.mlp.up_proj.weight"]
    )
