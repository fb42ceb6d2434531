"""The errors training raises for bad input, each with a stable code, as merges do."""

from __future__ import annotations

from collections.abc import Mapping

from merge_kernels.errors import DetailValue, TureenError


class TrainingConfigError(TureenError):
    """The training config is invalid: ``details['field']`` names the offending key."""

    code = "invalid_training_config"

    def __init__(
        self, field: str, message: str, *, details: Mapping[str, DetailValue] | None = None
    ) -> None:
        super().__init__(f"{field}: {message}", details={"field": field, **(details or {})})
        self.field = field


class TrainingDataError(TureenError):
    """A training or held-out data file is missing, malformed or of the wrong kind."""

    code = "invalid_training_data"


class TrainingCancelledError(TureenError):
    """The training was cancelled by its caller; no adapter was published."""

    code = "cancelled"
