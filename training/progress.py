"""How a training run reports progress and learns that it should stop."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class TrainingProgress:
    """How far a training run has come.

    Attributes:
        phase: ``loading``, ``evaluating``, ``training``, ``saving`` or ``done``.
        step: optimizer steps done.
        total_steps: optimizer steps planned.
        loss: training loss of the last step.
        learning_rate: learning rate of the last step.
        eta_seconds: estimated seconds of training left.
    """

    phase: str
    step: int = 0
    total_steps: int = 0
    loss: float | None = None
    learning_rate: float | None = None
    eta_seconds: float | None = None


ProgressCallback = Callable[[TrainingProgress], None]
StopCheck = Callable[[], bool]


def eta(elapsed: float, done: int, total: int) -> float | None:
    """Seconds left at the pace so far, or None before the first step."""
    if done <= 0:
        return None
    return max(0.0, elapsed / done * (total - done))
