"""Aligning every input's embedding and LM head rows to the output vocabulary.

Follows mergekit 0.1.5's ``PermutedVocabulary`` (``mergekit/tokenizer/embed.py``): an input
that has a token gives its own row; for a token some input lacks (or a ``force``d override),
every input lacking it gets one default row:

* a token only one input has: that input's row;
* a token no input has: zeros;
* else the base model's row when the base has it, else the mean of the rows of the inputs
  that have it;
* a ``tokens:`` override: its model's row for the token, its model's row for another token
  (``model_token``), or zeros.

Rows past the vocabulary (``pad_to_multiple_of``) are each input's mean row. Which row goes
where is decided once, when the merge is planned (:class:`RowMap`); :func:`align_rows` then
applies it to the tensors read for one output tensor, whole.

"Every input" is every model the tensor is merged from (:class:`Readers`): all inputs of a
``models`` merge, or the sources of the slice a stacked merge takes the tensor from (the
first slice for the embeddings, the last for the LM head), as mergekit's ``MergePlanner``
hands ``PermutedVocabulary`` only those models' tensors.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from merge_kernels.errors import RecipeError
from merge_kernels.tokenizer_settings import (
    ModelTokenEmbedding,
    TokenEmbedding,
    TokenizerSettings,
    ZeroEmbedding,
)
from merge_kernels.vocabulary import Vocabulary


@dataclass(frozen=True)
class DefaultRow:
    """A row made from inputs' rows: their sum, divided by their count when ``average``
    (no picks: zeros)."""

    picks: tuple[tuple[int, int], ...]
    average: bool = False


@dataclass(frozen=True)
class RowMap:
    """Where every output row of a vocabulary tensor comes from, per input.

    Attributes:
        tokens: the vocabulary's size; rows past it are padding.
        rows: the output's rows.
        own: per input, for each token id, the input's own row, or -1 for the default row.
        defaults: the default row of each token id that has one.
        dtype: the dtype rows are combined in (the recipe's ``dtype``), or None for the
            inputs' promoted dtype.
    """

    tokens: int
    rows: int
    own: tuple[tuple[int, ...], ...]
    defaults: dict[int, DefaultRow]
    dtype: torch.dtype | None = None

    def own_rows(self) -> tuple[int, ...]:
        """Per input, how many output rows are its own row for the token."""
        return tuple(sum(1 for row in own if row >= 0) for own in self.own)

    def is_identity(self, position: int, rows: int) -> bool:
        """Whether input ``position`` (with ``rows`` rows) needs no change at all."""
        return (
            rows == self.rows == self.tokens
            and not any(p < 0 for p in self.own[position])
            and all(p == i for i, p in enumerate(self.own[position]))
        )


@dataclass(frozen=True)
class Readers:
    """The inputs one vocabulary tensor is merged from, in the order it reads them.

    Attributes:
        positions: each reader's position among the vocabulary's inputs (``Vocabulary``'s
            permutations); the row map's inputs are the readers, in this order.
        references: each reader's reference text in the recipe.
        in_rows: each reader's embedding rows.
        base: the reader that is the base model, or None.
        order: the readers (indices into ``positions``) in the order mergekit lists their
            models, which averaged rows are summed in (None: in ``positions`` order).
        scope: what the readers are, for errors: an override's model must be one of them.
    """

    positions: tuple[int, ...]
    references: tuple[str, ...]
    in_rows: tuple[int, ...]
    base: int | None = None
    order: tuple[int, ...] | None = None
    scope: str = "an input of this merge"


def _position(name: str, readers: Readers, field: str) -> int:
    if name not in readers.references:
        raise RecipeError(field, f"{name!r} is not {readers.scope}")
    return readers.references.index(name)


def _override_row(
    token: str, setting: TokenEmbedding, vocabulary: Vocabulary, readers: Readers
) -> DefaultRow:
    """``compute_default_embedding``: the row a ``tokens:`` override names."""
    field = f"tokenizer.tokens.{token}.source"
    source = setting.source
    if isinstance(source, ZeroEmbedding):
        return DefaultRow(())
    if isinstance(source, ModelTokenEmbedding):
        reader = _position(str(source.model), readers, f"{field}.model")
        row = source.token_id
        if row is None:
            row = vocabulary.vocabs[readers.positions[reader]].get(str(source.token))
            if row is None:
                raise RecipeError(
                    f"{field}.token", f"token {source.token!r} is not in {source.model}'s tokenizer"
                )
        if row >= readers.in_rows[reader]:
            raise RecipeError(
                f"{field}.token_id",
                f"row {row} is past {source.model}'s {readers.in_rows[reader]} embedding rows",
            )
        return DefaultRow(((reader, row),))
    reader = _position(str(source), readers, field)
    row = vocabulary.permutations[readers.positions[reader]][vocabulary.tokens[token]]
    if row < 0:
        raise RecipeError(field, f"token {token!r} is not in {source}'s tokenizer")
    return DefaultRow(((reader, row),))


def build_row_map(
    vocabulary: Vocabulary,
    settings: TokenizerSettings,
    readers: Readers,
    dtype: torch.dtype | None = None,
) -> RowMap:
    """Decide every output row of every reader (``assign_embedding_sources`` and the
    default embeddings of ``PermutedVocabulary``).

    Args:
        vocabulary: the output vocabulary and the inputs' permutations.
        settings: the tokenizer block (its ``tokens`` overrides).
        readers: the inputs the tensor is merged from; the row map is indexed by them.
        dtype: the dtype rows are combined in (None: the inputs' promoted dtype).

    Raises:
        RecipeError: an override names a model that is not a reader, or a token or row its
            model does not have.
    """
    overrides = settings.tokens or {}
    permutations = [vocabulary.permutations[p] for p in readers.positions]
    order = readers.order if readers.order is not None else range(len(permutations))
    base = readers.base
    defaults: dict[int, DefaultRow] = {}
    forced: set[int] = set()
    for token, index in vocabulary.tokens.items():
        present = [(r, permutations[r][index]) for r in order if permutations[r][index] >= 0]
        setting = overrides.get(token)
        if setting is not None and setting.source is not None:
            if setting.force:
                forced.add(index)
            if setting.force or len(present) < len(permutations):
                defaults[index] = _override_row(token, setting, vocabulary, readers)
            continue
        if len(present) == len(permutations):
            continue
        if len(present) == 1:
            defaults[index] = DefaultRow(tuple(present))
        elif not present:
            defaults[index] = DefaultRow(())
        elif base is not None and permutations[base][index] >= 0:
            defaults[index] = DefaultRow(((base, permutations[base][index]),))
        else:
            defaults[index] = DefaultRow(tuple(present), average=True)
    own = tuple(
        tuple(-1 if index in forced else row for index, row in enumerate(perm))
        for perm in permutations
    )
    return RowMap(len(vocabulary.tokens), vocabulary.rows, own, defaults, dtype)


def align_rows(tensors: Sequence[torch.Tensor], row_map: RowMap) -> list[torch.Tensor]:
    """Every input's vocabulary tensor (vocabulary along dim 0) aligned to the output rows.

    The result is in the inputs' promoted dtype (or ``row_map.dtype``), as mergekit
    combines them.
    """
    if row_map.dtype is not None:
        tensors = [tensor.to(row_map.dtype) for tensor in tensors]
    dtype = tensors[0].dtype
    for tensor in tensors:
        dtype = torch.promote_types(dtype, tensor.dtype)
    shape = tuple(tensors[0].shape[1:])
    defaults: dict[int, torch.Tensor] = {}
    for index, default in row_map.defaults.items():
        if not default.picks:
            defaults[index] = torch.zeros(shape, dtype=dtype)
        elif default.average:
            row = torch.zeros(shape, dtype=dtype)
            for position, source in default.picks:
                row = row + tensors[position][source]
            defaults[index] = row / len(default.picks)
        else:
            position, source = default.picks[0]
            defaults[index] = tensors[position][source]
    aligned = []
    for position, tensor in enumerate(tensors):
        own = torch.tensor(row_map.own[position], dtype=torch.long)
        out = torch.zeros((row_map.rows, *shape), dtype=dtype)
        ids = torch.nonzero(own >= 0).flatten()
        out.index_copy_(0, ids, tensor.index_select(0, own[ids]).to(dtype))
        for index, row in defaults.items():
            if row_map.own[position][index] < 0:
                out[index] = row
        if row_map.rows > row_map.tokens:
            out[row_map.tokens :] = out[: row_map.tokens].mean(dim=0)
        aligned.append(out)
    return aligned
