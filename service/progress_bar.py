"""The ``tureen merge`` progress bar on stderr: percent, tensors, phase and time left."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import TextIO

from merge_kernels.runner import Progress

#: The estimate waits this long after the first merged tensor, so one fast tensor cannot
#: promise a finish in no time (the API's estimate waits as long).
ETA_WARMUP_S = 1.0


def format_eta(seconds: float) -> str:
    """``42s``, ``3m05s`` or ``1h02m``."""
    whole = round(seconds)
    if whole < 60:
        return f"{whole}s"
    if whole < 3600:
        return f"{whole // 60}m{whole % 60:02d}s"
    return f"{whole // 3600}h{whole % 3600 // 60:02d}m"


class ProgressBar:
    """A progress callback for :func:`merge_kernels.runner.run_merge` drawing one line.

    The time left is estimated from the rate since the first tensor merged in this run, so
    shards resumed from an earlier attempt do not make it optimistic.

    Args:
        stream: where the line goes (stderr by default).
        clock: seconds from a monotonic clock (for tests).
    """

    def __init__(
        self, stream: TextIO | None = None, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.clock = clock
        self.last = -1
        self._rate_start: tuple[float, int] | None = None

    def eta_seconds(self, progress: Progress, now: float) -> float | None:
        """Seconds left at the rate measured so far; None until the rate is known."""
        if self._rate_start is None:
            return None
        started, bytes_at_start = self._rate_start
        elapsed = now - started
        done = progress.bytes_done - bytes_at_start
        if elapsed < ETA_WARMUP_S or done <= 0:
            return None
        return max(0.0, (progress.bytes_total - progress.bytes_done) * elapsed / done)

    def __call__(self, progress: Progress) -> None:
        """Redraw the line for ``progress`` (at most once per percent while merging)."""
        if progress.phase == "evaluating":
            print(f"\r{(progress.current or 'evaluating')[:78]:<78}", end="", file=self.stream)
            return
        now = self.clock()
        if self._rate_start is None and progress.current is not None:
            self._rate_start = (now, progress.bytes_done)
        total = max(1, progress.bytes_total)
        percent = int(100 * progress.bytes_done / total)
        if percent == self.last and progress.phase == "merging":
            return
        self.last = percent
        filled = percent // 4
        eta = self.eta_seconds(progress, now) if progress.phase == "merging" else None
        eta_text = f"  eta {format_eta(eta)}" if eta is not None else ""
        line = (
            f"\r[{'#' * filled}{'.' * (25 - filled)}] {percent:3d}% "
            f"{progress.tensors_done}/{progress.tensors_total} tensors  {progress.phase}"
            f"{eta_text}   "
        )
        print(line, end="", file=self.stream, flush=True)
