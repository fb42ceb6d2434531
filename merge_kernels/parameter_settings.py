"""Parameter values that vary by tensor: gradients across layers and filtered lists.

A recipe parameter may be
- a scalar: ``density: 0.2``;
- a gradient: ``t: [0, 0.5, 1]``, interpolated linearly across the layers (a list of
  strings or booleans is stepped instead);
- a filtered list: ``[{filter: self_attn, value: 0.3}, {value: 0.5}]``; the first entry
  whose filter is a substring of the tensor name (or is absent or ``*``) gives the value.

This follows mergekit's ``evaluate_setting``, so mergekit configs mean the same here.

Every number written must be finite (``NaN``, ``Infinity``, ``1e999`` and YAML's ``.nan``
and ``.inf`` are refused wherever they appear), and a list must not be empty.
"""

from __future__ import annotations

import math
import re
from typing import Annotated, Any

from pydantic import (
    BaseModel,
    ConfigDict,
    ValidationError,
    ValidatorFunctionWrapHandler,
    WrapValidator,
)
from pydantic_core import PydanticCustomError

from merge_kernels.methods.kernel import Reference

Scalar = bool | int | float | str
Gradient = list[Scalar]

_SETTING_FORMS = (
    "give a number, a string, a boolean, a gradient [first, ..., last] or a filtered "
    "list [{filter: ..., value: ...}]"
)

_OWN_ERRORS = ("empty_setting", "invalid_setting", "non_finite_number")


def _check_setting(value: Any, handler: ValidatorFunctionWrapHandler) -> Any:
    """Validate one parameter value, with a message saying what is wrong and what is allowed.

    The plain union's own error reports its first branch ("Input should be a valid
    boolean") whatever the value was; here a non-finite number, an empty list and a value
    of no accepted form are each named.
    """
    _refuse_non_finite(value)
    if isinstance(value, list) and not value:
        raise PydanticCustomError(
            "empty_setting", "an empty list is not a value; " + _SETTING_FORMS
        )
    try:
        return handler(value)
    except ValidationError as error:
        for problem in error.errors():
            if problem["type"] in _OWN_ERRORS:  # from a filtered list's entry: keep it
                raise PydanticCustomError(problem["type"], problem["msg"]) from None
        raise PydanticCustomError(
            "invalid_setting",
            "{value} is not a parameter value; " + _SETTING_FORMS,
            {"value": repr(value)},
        ) from None


def _refuse_non_finite(value: Any) -> None:
    if isinstance(value, float) and not math.isfinite(value):
        raise PydanticCustomError(
            "non_finite_number",
            "must be a finite number, got {value} (NaN and infinities are not parameter values)",
            {"value": str(value)},
        )
    if isinstance(value, list):
        for entry in value:
            _refuse_non_finite(entry)
    elif isinstance(value, dict):
        _refuse_non_finite(value.get("value"))


class ConditionalSetting(BaseModel):
    """One entry of a filtered list."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    filter: str | None = None
    value: Annotated[Scalar | Gradient, WrapValidator(_check_setting)]


ParameterSetting = Annotated[
    Scalar | list[ConditionalSetting] | Gradient, WrapValidator(_check_setting)
]
Parameters = dict[str, ParameterSetting]

_LAYER_PATTERN = re.compile(r"(?:^|\.)(?:layers|h|blocks|layer)\.(\d+)\.")
_EMBEDDING_PATTERN = re.compile(r"embed|wte|wpe|word_embeddings")


def layer_index(tensor_name: str) -> int | None:
    """The transformer block a tensor belongs to (``model.layers.3.mlp...`` → 3), if any."""
    match = _LAYER_PATTERN.search(tensor_name)
    return int(match.group(1)) if match else None


def layer_position(tensor_name: str, num_layers: int, reference: Reference = "peft") -> float:
    """Where a tensor sits in the stack, from 0 (first block) to 1 (last): the ``t`` at which
    a gradient is evaluated for it.

    Block i of L sits at i / (L − 1), and a single block at 1, as in mergekit. A tensor
    outside the blocks sits where it acts: at 0 when it comes before them (embeddings) and at
    1 otherwise (final norm, LM head), which is also what mergekit did until its
    multi-module planner (March 2025). With ``reference: mergekit`` every tensor outside the
    blocks sits at 0, as mergekit 0.1.5 plans its pre- and post-block weights with t = 0.
    """
    index = layer_index(tensor_name)
    if index is None:
        if reference == "mergekit":
            return 0.0
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
    numbers = [
        float(entry)
        for entry in values
        if isinstance(entry, int | float) and not isinstance(entry, bool)
    ]
    if len(numbers) == len(values):
        scaled = t * (len(numbers) - 1)
        lower = int(scaled)
        upper = min(len(numbers) - 1, lower + 1)
        fraction = scaled - lower
        return (1 - fraction) * numbers[lower] + fraction * numbers[upper]
    return values[int(t * (len(values) - 1))]
