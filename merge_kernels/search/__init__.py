"""Searching a recipe's parameters against an evaluator (grid, random, CMA-ES), resumably.

:func:`run_search` is the entry point; :func:`load_search_spec` reads a spec file.
"""

from merge_kernels.search.loop import SearchProgress, run_search
from merge_kernels.search.records import SearchReport, SearchStoppedError
from merge_kernels.search.space import SearchSpec, load_search_spec, parse_search_spec
from merge_kernels.search.state import JsonFileStateStore, MemoryStateStore, SearchStateStore

__all__ = [
    "JsonFileStateStore",
    "MemoryStateStore",
    "SearchProgress",
    "SearchReport",
    "SearchSpec",
    "SearchStateStore",
    "SearchStoppedError",
    "load_search_spec",
    "parse_search_spec",
    "run_search",
]
