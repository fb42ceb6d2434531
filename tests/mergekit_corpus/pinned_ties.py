"""mergekit's rankings with ties ordered as tureen orders them, for the corpus comparison.

mergekit 0.1.5 ranks magnitudes with ``torch.argsort``/``torch.sort`` (``sparsify.py``:
TIES' ``magnitude``, Breadcrumbs' ``magnitude_outliers``, DELLA's ranks) and variances with
``torch.topk`` (``merge_methods/sce.py``), none of them stable: among equal values the order,
so which tied entries a trim keeps, is left unspecified (on the CPU it follows the sort's
internal partitioning). Tiny fp16/bf16 checkpoints tie often, and one different pick moves
an SCE weight and so every entry of the tensor.

While :func:`pinned_ties` is active, those three calls, looked up by mergekit's modules as
``torch.<name>``, order equal values as tureen does: a larger flat index ranks as the
smaller value (so a descending sort or ``topk`` lists tied entries lowest index first, as
tureen's ``exact_k`` keeps them). That is one of the orders mergekit's calls may return,
so the oracle computes exactly mergekit's arithmetic and the outputs can be compared value
for value instead of up to the tied entries. Nothing else in mergekit is changed.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from types import ModuleType
from typing import Any

import torch

_PATCHED_MODULES = ("mergekit.sparsify", "mergekit.merge_methods.sce")


def _sort(
    values: torch.Tensor, dim: int = -1, descending: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sorted values and indices; equal values: lower index first when descending, last
    when ascending (the reverse of the stable descending order)."""
    result = torch.sort(values, dim=dim, descending=True, stable=True)
    if descending:
        return result.values, result.indices
    return result.values.flip(dim), result.indices.flip(dim)


class _PinnedTorch(ModuleType):
    """``torch`` as mergekit's modules see it, with tie-ordered sort, argsort and topk."""

    def __init__(self) -> None:
        super().__init__("torch")

    def __getattr__(self, name: str) -> Any:
        return getattr(torch, name)

    @staticmethod
    def sort(
        input: torch.Tensor,
        dim: int = -1,
        descending: bool = False,
        stable: bool = False,
    ) -> Any:
        values, indices = _sort(input, dim, descending)
        return torch.return_types.sort((values, indices))

    @staticmethod
    def argsort(
        input: torch.Tensor,
        dim: int = -1,
        descending: bool = False,
        stable: bool = False,
    ) -> torch.Tensor:
        return _sort(input, dim, descending)[1]

    @staticmethod
    def topk(
        input: torch.Tensor,
        k: int,
        dim: int = -1,
        largest: bool = True,
        sorted: bool = True,
    ) -> Any:
        values, indices = _sort(input, dim, descending=largest)
        index = torch.arange(k, device=input.device)
        return torch.return_types.topk(
            (values.index_select(dim, index), indices.index_select(dim, index))
        )


@contextmanager
def pinned_ties() -> Iterator[None]:
    """Run mergekit with its sorts ordering tied values as tureen does (see the module doc)."""
    import importlib

    modules = [importlib.import_module(name) for name in _PATCHED_MODULES]
    originals = [module.torch for module in modules]  # type: ignore[attr-defined]
    pinned = _PinnedTorch()
    try:
        for module in modules:
            module.torch = pinned  # type: ignore[attr-defined]
        yield
    finally:
        for module, original in zip(modules, originals, strict=True):
            module.torch = original  # type: ignore[attr-defined]
