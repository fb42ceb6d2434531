"""The top-k singular triplets of a matrix, exactly or by a seeded randomized range finder.

TSV-M keeps 1/T of each task vector's rank and ISO-CTS a small task-specific slice of each
residual: the rest of a full SVD is thrown away. The randomized SVD (Halko, Martinsson and
Tropp, "Finding Structure with Randomness", SIAM Review 2011, algorithms 4.4 and 5.1)
finds those top directions from a Gaussian sketch of 2k + ``OVERSAMPLE`` columns refined
by ``POWER_ITERATIONS`` subspace iterations (re-orthonormalised each time), at
O(m·n·(2k + p)) instead of O(m·n·min(m, n)): a saving where k is a small fraction of the
rank (TSV-M with many tasks, ISO-CTS's task-specific slices).

It is an approximation: its error grows as the spectrum across the cut at k flattens
(the tests bound it for spectra decaying by 0.85 per index; ``bench/svd_bench.py``
reports it for 0.98 per index in bf16; for white noise it is not small). It is therefore
an option, ``svd: randomized``, and ``exact`` stays the default. The sketch is drawn on
the CPU from a fixed seed and moved to the matrix's device, so the result depends on the
inputs alone and is the same on CPU and CUDA up to rounding.
"""

from __future__ import annotations

from typing import Literal

import torch

SvdMethod = Literal["exact", "randomized"]
OVERSAMPLE = 10
POWER_ITERATIONS = 4
SKETCH_SEED = 0x5EED


def top_singular_triplets(
    matrix: torch.Tensor, k: int, method: SvdMethod
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """U[:, :k], S[:k], Vᵀ[:k, :] of ``matrix`` (m × n), by a thin SVD or a randomized one.

    Where the sketch would cover the whole rank the exact SVD is as cheap, and is used.
    """
    rows, cols = matrix.shape
    rank = min(rows, cols)
    # A sketch twice as wide as the kept rank: where the spectrum decays slowly across the
    # cut (0.98 per index), k + a constant leaves the last kept directions mixed with the
    # next ones; 2k + p with q power iterations damps them by (σ₂ₖ / σₖ)^(2q + 1).
    width = min(2 * k + OVERSAMPLE, rank)
    if method == "exact" or width >= rank:
        u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
        return u[:, :k], s[:k], vh[:k, :]
    generator = torch.Generator().manual_seed(SKETCH_SEED)
    sketch = torch.randn(cols, width, generator=generator, dtype=matrix.dtype)
    q, _ = torch.linalg.qr(matrix @ sketch.to(matrix.device))
    for _ in range(POWER_ITERATIONS):
        z, _ = torch.linalg.qr(matrix.T @ q)
        q, _ = torch.linalg.qr(matrix @ z)
    small_u, s, vh = torch.linalg.svd(q.T @ matrix, full_matrices=False)
    return (q @ small_u)[:, :k], s[:k], vh[:k, :]
