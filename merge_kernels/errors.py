"""The errors tureen raises for bad input, each with a stable code.

Every error says what was wrong and how to fix it. ``details`` carries machine-readable
context (the recipe field, the tensor, the file) that the service returns to clients.
"""

from __future__ import annotations

from collections.abc import Mapping

DetailValue = str | int | float | bool | None | list[str] | list[int]


class TureenError(Exception):
    """Base class of every error that is the input's fault rather than a bug."""

    code = "tureen_error"

    def __init__(self, message: str, *, details: Mapping[str, DetailValue] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.details: dict[str, DetailValue] = dict(details or {})


class RecipeError(TureenError):
    """The merge recipe is invalid: ``details['field']`` names the offending key."""

    code = "invalid_recipe"

    def __init__(
        self, field: str, message: str, *, details: Mapping[str, DetailValue] | None = None
    ) -> None:
        super().__init__(f"{field}: {message}", details={"field": field, **(details or {})})
        self.field = field


class IncompatibleCheckpointsError(TureenError):
    """The inputs cannot be merged together (missing tensors, shapes, dtypes, vocab)."""

    code = "incompatible_checkpoints"

    def __init__(self, problems: list[str]) -> None:
        shown = "; ".join(problems[:20])
        more = f" (and {len(problems) - 20} more)" if len(problems) > 20 else ""
        super().__init__(
            f"the checkpoints cannot be merged: {shown}{more}",
            details={"problems": problems},
        )
        self.problems = problems


class CheckpointFileError(TureenError):
    """A checkpoint file is unreadable, truncated or lies about its contents."""

    code = "bad_checkpoint_file"


class UnsafeCheckpointError(CheckpointFileError):
    """A pickle-based checkpoint was refused because loading it could run code."""

    code = "unsafe_checkpoint"


class CheckpointNotFoundError(TureenError):
    """A referenced checkpoint, file or revision does not exist."""

    code = "not_found"


class MergeCancelledError(TureenError):
    """The merge was cancelled by its caller; nothing was published."""

    code = "cancelled"


class EvaluationError(TureenError):
    """An evaluator could not score a candidate (bad data, unreachable server, bad answer)."""

    code = "evaluation_failed"


class NonFiniteOutputError(TureenError):
    """A merged tensor holds NaN or infinities: ``details['tensor']`` names it.

    Raised while the merge streams, before the output is published, unless the recipe sets
    ``allow_non_finite``.
    """

    code = "non_finite_output"


class InsufficientSpaceError(TureenError):
    """A disk has too little free space for what must be written to it."""

    code = "insufficient_space"
