"""Planning a merge's output vocabulary: the tokenizer to write and every input's row map.

Runs before the tensor plan, from tokenizer files and safetensors headers alone: the
vocabulary comes from :mod:`merge_kernels.vocabulary`, the rows from
:mod:`merge_kernels.embedding_rows`. The tensor plan then gives the embedding and LM head
tensors the new row count and this row map; a stacked plan asks for the row map of the
models each of those tensors is merged from (:func:`slice_row_map`).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from merge_kernels.checkpoints.base import Checkpoint
from merge_kernels.embedding_rows import Readers, RowMap, build_row_map
from merge_kernels.plan import PlannedInput, embedding_name
from merge_kernels.recipe import _DTYPE_ALIASES, Recipe
from merge_kernels.slices import PlannedSlice, is_stacked
from merge_kernels.tokenizer_settings import SourceModel, TokenizerSettings, effective_tokenizer
from merge_kernels.vocabulary import Vocabulary, base_position, build_vocabulary, input_references

if TYPE_CHECKING:
    from merge_kernels.runner import MergeOptions


@dataclass(frozen=True)
class VocabularyPlan:
    """The output vocabulary and how every input's vocabulary rows map onto it.

    Attributes:
        vocabulary: the output vocabulary and every input's permutation.
        row_map: the rows of a tensor merged from every input (a ``models`` merge).
        settings: the tokenizer block the vocabulary was built by.
        readers: every input, for building the row map of a tensor read from some of them.
    """

    vocabulary: Vocabulary
    row_map: RowMap
    settings: TokenizerSettings
    readers: Readers

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
    readers = Readers(
        positions=tuple(range(len(inputs))),
        references=tuple(input_references(recipe, inputs)),
        in_rows=tuple(_embedding_rows(item) for item in inputs),
        base=base_position(recipe, inputs),
    )
    every_input = settings
    if is_stacked(recipe):
        # Each slice's vocabulary tensors get row maps of their own (slice_row_map), which
        # check the overrides they use; this one gives the rows and which inputs' rows move,
        # which only forced overrides change.
        forced = {t: s for t, s in (settings.tokens or {}).items() if s.force}
        every_input = settings.model_copy(update={"tokens": forced})
    row_map = build_row_map(vocabulary, every_input, readers, dtype)
    return VocabularyPlan(vocabulary, row_map, settings, readers)


def slice_row_map(
    plan: VocabularyPlan,
    inputs: Sequence[PlannedInput],
    name: str,
    slice_: PlannedSlice,
    positions: Sequence[int],
    sources: Sequence[int],
    tensors: Sequence[str],
) -> RowMap | None:
    """The row map of vocabulary tensor ``name`` merged from one slice's models alone (a
    stacked merge), None when none of them has its rows moved.

    mergekit aligns only the tensors of the models the tensor is merged from, so a token one
    of them lacks is filled from those models alone, and from the slice's ``base_model`` (its
    own or the recipe's) when that is among them, whatever the method.

    Args:
        plan: the vocabulary plan of the whole merge.
        inputs: the merge's planned inputs.
        name: the output tensor.
        slice_: the slice it is merged from.
        positions: the inputs it reads, in the order it reads them.
        sources: each one's position among the slice's sources.
        tensors: each one's tensor read.

    Raises:
        RecipeError: a ``tokens:`` override names a model that is not one of the slice's
            sources, or a token or row its model does not have.
    """
    base_model = None if slice_.base_model is None else str(slice_.base_model)
    readers = Readers(
        positions=tuple(positions),
        references=tuple(plan.readers.references[p] for p in positions),
        in_rows=tuple(plan.readers.in_rows[p] for p in positions),
        base=next(
            (k for k, i in enumerate(sources) if str(slice_.sources[i].model) == base_model),
            None,
        ),
        order=tuple(sorted(range(len(positions)), key=lambda k: sources[k])),
        scope=f"a source of {slice_.field}, which {name!r} is merged from",
    )
    row_map = build_row_map(plan.vocabulary, plan.settings, readers, plan.row_map.dtype)
    rows = [
        inputs[position].checkpoint.entries()[tensor].shape[0]
        for position, tensor in zip(positions, tensors, strict=True)
    ]
    if all(row_map.is_identity(reader, count) for reader, count in enumerate(rows)):
        return None
    return row_map
