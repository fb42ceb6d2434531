"""Scores over several seed sets: mean ± standard deviation, and the noise of a comparison.

Two sources of noise are stated separately and then combined:

* the seed sets: every seed set retrains the four task adapters (and reseeds DARE's masks),
  reruns the validation choice and the merge; the sample standard deviation over the seed
  sets is shown beside each mean;
* the finite test split: a score of ``p`` on ``n`` examples has the binomial 95 % half-width
  1.96 √(p (1 − p) / n). Every seed set is scored on the same test examples, so this does
  not shrink with more seed sets.

A difference of means against a reference row (TIES) counts as beyond the noise when it
exceeds 1.96 √(SE²_seeds + SE²_a + SE²_b): SE_seeds the standard error of the per-seed-set
differences (paired when both rows ran on the same seed sets), SE_a and SE_b the binomial
standard errors of the two averages over every test example. Treating the two models'
test errors as independent overstates the test noise of a paired comparison, so the rule is
conservative.
"""

from __future__ import annotations

import math
from statistics import mean, stdev
from typing import Any

METRICS = ("exact_match", "token_accuracy", "loss")
Z95 = 1.96


def spread(values: list[float]) -> float | None:
    """The sample standard deviation; None for fewer than two values."""
    return stdev(values) if len(values) > 1 else None


def binomial_half_width(p: float, n: int) -> float:
    """The normal-approximation 95 % half-width of a proportion ``p`` measured on ``n``."""
    return Z95 * math.sqrt(max(p * (1.0 - p), 0.0) / n)


def _average(scores: dict[str, dict[str, float]]) -> dict[str, float]:
    return {metric: mean(task[metric] for task in scores.values()) for metric in METRICS}


def aggregate(name: str, kind: str, runs: list[dict[str, Any]], tasks: list[str]) -> dict[str, Any]:
    """One table row from its runs (one per seed set: ``seed``, ``parameters``, ``scores``).

    ``scores`` and ``average`` hold the means over the runs (the average is the mean over
    tasks of each run, then over the runs); ``std`` and ``average_std`` the sample standard
    deviations (None with one run).
    """
    for run in runs:
        run["average"] = _average(run["scores"])
    scores = {
        task: {metric: mean(run["scores"][task][metric] for run in runs) for metric in METRICS}
        for task in tasks
    }
    std = {
        task: {metric: spread([run["scores"][task][metric] for run in runs]) for metric in METRICS}
        for task in tasks
    }
    return {
        "name": name,
        "kind": kind,
        "parameters": [run["parameters"] for run in runs],
        "seeds": [run["seed"] for run in runs],
        "scores": scores,
        "std": std,
        "average": {metric: mean(run["average"][metric] for run in runs) for metric in METRICS},
        "average_std": {
            metric: spread([run["average"][metric] for run in runs]) for metric in METRICS
        },
        "runs": runs,
    }


def versus(row: dict[str, Any], reference: dict[str, Any], examples: int) -> dict[str, Any]:
    """Average exact match of ``row`` minus ``reference``'s, and whether it beats the noise.

    ``examples`` is the number of test examples behind one average (every task's test split).
    """
    a = [run["average"]["exact_match"] for run in row["runs"]]
    b = [run["average"]["exact_match"] for run in reference["runs"]]
    paired = row["seeds"] == reference["seeds"]
    if paired:
        differences = [x - y for x, y in zip(a, b, strict=True)]
        seed_sd = spread(differences)
        seed_se2 = 0.0 if seed_sd is None else seed_sd**2 / len(differences)
    else:
        seed_se2 = sum(
            (spread(values) or 0.0) ** 2 / len(values) for values in (a, b) if len(values) > 1
        )
    difference = mean(a) - mean(b)
    test_se2 = sum(
        max(p * (1 - p), 0.0) / examples for p in (row["average"]["exact_match"], mean(b))
    )
    noise = Z95 * math.sqrt(seed_se2 + test_se2)
    return {
        "difference": difference,
        "noise": noise,
        "beyond_noise": abs(difference) > noise,
        "paired": paired,
    }
