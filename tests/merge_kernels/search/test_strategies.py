"""Strategies: a state saved after any evaluation restores the very same search."""

from __future__ import annotations

import json
import math
from typing import Any

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from merge_kernels.search.space import SearchSpace, StrategyConfig
from merge_kernels.search.strategies import build_strategy, restore_strategy


def space(dimensions: int) -> SearchSpace:
    parameters: dict[str, Any] = {
        "lambda": {"search": {"low": 0.1, "high": 2.0}},
    }
    models = [
        {"model": f"./m{i}", "parameters": {"weight": {"search": {"low": 0.0, "high": 1.0}}}}
        for i in range(dimensions - 1)
    ] or [{"model": "./m0"}]
    document = {"merge_method": "ties", "base_model": "./b", "models": models}
    document["parameters"] = parameters
    return SearchSpace(document)


def objective(unit: list[float]) -> float:
    return sum((u - 0.3 - 0.1 * i) ** 2 for i, u in enumerate(unit))


def run(strategy: Any, steps: int) -> list[tuple[list[float], float]]:
    seen = []
    for _ in range(steps):
        unit = strategy.ask()
        if unit is None:
            break
        score = objective(unit)
        strategy.tell(unit, score)
        seen.append((unit, score))
    return seen


@settings(max_examples=12, deadline=None)
@given(
    name=st.sampled_from(["grid", "random", "cmaes"]),
    dimensions=st.integers(1, 3),
    seed=st.integers(0, 2**16),
    stop=st.integers(0, 14),
)
def test_restored_state_continues_exactly(name: str, dimensions: int, seed: int, stop: int) -> None:
    config = StrategyConfig(name=name)  # type: ignore[arg-type]
    searched = space(dimensions)
    common: dict[str, Any] = {"seed": seed, "budget": 16, "higher_is_better": False}
    whole = run(build_strategy(config, searched, **common), 16)
    first = build_strategy(config, searched, **common)
    head = run(first, stop)
    state = json.loads(json.dumps(first.state()))  # what a state file gives back
    np.random.seed(12345)  # other users of numpy's global generator change nothing
    np.random.random(7)
    restored = restore_strategy(config, searched, state, **common)
    assert head + run(restored, 16 - len(head)) == whole
    for unit, _ in whole:
        assert len(unit) == dimensions and all(0.0 <= u <= 1.0 for u in unit)


def test_the_grid_fits_the_budget_and_covers_both_ends() -> None:
    strategy = build_strategy(
        StrategyConfig(name="grid"), space(2), seed=0, budget=10, higher_is_better=False
    )
    points = run(strategy, 100)
    assert len(points) == 9  # 3 × 3: a fourth level per dimension would need 16
    assert sorted({p[0][0] for p in points}) == [0.0, 0.5, 1.0]


def test_cmaes_improves_on_its_first_generation_and_handles_failed_points() -> None:
    config = StrategyConfig(name="cmaes", popsize=6)
    strategy = build_strategy(config, space(3), seed=1, budget=60, higher_is_better=False)
    scores = []
    for step in range(60):
        unit = strategy.ask()
        assert unit is not None
        score = math.nan if step == 2 else objective(unit)
        strategy.tell(unit, score)
        scores.append(score)
    finite = [s for s in scores if not math.isnan(s)]
    assert min(finite[-6:]) < min(finite[:6]) / 10


def test_cmaes_maximises_when_higher_is_better() -> None:
    config = StrategyConfig(name="cmaes")
    strategy = build_strategy(config, space(2), seed=3, budget=48, higher_is_better=True)
    scores = []
    for _ in range(48):
        unit = strategy.ask()
        assert unit is not None
        scores.append(-objective(unit))
        strategy.tell(unit, scores[-1])
    assert max(scores[-6:]) > max(scores[:6])
