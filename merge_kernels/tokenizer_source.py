"""Which checkpoint's tokenizer files the output gets, found through the allowed roots.

A recipe's ``tokenizer_source`` is ``base`` (the default: the first input's), one of the
inputs, or any other checkpoint reference. Another reference is resolved like every model
reference (relative to the base folder, confined to the allowed roots, links included) when
the merge is planned, so that a bad one fails before any job exists, and again when its
files are copied.
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

if TYPE_CHECKING:
    from merge_kernels.runner import MergeOptions


def _named_input(recipe: Recipe, inputs: Sequence[PlannedInput]) -> Checkpoint | None:
    source = recipe.tokenizer_source
    if source is None or str(source) == "base":
        return inputs[0].checkpoint
    return next((i.checkpoint for i in inputs if i.checkpoint.display_name == str(source)), None)


def _other_reference(recipe: Recipe, options: MergeOptions) -> CheckpointRef:
    assert recipe.tokenizer_source is not None
    return reference_from_value(
        recipe.tokenizer_source, base_dir=options.base_dir, allowed_roots=options.allowed_roots
    )


def _open(ref: CheckpointRef, options: MergeOptions) -> Checkpoint:
    return open_checkpoint(
        ref,
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
    ref = _other_reference(recipe, options)
    if isinstance(ref, HubRef) or (isinstance(ref, LoraRef) and isinstance(ref.base, HubRef)):
        return
    with _open(ref, options) as source:
        _check_files(source)


def _check_files(source: Checkpoint) -> None:
    for name in TOKENIZER_FILES:
        source.confinement.is_file(source.folder / name)


def tokenizer_checkpoint(
    recipe: Recipe, inputs: Sequence[PlannedInput], options: MergeOptions
) -> tuple[Checkpoint, bool]:
    """The checkpoint whose tokenizer files the output gets.

    Returns:
        The checkpoint, and whether it was opened here (then the caller closes it).

    Raises:
        As :func:`check_tokenizer_source`, and Hub errors for a Hub source.
    """
    named = _named_input(recipe, inputs)
    if named is not None:
        return named, False
    return _open(_other_reference(recipe, options), options), True
