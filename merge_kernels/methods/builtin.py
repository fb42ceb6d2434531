"""Imports every built-in method module, each of which registers itself."""

from merge_kernels.methods import (
    breadcrumbs,
    della,
    greedy_soup,
    linear,
    model_stock,
    ram,
    sce,
    slerp,
    task_arithmetic,
)

__all__ = [
    "breadcrumbs",
    "della",
    "greedy_soup",
    "linear",
    "model_stock",
    "ram",
    "sce",
    "slerp",
    "task_arithmetic",
]
