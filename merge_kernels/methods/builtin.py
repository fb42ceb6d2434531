"""Imports every built-in method module, each of which registers itself."""

from merge_kernels.methods import greedy_soup, linear, slerp, task_arithmetic

__all__ = ["greedy_soup", "linear", "slerp", "task_arithmetic"]
