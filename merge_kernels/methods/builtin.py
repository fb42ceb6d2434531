"""Imports every built-in method module, each of which registers itself."""

from merge_kernels.methods import (
    arcee_fusion,
    greedy_soup,
    karcher,
    linear,
    multislerp,
    nearswap,
    nuslerp,
    passthrough,
    slerp,
    task_arithmetic,
)

__all__ = [
    "arcee_fusion",
    "greedy_soup",
    "karcher",
    "linear",
    "multislerp",
    "nearswap",
    "nuslerp",
    "passthrough",
    "slerp",
    "task_arithmetic",
]
