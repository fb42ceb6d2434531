"""Which checkpoint's tokenizer files the output gets, found through the allowed roots.

Without ``tokenizer_source`` (or a ``tokenizer`` block) the base's files (else the first
input's) are copied. ``base`` and ``union`` build on the base's tokenizer; a model reference
names one of the inputs or any other checkpoint. Another reference is resolved like every
model reference (relative to the base folder, confined to the allowed roots, links
included) when the merge is planned, so that a bad one fails before any job exists, and
again when its files are copied.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from merge_kernels.checkpoints import Checkpoint, open_checkpoint
from merge_kernels.checkpoints.reference import (
    CheckpointRef,
    HubRef,
    LoraRef,
    reference_from_value,
)
from merge_kernels.model_card import TOKENIZER_FILES
from merge_kernels.plan import PlannedInput
from merge_kernels.recipe import Recipe
from merge_kernels.tokenizer_settings import SourceModel, effective_tokenizer
from merge_kernels.vocabulary import base_position, input_references

if TYPE_CHECKING:
    from merge_kernels.runner import MergeOptions


def _source(recipe: Recipe) -> SourceModel | None:
    settings = effective_tokenizer(recipe)
    return None if settings is None else settings.source


def _named_input(recipe: Recipe, inputs: Sequence[PlannedInput]) -> Checkpoint | None:
    source = _source(recipe)
    if source is None or str(source) in ("base", "union"):
        base = base_position(recipe, inputs)
        return inputs[0 if base is None else base].checkpoint
    references = input_references(recipe, inputs)
    if str(source) in references:
        return inputs[references.index(str(source))].checkpoint
    return next((i.checkpoint for i in inputs if i.checkpoint.display_name == str(source)), None)


def _reference(source: SourceModel, options: MergeOptions) -> CheckpointRef:
    return reference_from_value(
        source, base_dir=options.base_dir, allowed_roots=options.allowed_roots
    )


def open_source(source: SourceModel, options: MergeOptions) -> Checkpoint:
    """Open a tokenizer source that is none of the inputs (the caller closes it)."""
    return open_checkpoint(
        _reference(source, options),
        allowed_roots=options.allowed_roots,
        allow_pickle=options.allow_pickle,
        base_dir=options.base_dir,
    )


def check_tokenizer_source(
    recipe: Recipe, inputs: Sequence[PlannedInput], options: MergeOptions
) -> None:
    """Check, at planning, that the tokenizer source can be read.

    The source's tokenizer files are checked against the allowed roots (another local
    source is opened for that); a Hub source that is not an input is only parsed (it is
    downloaded when the merge runs).

    Raises:
        PathOutsideRootsError: the source, or one of its tokenizer files, resolves outside
            the allowed roots.
        CheckpointNotFoundError, CheckpointFileError, RecipeError: as opening it would.
    """
    named = _named_input(recipe, inputs)
    if named is not None:
        _check_files(named)
        return
    source = _source(recipe)
    assert source is not None
    ref = _reference(source, options)
    if isinstance(ref, HubRef) or (isinstance(ref, LoraRef) and isinstance(ref.base, HubRef)):
        return
    with open_source(source, options) as opened:
        _check_files(opened)


def _check_files(source: Checkpoint) -> None:
    for name in TOKENIZER_FILES:
        source.confinement.is_file(source.folder / name)


def tokenizer_checkpoint(
    recipe: Recipe, inputs: Sequence[PlannedInput], options: MergeOptions
) -> tuple[Checkpoint, bool]:
    """The checkpoint whose tokenizer files the output gets (or is built from).

    Returns:
        The checkpoint, and whether it was opened here (then the caller closes it).

    Raises:
        As :func:`check_tokenizer_source`, and Hub errors for a Hub source.
    """
    named = _named_input(recipe, inputs)
    if named is not None:
        return named, False
    source = _source(recipe)
    assert source is not None
    return open_source(source, options), True
