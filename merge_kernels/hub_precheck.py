"""Checking Hub inputs against each other from the Hub's metadata, before downloading them.

A merge of checkpoints that do not fit together should fail before gigabytes are fetched.
When a recipe names Hub repositories (and the Hub is reachable), every input is described
from configs and safetensors headers alone: Hub ones through
:func:`~merge_kernels.checkpoints.hub.describe_from_metadata` (HTTP range requests), local
ones by opening them (headers only). The same :func:`~merge_kernels.plan.build_plan` as the
merge itself then checks them, and its problems are raised at once. When metadata cannot
tell (offline, unreachable, pickle weights), nothing is checked here and the download path
decides, as before.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from merge_kernels.checkpoints import open_checkpoint
from merge_kernels.checkpoints.base import Checkpoint
from merge_kernels.checkpoints.hub import describe_from_metadata, is_offline
from merge_kernels.checkpoints.reference import (
    CheckpointRef,
    HubRef,
    LoraRef,
    parse_reference,
)
from merge_kernels.plan import PlannedInput, build_plan
from merge_kernels.recipe import ModelReference, Recipe
from merge_kernels.slices import input_references

if TYPE_CHECKING:
    from merge_kernels.runner import MergeOptions


def _reference(value: ModelReference, options: MergeOptions) -> CheckpointRef:
    if isinstance(value, str):
        return parse_reference(
            value, base_dir=options.base_dir, allowed_roots=options.allowed_roots
        )
    return value


def _on_hub(ref: CheckpointRef) -> bool:
    return isinstance(ref, HubRef) or (isinstance(ref, LoraRef) and isinstance(ref.base, HubRef))


def _describe(ref: CheckpointRef, options: MergeOptions) -> Checkpoint | None:
    if isinstance(ref, HubRef):
        return describe_from_metadata(ref, allow_pickle=options.allow_pickle)
    if isinstance(ref, LoraRef) and isinstance(ref.base, HubRef):
        # A LoRA input has its base's tensors; the adapter is checked once downloaded.
        return describe_from_metadata(ref.base, allow_pickle=options.allow_pickle, display=ref)
    return open_checkpoint(
        ref,
        allowed_roots=options.allowed_roots,
        allow_pickle=options.allow_pickle,
        base_dir=options.base_dir,
    )


def _close(inputs: Sequence[PlannedInput]) -> None:
    for item in inputs:
        item.checkpoint.close()


def check_hub_inputs(recipe: Recipe, options: MergeOptions) -> None:
    """Plan the merge from metadata when it has Hub inputs, and raise its problems.

    Args:
        recipe: the validated recipe.
        options: the merge's options (roots, pickle, shard size, output dtype).

    Raises:
        IncompatibleCheckpointsError: the inputs do not fit together; nothing was
            downloaded but configs, shard indexes and safetensors headers.
        CheckpointNotFoundError, UnsafeCheckpointError, CheckpointFileError, TureenError:
            an input is missing, refused or malformed (the errors opening it would give).
    """
    named = input_references(recipe)
    references = [(role, index, _reference(value, options)) for role, index, value in named]
    if not any(_on_hub(ref) for _, _, ref in references):
        return
    try:
        if is_offline():
            return
    except Exception:  # huggingface_hub missing: opening the inputs says so
        return
    inputs: list[PlannedInput] = []
    try:
        for role, index, ref in references:
            checkpoint = _describe(ref, options)
            if checkpoint is None:
                return
            inputs.append(PlannedInput(role, index, checkpoint))
        plan = build_plan(
            recipe,
            inputs,
            max_shard_bytes=options.max_shard_bytes,
            chunk_elements=options.chunk_elements,
            whole_trim_elements=options.whole_trim_elements,
            out_dtype=options.out_dtype,
        )
    finally:
        _close(inputs)
    plan.raise_for_problems()


__all__ = ["check_hub_inputs"]
