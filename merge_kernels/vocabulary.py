"""The output vocabulary and each input's token permutation, as mergekit 0.1.5 builds them.

Follows ``mergekit/tokenizer/build.py`` (``build_tokenizer``, ``build_union_tokenizer``):

* ``base``: the base model's tokenizer, without tokens past its ``vocab_size``;
* a model: that model's tokenizer as it is;
* ``union``: the base's tokenizer, then every other token of the inputs' tokenizers (those
  below each model's ``vocab_size``) added in turn: regular tokens first, then added tokens.

Then the ``tokens:`` overrides missing from it are added, and every input gets a permutation:
for each output token id, the row of that token in the input (``-1`` when it lacks it).

mergekit walks the tokenizers' vocabularies in hash order, so the ids that ``union`` gives
to tokens new to the base vary from run to run there; here they are assigned in input order
(base first, then the models as listed), each tokenizer's tokens by id, so they are stable.
Tokens the base has keep the base's ids, as in mergekit.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from merge_kernels.checkpoints.base import Checkpoint
from merge_kernels.errors import RecipeError
from merge_kernels.recipe import Recipe
from merge_kernels.slices import input_references as opened_references
from merge_kernels.slices import is_stacked
from merge_kernels.tokenizer_files import (
    InputTokenizer,
    has_tokenizer,
    read_tokenizer,
    stripped,
    tokenizers_library,
)
from merge_kernels.tokenizer_settings import SourceModel, TokenizerSettings

if TYPE_CHECKING:
    from tokenizers import AddedToken, Tokenizer

    from merge_kernels.plan import PlannedInput


@dataclass(frozen=True)
class Vocabulary:
    """The output tokenizer and how every input's token rows map onto it.

    Attributes:
        tokenizer: the output tokenizer (written as ``tokenizer.json``).
        config: the ``tokenizer_config.json`` of the checkpoint it was built from.
        tokens: every output token and its id (ids ``0 .. len(tokens) - 1``).
        rows: output embedding rows: ``len(tokens)`` padded to ``pad_to_multiple_of``.
        permutations: per planned input, for each output id, its row for that token or -1.
        vocabs: per planned input, its own tokenizer's tokens and ids.
        rewritten: whether the tokenizer differs from its source's files (else they are
            copied as they are).
    """

    tokenizer: Tokenizer
    config: dict[str, Any]
    tokens: dict[str, int]
    rows: int
    permutations: tuple[tuple[int, ...], ...]
    vocabs: tuple[dict[str, int], ...]
    rewritten: bool


def input_references(recipe: Recipe, inputs: Sequence[PlannedInput]) -> list[str]:
    """The recipe's reference text of each planned input, for matching names in the recipe."""
    if is_stacked(recipe):  # the inputs are the slices' models, opened in this order
        return [str(reference) for _, _, reference in opened_references(recipe)]
    models = recipe.models or []
    references = []
    for item in inputs:
        if item.role == "base" or item.recipe_index is None or item.recipe_index >= len(models):
            references.append(str(recipe.base_model))
        else:
            references.append(str(models[item.recipe_index].model))
    return references


def base_position(recipe: Recipe, inputs: Sequence[PlannedInput]) -> int | None:
    """The planned input that is ``base_model``, or None when the recipe has none."""
    if recipe.base_model is None:
        return None
    references = input_references(recipe, inputs)
    name = str(recipe.base_model)
    return references.index(name) if name in references else None


def _copy(tokenizer: Tokenizer) -> Tokenizer:
    result: Tokenizer = tokenizers_library().Tokenizer.from_str(tokenizer.to_str())
    return result


def _union(base: InputTokenizer, others: Sequence[InputTokenizer]) -> Tokenizer:
    """``build_union_tokenizer``: the base's tokenizer with every other token added."""
    regular: dict[str, None] = {}
    added: dict[str, AddedToken] = {}
    for source in (base, *others):
        limit = source.size_limit()
        for token, index in sorted(source.vocab().items(), key=lambda item: item[1]):
            if index < limit:
                regular.setdefault(token, None)
        decoder = source.tokenizer.get_added_tokens_decoder()
        for index, info in sorted(decoder.items()):
            if index < limit:
                added.setdefault(info.content, info)
    result = _copy(base.tokenizer)
    base_vocab = base.vocab()
    for token in regular:
        if token not in added and token not in base_vocab:
            result.add_tokens([token])
    for info in added.values():
        result.add_tokens([info])
    return result


def _permutation(tokens: dict[str, int], vocab: dict[str, int], limit: int) -> tuple[int, ...]:
    rows = [-1] * len(tokens)
    for token, index in tokens.items():
        row = vocab.get(token)
        if row is not None and row < limit:
            rows[index] = row
    return tuple(rows)


def build_vocabulary(
    settings: TokenizerSettings,
    recipe: Recipe,
    inputs: Sequence[PlannedInput],
    open_other: Callable[[SourceModel], Checkpoint],
) -> Vocabulary:
    """Build the output vocabulary of a merge of ``inputs``.

    Args:
        settings: the recipe's tokenizer block (or one made from ``tokenizer_source``).
        recipe: the recipe (for matching model names).
        inputs: the planned inputs, base first when the method has one.
        open_other: called with the source reference when it is no input; returns an open
            checkpoint (that the caller closes).

    Raises:
        RecipeError: a tokenizer is missing or cannot be used.
    """
    references = input_references(recipe, inputs)
    base = base_position(recipe, inputs)
    base = 0 if base is None else base
    base_checkpoint = inputs[base].checkpoint
    loaded: dict[int, InputTokenizer] = {}
    for position, item in enumerate(inputs):
        if position == base or has_tokenizer(item.checkpoint):
            loaded[position] = read_tokenizer(item.checkpoint)
    base_tokenizer = stripped(loaded[base], base_checkpoint.display_name)
    vocabs = [
        (base_tokenizer if position in (base,) or position not in loaded else loaded[position])
        for position in range(len(inputs))
    ]
    source = settings.source
    if str(source) == "base":
        output, config = _copy(base_tokenizer.tokenizer), base_tokenizer.config
        rewritten = base_tokenizer is not loaded[base]
    elif str(source) == "union":
        others = [loaded[p] for p in sorted(loaded) if p != base]
        output, config, rewritten = _union(base_tokenizer, others), base_tokenizer.config, True
    else:
        if str(source) in references:
            chosen = read_tokenizer(inputs[references.index(str(source))].checkpoint)
        else:
            chosen = read_tokenizer(open_other(source))
        output, config, rewritten = chosen.tokenizer, chosen.config, False
    for token in settings.tokens or {}:
        if token not in output.get_vocab(with_added_tokens=True):
            output.add_tokens([token])
            rewritten = True
    tokens = dict(output.get_vocab(with_added_tokens=True))
    if sorted(tokens.values()) != list(range(len(tokens))):
        raise RecipeError(
            "tokenizer_source",
            f"the output tokenizer's ids are not 0..{len(tokens) - 1} without gaps, so they "
            "cannot index embedding rows; use a tokenizer whose ids have no gaps",
        )
    rows = len(tokens)
    multiple = settings.pad_to_multiple_of
    if multiple and rows % multiple:
        rows += multiple - rows % multiple
    permutations = tuple(
        _permutation(tokens, vocab.vocab(), vocab.size_limit()) for vocab in vocabs
    )
    return Vocabulary(
        tokenizer=output,
        config=config,
        tokens=tokens,
        rows=rows,
        permutations=permutations,
        vocabs=tuple(vocab.vocab() for vocab in vocabs),
        rewritten=rewritten,
    )
