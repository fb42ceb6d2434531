"""``tureen demo`` end to end: trainings and merges through the real service, then scores."""

from __future__ import annotations

import io
import math
from pathlib import Path

import pytest

from service.demo import DPO_TASK, SFT_TASKS, run_demo


@pytest.mark.slow
def test_the_demo_trains_merges_and_scores_everything(tmp_path: Path) -> None:
    out = io.StringIO()
    table = run_demo(tmp_path / "demo", steps=15, out=out)
    merges = ["uniform soup", "TIES (d=0.5)", "DARE-TIES (d=0.5)", "greedy soup"]
    ingredients = [*SFT_TASKS, f"dpo-{DPO_TASK}"]
    assert list(table) == ["base", *ingredients, *merges]
    assert all(math.isfinite(v) for row in table.values() for v in row.values())
    for task in SFT_TASKS:  # each adapter learned its own task
        assert table[task][task] < table["base"][task]
    printed = out.getvalue()
    assert "trained dpo-title" in printed and "8 merges done through the API" in printed
    assert "Greedy soup" in printed
