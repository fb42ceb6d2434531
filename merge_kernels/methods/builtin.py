"""Imports every built-in method module, each of which registers itself."""

from merge_kernels.methods import (
    arcee_fusion,
    breadcrumbs,
    della,
    greedy_soup,
    iso,
    karcher,
    linear,
    model_stock,
    multislerp,
    nearswap,
    nuslerp,
    passthrough,
    ram,
    sce,
    slerp,
    task_arithmetic,
)

__all__ = [
    "arcee_fusion",
    "breadcrumbs",
    "della",
    "greedy_soup",
    "iso",
    "karcher",
    "linear",
    "model_stock",
    "multislerp",
    "nearswap",
    "nuslerp",
    "passthrough",
    "ram",
    "sce",
    "slerp",
    "task_arithmetic",
]
