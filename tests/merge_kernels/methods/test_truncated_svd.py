"""The randomized SVD option: its top triplets and the merges built on them, against exact SVDs."""

from __future__ import annotations

import pytest
import torch

from merge_kernels.methods.truncated_svd import top_singular_triplets
from merge_kernels.registry import get_method


def decaying(rows: int, cols: int, seed: int, decay: float) -> torch.Tensor:
    """A matrix with singular values decay⁰, decay¹, … and random singular vectors, as a
    fine-tune's task vector whose spectrum falls off."""
    generator = torch.Generator().manual_seed(seed)
    left, _ = torch.linalg.qr(torch.randn(rows, rows, generator=generator, dtype=torch.float64))
    right, _ = torch.linalg.qr(torch.randn(cols, cols, generator=generator, dtype=torch.float64))
    rank = min(rows, cols)
    values = decay ** torch.arange(rank, dtype=torch.float64)
    return ((left[:, :rank] * values) @ right[:rank, :]).float()


def relative_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    return float(torch.linalg.vector_norm(got - expected) / torch.linalg.vector_norm(expected))


def test_exact_is_the_thin_svd_and_a_full_width_sketch_falls_back_to_it() -> None:
    matrix = decaying(40, 30, seed=1, decay=0.9)
    u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    for method in ("exact", "randomized"):
        # k + oversampling covers the whole rank of 30: the exact SVD, bit for bit.
        got = top_singular_triplets(matrix, 25, method)
        assert torch.equal(got[0], u[:, :25])
        assert torch.equal(got[1], s[:25])
        assert torch.equal(got[2], vh[:25, :])


@pytest.mark.parametrize("shape", [(300, 120), (120, 300)])
def test_randomized_triplets_approximate_the_exact_ones(shape: tuple[int, int]) -> None:
    matrix = decaying(*shape, seed=2, decay=0.85)
    u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    ru, rs, rvh = top_singular_triplets(matrix, 12, "randomized")
    assert ru.shape == (shape[0], 12) and rs.shape == (12,) and rvh.shape == (12, shape[1])
    assert relative_error(rs, s[:12]) <= 1e-5
    # The same rank-12 approximation (singular vectors are unique up to sign).
    assert relative_error((ru * rs) @ rvh, (u[:, :12] * s[:12]) @ vh[:12, :]) <= 1e-4
    # Orthonormal columns and rows.
    assert torch.allclose(ru.T @ ru, torch.eye(12), atol=1e-5)
    assert torch.allclose(rvh @ rvh.T, torch.eye(12), atol=1e-5)
    # Deterministic: the sketch's seed is fixed.
    assert torch.equal(top_singular_triplets(matrix, 12, "randomized")[1], rs)


@pytest.mark.parametrize("name", ["tsv_merge", "iso_cts"])
@pytest.mark.parametrize("shape", [(96, 64), (64, 200), (160, 160)])
def test_randomized_merges_stay_close_to_exact_ones(name: str, shape: tuple[int, int]) -> None:
    # Task vectors with decaying spectra: the kept directions are well separated from the
    # rest, as the option's docstring asks.
    base = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    models = [base + 0.01 * decaying(*shape, seed=i, decay=0.85) for i in range(3)]
    spec = get_method(name)
    exact = spec.merge_tensors(models, base=base)
    randomized = spec.merge_tensors(models, base=base, params={"svd": "randomized"})
    assert relative_error(randomized - base, exact - base) <= 1e-3
