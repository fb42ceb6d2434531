"""Planning a merge's output vocabulary: the tokenizer to write and every input's row map.

Runs before the tensor plan, from tokenizer files and safetensors headers alone: the
vocabulary comes from :mod:`merge_kernels.vocabulary`, the rows from
:mod:`merge_kernels.embedding_rows`. The tensor plan then gives the embedding and LM head
tensors the new row count and this row map.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from merge_kernels.checkpoints.base import Checkpoint
from merge_kernels.embedding_rows import RowMap, build_row_map
from merge_kernels.plan import PlannedInput, embedding_name
from merge_kernels.recipe import _DTYPE_ALIASES, Recipe
from merge_kernels.tokenizer_settings import SourceModel, effective_tokenizer
from merge_kernels.vocabulary import Vocabulary, base_position, build_vocabulary, input_references

if TYPE_CHECKING:
    from merge_kernels.runner import MergeOptions


@dataclass(frozen=True)
class VocabularyPlan:
    """The output vocabulary and how every input's vocabulary rows map onto it."""

    vocabulary: Vocabulary
    row_map: RowMap

    @property
    def vocab_size(self) -> int:
        """The output config's ``vocab_size``: the embedding rows, padding included."""
        return self.row_map.rows


def _embedding_rows(item: PlannedInput) -> int:
    entries = item.checkpoint.entries()
    name = embedding_name(entries)
    return entries[name].shape[0] if name is not None and entries[name].shape else sys.maxsize


def plan_vocabulary(
    recipe: Recipe, inputs: Sequence[PlannedInput], options: MergeOptions
) -> VocabularyPlan | None:
    """The vocabulary plan of a recipe that builds a tokenizer, else None.

    Raises:
        RecipeError: a tokenizer is missing or unusable, or an override cannot be met.
        PathOutsideRootsError, CheckpointFileError: a tokenizer file cannot be read.
    """
    from merge_kernels.tokenizer_source import open_source

    settings = effective_tokenizer(recipe)
    if settings is None:
        return None

    with ExitStack() as stack:

        def opened(source: SourceModel) -> Checkpoint:
            return stack.enter_context(open_source(source, options))

        vocabulary = build_vocabulary(settings, recipe, inputs, opened)
    dtype = getattr(torch, _DTYPE_ALIASES[recipe.dtype]) if recipe.dtype else None
    row_map = build_row_map(
        vocabulary,
        settings,
        input_references(recipe, inputs),
        base_position(recipe, inputs),
        [_embedding_rows(item) for item in inputs],
        dtype,
    )
    return VocabularyPlan(vocabulary, row_map)
