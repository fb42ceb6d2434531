"""Consensus merging against a transcription of the TALL-masks reference, by hand and end to end.

The ``reference_*`` functions below are ``nik-dim/tall_masks``' ``topk_values_mask``
(``src/utils/utils.py``), ``ties_merging`` and its helpers (``src/utils/ties_utils.py``),
``generate_task_masks`` and ``construct_consensus_mask`` (``src/utils/tallmask_utils.py``)
and the ``consensus`` branch of ``create_task_vector`` (``src/eval/aggregation.py``), on
flat vectors, with the printing, file I/O and validation-time λ search left out.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file

from merge_kernels.methods.consensus import reference_trim
from merge_kernels.recipe import parse_recipe
from merge_kernels.registry import get_method
from merge_kernels.runner import run_merge
from merge_kernels.synthetic import LlamaShape, write_checkpoint


def reference_topk_values_mask(m: torch.Tensor, k: float = 0.7) -> torch.Tensor:
    if k == 100:
        return m
    if k >= 1:
        k /= 100
    original_shape = m.shape
    if m.dim() == 1:
        m = m.unsqueeze(0)
    _, d = m.shape
    kept = int(d * k)
    kept = d - kept
    kth_values, _ = m.abs().kthvalue(kept, dim=1, keepdim=True)
    mask = m.abs() >= kth_values
    final_mask = mask.squeeze() if original_shape == m.squeeze().shape else mask
    return m * final_mask


def reference_ties_merging(flat_task_checks: torch.Tensor, reset_thresh: float) -> torch.Tensor:
    updated_checks = reference_topk_values_mask(flat_task_checks.clone(), k=reset_thresh)
    sign_to_mult = torch.sign(updated_checks.sum(dim=0))
    majority_sign = torch.sign(sign_to_mult.sum())
    sign_to_mult[sign_to_mult == 0] = majority_sign
    rows_to_keep = torch.where(
        sign_to_mult.unsqueeze(0) > 0, updated_checks > 0, updated_checks < 0
    )
    return torch.sum(updated_checks * rows_to_keep, dim=0)


def reference_tall_masks(
    flat_ft: torch.Tensor, flat_ptm: torch.Tensor, tv: torch.Tensor, tall_mask_lambda: float
) -> torch.Tensor:
    flat_multi = flat_ptm + tv
    diff_pt_ft = (flat_ptm - flat_ft).abs()
    diff_multi_ft = (flat_multi - flat_ft).abs()
    return diff_pt_ft > diff_multi_ft * tall_mask_lambda


def reference_consensus(
    flat_ft: torch.Tensor,
    flat_ptm: torch.Tensor,
    prun_thre_k: int,
    tall_mask_lambda: float,
    use_ties: bool,
    k: float = 100,
) -> torch.Tensor:
    """The merged task vector of consensus merging (before its scaling coefficient)."""
    tv_flat_checks = flat_ft - flat_ptm
    if use_ties:
        merged_tv = reference_ties_merging(tv_flat_checks, reset_thresh=k)
    else:
        tv_flat_checks = reference_topk_values_mask(tv_flat_checks, k=k)
        merged_tv = tv_flat_checks.sum(dim=0)
    tall_masks = reference_tall_masks(flat_ft, flat_ptm, merged_tv, tall_mask_lambda)
    consensus = torch.zeros_like(tall_masks[0], dtype=torch.float32)
    for mask in tall_masks:
        consensus = consensus + mask.float()
    return merged_tv * (consensus.float() >= prun_thre_k)


def reference_merge(
    base: torch.Tensor,
    models: list[torch.Tensor],
    prun_thre_k: int = 2,
    tall_mask_lambda: float = 0.6,
    use_ties: bool = False,
    k: float | None = None,
    scale: float = 1.0,
) -> torch.Tensor:
    """θ₀ + scale · consensus vector, flattening one tensor as the reference flattens a model."""
    k = (20 if use_ties else 100) if k is None else k
    flat_ft = torch.vstack([m.reshape(-1) for m in models])
    merged = reference_consensus(
        flat_ft, base.reshape(-1), prun_thre_k, tall_mask_lambda, use_ties, k
    )
    return base + scale * merged.reshape(base.shape)


def draw(shape: tuple[int, ...], count: int, seed: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=generator)
    return base, [base + 0.1 * torch.randn(shape, generator=generator) for _ in range(count)]


SHAPES = [(12, 7), (16, 16), (9,), (2, 3, 4), (1,)]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("count", [1, 2, 3, 5])
@pytest.mark.parametrize(
    ("use_ties", "prun_thre_k", "tall_mask_lambda", "density"),
    [
        (False, 2, 0.6, None),
        (False, 1, 0.4, None),
        (False, 0, 0.6, None),
        (False, 3, 0.2, 0.5),
        (True, 2, 0.6, None),
        (True, 1, 1.0, 0.35),
        (True, 0, 0.5, 1.0),
    ],
)
def test_consensus_matches_the_reference(
    shape: tuple[int, ...],
    count: int,
    use_ties: bool,
    prun_thre_k: int,
    tall_mask_lambda: float,
    density: float | None,
) -> None:
    base, models = draw(shape, count, seed=count + 7 * prun_thre_k)
    params: dict[str, object] = {
        "use_ties": use_ties,
        "prun_thre_k": prun_thre_k,
        "tall_mask_lambda": tall_mask_lambda,
        "lambda": 0.7,
    }
    if density is not None:
        params["density"] = density
    got = get_method("consensus").merge_tensors(models, base=base, params=params)
    k = None if density is None else density * 100
    expected = reference_merge(base, models, prun_thre_k, tall_mask_lambda, use_ties, k, 0.7)
    assert torch.allclose(got, expected, atol=1e-6, rtol=1e-6)


def test_consensus_by_hand() -> None:
    # θ₀ = 0, three tasks on four weights; τ_MTL = Σ τ = (3, 1, 0.5, 0).
    # Task masks with λ = 1 (|τₜ| > |τ_MTL − τₜ|):
    #   τ₁ = (1, 1, 0.5, 0):  1 > 2 no, 1 > 0 yes, 0.5 > 0 yes, 0 > 0 no
    #   τ₂ = (1, 0, 0, 0):    1 > 2 no, 0 > 1 no,  0 > 0.5 no, no
    #   τ₃ = (1, 0, 0, 0):    the same
    # Counts (0, 1, 1, 0): k = 1 keeps (0, 1, 0.5, 0), k = 2 keeps nothing.
    base = torch.zeros(4)
    models = [
        torch.tensor([1.0, 1.0, 0.5, 0.0]),
        torch.tensor([1.0, 0.0, 0.0, 0.0]),
        torch.tensor([1.0, 0.0, 0.0, 0.0]),
    ]
    spec = get_method("consensus")
    one = spec.merge_tensors(models, base=base, params={"prun_thre_k": 1, "tall_mask_lambda": 1})
    assert torch.equal(one, torch.tensor([0.0, 1.0, 0.5, 0.0]))
    two = spec.merge_tensors(models, base=base, params={"prun_thre_k": 2, "tall_mask_lambda": 1})
    assert torch.equal(two, torch.zeros(4))
    # λ = 0.5: |τₜ| > 0.5 |τ_MTL − τₜ| also holds for the first weight of every task
    # (1 > 0.5 · 2 fails: equality), so still (0, 1, 1, 0); at λ = 0.4 all three count.
    loose = spec.merge_tensors(
        models, base=base, params={"prun_thre_k": 3, "tall_mask_lambda": 0.4}
    )
    assert torch.equal(loose, torch.tensor([3.0, 0.0, 0.0, 0.0]))


def test_reference_trim_keeps_one_more_than_the_density() -> None:
    tau = torch.tensor([5.0, -4.0, 3.0, 2.0, 1.0])
    # ⌊5 · 0.4⌋ = 2, and topk_values_mask keeps every |τ| ≥ the 3rd largest.
    assert torch.equal(reference_trim(tau, 0.4), torch.tensor([5.0, -4.0, 3.0, 0.0, 0.0]))
    assert torch.equal(reference_trim(tau, 0.4), reference_topk_values_mask(tau[None], 40)[0])
    assert torch.equal(reference_trim(tau, 1.0), tau)


finite = st.floats(-4, 4, allow_nan=False, allow_infinity=False, width=32)


@settings(max_examples=40, deadline=None)
@given(
    data=st.data(),
    size=st.integers(1, 30),
    count=st.integers(1, 5),
    tall_mask_lambda=st.floats(0.0, 2.0),
    use_ties=st.booleans(),
)
def test_k_zero_is_the_unmasked_merge_and_more_k_keeps_less(
    data: st.DataObject, size: int, count: int, tall_mask_lambda: float, use_ties: bool
) -> None:
    values = data.draw(st.lists(st.lists(finite, min_size=size, max_size=size), min_size=count + 1))
    base = torch.tensor(values[0])
    models = [torch.tensor(v) for v in values[1 : count + 1]]
    spec = get_method("consensus")
    common = {"tall_mask_lambda": tall_mask_lambda, "use_ties": use_ties}
    unmasked = spec.merge_tensors(models, base=base, params=common | {"prun_thre_k": 0})
    expected = reference_merge(base, models, 0, tall_mask_lambda, use_ties)
    assert torch.allclose(unmasked, expected, atol=1e-5)
    kept_before = torch.ones(size, dtype=torch.bool)
    for k in range(1, count + 2):
        out = spec.merge_tensors(models, base=base, params=common | {"prun_thre_k": k})
        kept = out != base
        assert not bool((kept & ~kept_before).any())  # a higher k never adds an entry
        # Every entry is either the unmasked merge's or the base's.
        assert bool(((out == unmasked) | (out == base)).all())
        kept_before = kept
    # More tasks than exist can never agree: the base comes back.
    assert torch.equal(out, base)


SHAPE = LlamaShape(hidden_size=16, intermediate_size=24, num_hidden_layers=1, vocab_size=32)


@pytest.mark.parametrize("use_ties", [False, True])
def test_runner_merges_checkpoints_as_the_reference(tmp_path: Path, use_ties: bool) -> None:
    write_checkpoint(tmp_path / "base", SHAPE, seed=0)
    for index in (1, 2, 3):
        write_checkpoint(tmp_path / f"ft{index}", SHAPE, seed=index, base_seed=0, delta_scale=0.3)
    recipe = {
        "merge_method": "consensus",
        "base_model": str(tmp_path / "base"),
        "models": [{"model": str(tmp_path / f"ft{i}")} for i in (1, 2, 3)],
        "parameters": {"lambda": 0.8, "use_ties": use_ties, "prun_thre_k": 2},
        "dtype": "float32",
    }
    run_merge(parse_recipe(recipe), tmp_path / "out")
    ours = load_file(tmp_path / "out" / "model.safetensors")
    base = load_file(tmp_path / "base" / "model.safetensors")
    models = [load_file(tmp_path / f"ft{i}" / "model.safetensors") for i in (1, 2, 3)]
    assert ours.keys() == base.keys()
    for name, tensor in base.items():
        # Per tensor, as a streamed merge trims (see the module's docstring).
        expected = reference_merge(tensor, [m[name] for m in models], use_ties=use_ties, scale=0.8)
        assert torch.allclose(ours[name], expected, atol=1e-6, rtol=1e-6), name
