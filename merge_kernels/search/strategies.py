"""Search strategies over the unit cube: grid, random and CMA-ES.

Each strategy proposes points (``ask``), learns their scores (``tell``) and has a JSON-able
``state()`` that :func:`restore_strategy` turns back into the same strategy, so a search
stopped after any evaluation continues exactly as if it had never stopped.

* ``grid``: the Cartesian product of each dimension's levels, in order; a range gets ``k``
  evenly spaced levels (ends included) with ``k`` the largest number whose product with the
  list dimensions' sizes fits the budget.
* ``random``: uniform points from a seeded :class:`numpy.random.Generator`; its bit
  generator's state is the strategy's state.
* ``cmaes``: Hansen's CMA-ES from the ``cma`` package (the optimiser mergekit-evolve uses),
  in the unit cube with bounds, minimising (scores whose higher is better are negated). Its
  normal samples come from a seeded Generator, so the ES is a pure function of the seed and
  the scores told: the state is the told history, and a restore replays it. No pickle: a
  state file is data, never code.
"""

from __future__ import annotations

import itertools
import math
import warnings
from collections.abc import Sequence
from typing import Any, Protocol

import numpy as np

from merge_kernels.errors import RecipeError
from merge_kernels.search.space import SearchSpace, StrategyConfig

Unit = list[float]
# What a failed (NaN) score counts as for CMA-ES, which needs a number: worse than any.
_FAILED_PENALTY = 1e30


class Strategy(Protocol):
    """Proposes points of the unit cube and learns their scores."""

    name: str

    def ask(self) -> Unit | None:
        """The next point to score, or None when the strategy has nothing more to try."""
        ...

    def tell(self, unit: Unit, score: float) -> None:
        """The score of a point ``ask`` returned (NaN: it failed)."""
        ...

    def state(self) -> dict[str, Any]:
        """JSON-able state, for :func:`restore_strategy`."""
        ...


class GridStrategy:
    """Every point of a grid, in order."""

    name = "grid"

    def __init__(self, space: SearchSpace, budget: int) -> None:
        lists = [d.spec for d in space.dimensions if d.spec.is_list]
        ranges = len(space.dimensions) - len(lists)
        fixed = math.prod(len(d.values or ()) for d in lists)
        count = 1
        if ranges:
            while (count + 1) ** ranges * fixed <= budget:
                count += 1
        self.levels = [d.spec.levels(count) for d in space.dimensions]
        self.size = math.prod(len(levels) for levels in self.levels)
        self.next = 0

    def ask(self) -> Unit | None:
        if self.next >= self.size:
            return None
        point = next(itertools.islice(itertools.product(*self.levels), self.next, None))
        self.next += 1
        return list(point)

    def tell(self, unit: Unit, score: float) -> None:
        pass

    def state(self) -> dict[str, Any]:
        return {"next": self.next, "size": self.size}


class RandomStrategy:
    """Uniform points from a seeded generator."""

    name = "random"

    def __init__(self, dimensions: int, seed: int) -> None:
        self.dimensions = dimensions
        self.rng = np.random.default_rng(seed)

    def ask(self) -> Unit | None:
        return [float(x) for x in self.rng.random(self.dimensions)]

    def tell(self, unit: Unit, score: float) -> None:
        pass

    def state(self) -> dict[str, Any]:
        return {"bit_generator": self.rng.bit_generator.state}


