"""The ``tureen merge`` progress bar's estimate of time left."""

from __future__ import annotations

import io

from merge_kernels.runner import Progress
from service.progress_bar import ProgressBar, format_eta


class _Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def _merging(done: int, total: int = 1000) -> Progress:
    return Progress(
        tensors_done=done // 100,
        tensors_total=10,
        bytes_done=done,
        bytes_total=total,
        current=f"t{done}",
    )


def test_the_bar_shows_time_left_from_the_rate_so_far() -> None:
    stream, clock = io.StringIO(), _Clock()
    bar = ProgressBar(stream, clock=clock)
    bar(_merging(200))  # resumed work before the rate starts counting
    assert "eta" not in stream.getvalue()
    clock.now += 4.0
    bar(_merging(400))  # 200 bytes in 4 s: 600 left take 12 s
    assert stream.getvalue().rstrip().endswith("40% 4/10 tensors  merging  eta 12s")


def test_no_estimate_before_a_second_has_passed() -> None:
    stream, clock = io.StringIO(), _Clock()
    bar = ProgressBar(stream, clock=clock)
    bar(_merging(0))
    clock.now += 0.2
    bar(_merging(500))
    assert "eta" not in stream.getvalue()


def test_format_eta() -> None:
    assert [format_eta(s) for s in (0.4, 42, 185, 3720)] == ["0s", "42s", "3m05s", "1h02m"]
