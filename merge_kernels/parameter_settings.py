"""Parameter values that vary by tensor: gradients across layers and filtered lists.

A recipe parameter may be
- a scalar: ``density: 0.2``;
- a gradient: ``t: [0, 0.5, 1]``, interpolated linearly across the layers (a list of
  strings or booleans is stepped instead);
- a filtered list: ``[{filter: self_attn, value: 0.3}, {value: 0.5}]``; the first entry
  whose filter is a substring of the tensor name (or is absent or ``*``) gives the value.

This follows mergekit's ``evaluate_setting``, so mergekit configs mean the same here.
"""

from __future__ import annotations

import re

from pydantic import BaseModel, ConfigDict

Scalar = bool | int | float | str
Gradient = list[Scalar]


class ConditionalSetting(BaseModel):
    """One entry of a filtered list."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    filter: str | None = None
    value: Scalar | Gradient


ParameterSetting = Scalar | list[ConditionalSetting] | Gradient
Parameters = dict[str, ParameterSetting]

_LAYER_PATTERN = re.compile(r"(?:^|\.)(?:layers|h|blocks|layer)\.(\d+)\.")
_EMBEDDING_PATTERN = re.compile(r"embed|wte|wpe|word_embeddings")


def layer_index(tensor_name: str) -> int | None:
    """The transformer block a tensor belongs to (``model.layers.3.mlp...`` → 3), if any."""
    match = _LAYER_PATTERN.search(tensor_name)
    return int(match.group(1)) if match else None


def layer_position(tensor_name: str, num_layers: int) -> float:
    """Where a tensor sits in the stack, from 0 (first block) to 1 (last), as mergekit does.

    Block i of L sits at i / (L − 1). Tensors outside the blocks sit at 0 when they come
    before them (embeddings) and at 1 otherwise (final norm, LM head).
    """
    index = layer_index(tensor_name)
    if index is None:
        return 0.0 if _EMBEDDING_PATTERN.search(tensor_name) else 1.0
    if num_layers <= 1:
        return 1.0
    return min(1.0, index / (num_layers - 1))


def evaluate_setting(setting: ParameterSetting, tensor_name: str, t: float) -> Scalar | None:
    """The value of ``setting`` for the tensor ``tensor_name`` at layer position ``t``.

    Returns:
        The scalar value, or None when no entry of a filtered list matches the tensor (the
        caller then falls back to the next level: model, slice, recipe, default).
    """
    if not isinstance(setting, list):
        return setting
    if not setting:
        return None
    conditions = [entry for entry in setting if isinstance(entry, ConditionalSetting)]
    if conditions:
        for entry in conditions:
            if entry.filter in (None, "*") or entry.filter in tensor_name:
                return evaluate_setting(entry.value, tensor_name, t)
        return None
    values = [entry for entry in setting if not isinstance(entry, ConditionalSetting)]
    numbers = [float(entry) for entry in values if isinstance(entry, int | float)]
    if len(numbers) == len(values):
        scaled = t * (len(numbers) - 1)
        lower = int(scaled)
        upper = min(len(numbers) - 1, lower + 1)
        fraction = scaled - lower
        return (1 - fraction) * numbers[lower] + fraction * numbers[upper]
    return values[int(t * (len(values) - 1))]