class CmaesStrategy:
    """CMA-ES (``cma.CMAEvolutionStrategy``) over the unit cube, one point at a time."""

    name = "cmaes"

    def __init__(
        self,
        dimensions: int,
        seed: int,
        *,
        sigma0: float,
        popsize: int | None,
        higher_is_better: bool,
    ) -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # cma warns when matplotlib is missing
            import cma
        self.seed = seed
        self.sign = -1.0 if higher_is_better else 1.0
        self._rng = np.random.default_rng(seed)
        options: dict[str, Any] = {
            "bounds": [0.0, 1.0],
            "seed": seed + 1,  # cma seeds numpy's global generator with it; never 0 (= time)
            "randn": self._randn,
            "verbose": -9,
            "verb_log": 0,
            "verb_disp": 0,
            "tolfun": 0,
            "tolx": 0,
            "tolstagnation": 10**9,
            "tolflatfitness": 10**9,
        }
        if popsize is not None:
            options["popsize"] = popsize
        x0 = [0.5] * dimensions
        if dimensions == 1:
            # cma refuses one dimension; a second, ignored coordinate makes it two.
            x0 = [0.5, 0.5]
        self.dimensions = dimensions
        self.es = cma.CMAEvolutionStrategy(x0, sigma0, options)
        self.population: list[Unit] = []
        self.scores: list[float | None] = []
        self.history: list[tuple[Unit, float]] = []

    def _randn(self, *shape: int) -> Any:
        return self._rng.standard_normal(shape)

    def _new_population(self) -> None:
        self.population = [[float(x) for x in solution] for solution in self.es.ask()]
        self.scores = [None] * len(self.population)

    def ask(self) -> Unit | None:
        if not self.population or all(s is not None for s in self.scores):
            self._new_population()
        index = self.scores.index(None)
        return self.population[index][: self.dimensions]

    def tell(self, unit: Unit, score: float) -> None:
        index = self.scores.index(None)
        if list(unit) != self.population[index][: self.dimensions]:
            raise ValueError("cmaes: told a point it did not ask for")
        self.history.append((list(unit), score))
        value = self.sign * score if math.isfinite(score) else _FAILED_PENALTY
        self.scores[index] = value
        if all(s is not None for s in self.scores):
            solutions = [np.asarray(p) for p in self.population]
            self.es.tell(solutions, [float(s) for s in self.scores if s is not None])

    def state(self) -> dict[str, Any]:
        return {"told": [[u, _json_float(s)] for u, s in self.history]}


def _json_float(value: float) -> float | None:
    return value if math.isfinite(value) else None


def build_strategy(
    config: StrategyConfig,
    space: SearchSpace,
    *,
    seed: int,
    budget: int,
    higher_is_better: bool,
) -> GridStrategy | RandomStrategy | CmaesStrategy:
    """A fresh strategy."""
    dimensions = len(space.dimensions)
    if config.name == "grid":
        return GridStrategy(space, budget)
    if config.name == "random":
        return RandomStrategy(dimensions, seed)
    return CmaesStrategy(
        dimensions,
        seed,
        sigma0=config.sigma0,
        popsize=config.popsize,
        higher_is_better=higher_is_better,
    )


def restore_strategy(
    config: StrategyConfig,
    space: SearchSpace,
    state: dict[str, Any],
    *,
    seed: int,
    budget: int,
    higher_is_better: bool,
) -> GridStrategy | RandomStrategy | CmaesStrategy:
    """The strategy whose ``state()`` was ``state``.

    Raises:
        RecipeError: (field ``state``) the state does not fit this strategy.
    """
    strategy = build_strategy(
        config, space, seed=seed, budget=budget, higher_is_better=higher_is_better
    )
    try:
        if isinstance(strategy, GridStrategy):
            strategy.next = int(state["next"])
        elif isinstance(strategy, RandomStrategy):
            strategy.rng.bit_generator.state = state["bit_generator"]
        else:
            _replay(strategy, state["told"])
    except (KeyError, TypeError, ValueError) as error:
        raise RecipeError(
            "state", f"the saved {config.name} state does not fit this search ({error})"
        ) from None
    return strategy


def _replay(strategy: CmaesStrategy, told: Sequence[Sequence[Any]]) -> None:
    """Ask and tell again every recorded point: the same seed proposes the same points."""
    for unit, score in told:
        asked = strategy.ask()
        if asked is None or not np.allclose(asked, unit, rtol=0, atol=1e-12):
            raise ValueError("the replayed points differ from the recorded ones")
        strategy.tell(asked, float("nan") if score is None else float(score))
