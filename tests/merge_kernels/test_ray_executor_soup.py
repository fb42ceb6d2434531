"""The greedy soup with its candidates scored as Ray tasks: the local search's result.

Tiny Llamas (three helpful ingredients, one harmful), the held-out evaluator, and a local
two-node Ray cluster; the driver's own evaluator refuses to run, so every score comes from
a task.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import ray
from ray.cluster_utils import Cluster

from merge_kernels.candidates import Candidate, Score
from merge_kernels.executors.ray_soup import RayScorer, evaluator_gpus
from merge_kernels.greedy_search import SearchResult, search_greedy_soup
from merge_kernels.recipe import parse_recipe
from merge_kernels.runner import MergeOptions, close_inputs, plan_merge
from service.evaluation.config import build_evaluator
from service.evaluation.held_out import HeldOutEvaluator
from tests.service.evaluation.conftest import HARMFUL, HELPFUL
from tests.service.evaluation.soup_models import (
    char_tokenizer,
    perturbed,
    save,
    target_model,
    write_held_out,
)

INGREDIENTS = (*HELPFUL[:3], HARMFUL)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("ray-soup")
    tokenizer = char_tokenizer()
    target = target_model(seed=0)
    write_held_out(target, tokenizer, root / "held_out.jsonl", count=12, seed=1)
    for index, name in enumerate(INGREDIENTS[:-1]):
        save(perturbed(target, 0.3, seed=10 + index), tokenizer, root / name)
    save(perturbed(target, 1.5, seed=99), tokenizer, root / HARMFUL)
    return root


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    started = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 2, "object_store_memory": 80 * 2**20},
    )
    started.add_node(num_cpus=1, object_store_memory=80 * 2**20)
    ray.init(address=started.address)
    started.wait_for_nodes()
    yield started
    ray.shutdown()
    started.shutdown()


def search(
    world: Path, scratch: Path, *, remote: bool, max_ingredients: int | None = None
) -> SearchResult:
    document = {
        "merge_method": "greedy_soup",
        "models": [{"model": str(world / name)} for name in INGREDIENTS],
        "evaluator": {"type": "held_out", "data": str(world / "held_out.jsonl")},
    }
    if max_ingredients is not None:
        document["parameters"] = {"max_ingredients": max_ingredients}
    recipe = parse_recipe(document)
    evaluator = build_evaluator(recipe.evaluator)
    scorer = RayScorer(evaluator) if remote else None
    if remote:

        def here(candidate: Candidate) -> Score:
            raise AssertionError(f"{candidate.label} was scored in the driver")

        evaluator.evaluate = here  # type: ignore[method-assign]  # the tasks have their copy
    plan, inputs = plan_merge(recipe, MergeOptions())
    try:
        return search_greedy_soup(
            plan, evaluator, scratch=scratch, max_ingredients=max_ingredients, score_async=scorer
        )
    finally:
        close_inputs(inputs)


def test_scoring_on_ray_gives_the_local_search(
    cluster: Cluster, world: Path, tmp_path: Path
) -> None:
    # Two of four: the read-ahead of the next ingredient must stop at the limit.
    local = search(world, tmp_path / "local", remote=False, max_ingredients=2)
    remote = search(world, tmp_path / "ray", remote=True, max_ingredients=2)
    assert len(local.kept) == 2
    assert remote.kept == local.kept and remote.order == local.order
    assert [(s.ingredient, s.kept) for s in remote.steps] == [
        (s.ingredient, s.kept) for s in local.steps
    ]
    # The same candidates, scored in processes of another thread count: the forward pass
    # may add in another order.
    ours = [s.value for s in remote.ingredient_scores] + [s.score.value for s in remote.steps]
    theirs = [s.value for s in local.ingredient_scores] + [s.score.value for s in local.steps]
    assert ours == pytest.approx(theirs, rel=1e-5)
    assert remote.bytes_read == local.bytes_read  # the read-ahead reads nothing more
    assert world / HARMFUL not in [Path(local.references[i]) for i in local.kept]


def test_a_cuda_evaluator_asks_for_a_gpu(world: Path) -> None:
    records = build_evaluator(
        parse_recipe(
            {
                "merge_method": "greedy_soup",
                "models": [{"model": str(world / name)} for name in HELPFUL[:2]],
                "evaluator": {"type": "held_out", "data": str(world / "held_out.jsonl")},
            }
        ).evaluator
    )
    assert isinstance(records, HeldOutEvaluator)
    assert evaluator_gpus(records) == 0.0
    assert evaluator_gpus(HeldOutEvaluator(records.records, device="cuda")) == 1.0
