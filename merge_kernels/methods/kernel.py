"""What every merge kernel receives: the input tensors, their parameters and the tensor context.

A kernel is a pure function ``(MergeInputs, params, TensorContext) -> Tensor`` on float32
tensors. It never touches files, global random state or other tensors; everything that can
differ between tensors (parameter gradients, DARE seeds, chunk offsets, thresholds computed
in an earlier pass) arrives through these three values.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, get_args

import torch
from pydantic import BaseModel, ConfigDict, ValidationInfo, field_validator
from pydantic_core import PydanticCustomError

from merge_kernels.methods.magnitude_select import MagnitudeThreshold

Reference = Literal["peft", "mergekit", "paper"]
"""Whose numbers a method reproduces when an option is left unset (see the method modules)."""


_PARAMS_CONFIG = ConfigDict(frozen=True, extra="forbid", populate_by_name=True, allow_inf_nan=False)


class _NumericParams(BaseModel):
    """Numbers are finite (``"nan"``/``"inf"`` strings too are refused) and not booleans."""

    model_config = _PARAMS_CONFIG

    @field_validator("*", mode="before")
    @classmethod
    def _no_boolean_numbers(cls, value: Any, info: ValidationInfo) -> Any:
        if isinstance(value, bool) and info.field_name is not None:
            annotation = cls.model_fields[info.field_name].annotation
            if annotation is not bool and bool not in get_args(annotation):
                raise PydanticCustomError(
                    "bool_not_number",
                    "give a number, not the boolean {value}",
                    {"value": str(value).lower()},
                )
        return value


class MethodParams(_NumericParams):
    """Parameters that apply to the whole merge of one tensor (``normalize``, ``lambda``...)."""

    model_config = _PARAMS_CONFIG


class ModelParams(_NumericParams):
    """Parameters given per input model (``weight``, ``density``...)."""

    model_config = _PARAMS_CONFIG


class NoModelParams(ModelParams):
    """For methods that take no per-model parameters."""


@dataclass(frozen=True)
class MergeInputs:
    """The float32 tensors to merge, all of one shape, on one device.

    Attributes:
        base: the base model's tensor (θ₀), or None for methods without a base.
        models: the other inputs (θ₁…θₙ), in recipe order, never including the base.
        model_params: one parameter set per entry of ``models``.
    """

    base: torch.Tensor | None
    models: Sequence[torch.Tensor]
    model_params: Sequence[ModelParams]

    def __post_init__(self) -> None:
        if len(self.models) != len(self.model_params):
            raise ValueError(
                f"{len(self.models)} model tensors but {len(self.model_params)} parameter sets"
            )


@dataclass(frozen=True)
class TrimState:
    """A trim threshold computed before the kernel runs, for one model.

    Used when the threshold is not the kernel's to find: the TIES paper's model-wide trim,
    or a tensor too large to trim in one piece and so merged in row chunks.

    Attributes:
        threshold: the exact k-th largest magnitude over the whole scope and the tie rule.
        ties_before: how many entries equal to the threshold came before this chunk in the
            scope's flat order (decides which tied entries ``exact_k`` keeps). Exact up to
            ``threshold.keep_at_value``; past it any larger count means the same (no tied
            entry of the chunk is kept), and a pre-pass may stop counting there.
    """

    threshold: MagnitudeThreshold
    ties_before: int = 0


@dataclass(frozen=True)
class TensorContext:
    """Where the tensor (or chunk) being merged sits.

    Attributes:
        name: the output tensor's name (part of every DARE mask's key).
        seed: the recipe's seed.
        model_indices: each model's position in the recipe, so a mask depends on the model
            and not on which models happen to be present for this tensor.
        offset: flat index of this chunk's first element within the whole tensor.
        trims: precomputed trim thresholds, one per model, or None to trim this tensor alone.
    """

    name: str
    seed: int = 0
    model_indices: tuple[int, ...] = ()
    offset: int = 0
    trims: tuple[TrimState, ...] | None = field(default=None)

    def model_index(self, position: int) -> int:
        """The recipe index of the model at ``position`` in :class:`MergeInputs.models`."""
        return self.model_indices[position] if self.model_indices else position
