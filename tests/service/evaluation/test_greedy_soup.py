"""Greedy soup end to end on tiny Llamas: the search, the written soup, the report."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from safetensors.torch import load_file

from merge_kernels.candidates import Candidate, Score
from merge_kernels.errors import MergeCancelledError, RecipeError
from merge_kernels.evaluated_merge import run_evaluated_merge, scratch_folder
from merge_kernels.recipe import parse_recipe
from merge_kernels.runner import MergeOptions, Progress
from service.cli import main as cli
from service.evaluation.config import build_evaluator
from tests.service.evaluation.conftest import HARMFUL, HELPFUL, SoupWorld


def soup(world: SoupWorld, out: Path, **kwargs: Any) -> tuple[dict[str, Any], Path]:
    recipe = parse_recipe(world.recipe(**kwargs.pop("extra", {})))
    evaluator = kwargs.pop("evaluator", None) or build_evaluator(recipe.evaluator)
    options = MergeOptions(overwrite=kwargs.pop("overwrite", False))
    scored = run_evaluated_merge(recipe, out, evaluator, options, **kwargs)
    return scored.report, scored.result.out_dir


def test_helpful_ingredients_are_kept_and_the_harmful_one_rejected(
    soup_world: SoupWorld, tmp_path: Path
) -> None:
    events: list[Progress] = []
    report, out = soup(soup_world, tmp_path / "soup", progress=events.append)
    names = {str(soup_world.root / n): n for n in (*HELPFUL, HARMFUL)}
    kept = [names[ref] for ref in report["kept"]]
    assert HARMFUL not in kept
    assert len(kept) >= 3
    # Scores alone, in recipe order, then the best-first order they were tried in.
    scores = {names[row["reference"]]: row["score"] for row in report["ingredients"]}
    assert [names[r] for r in report["order"]] == sorted(scores, key=lambda n: scores[n])
    assert names[report["order"][-1]] == HARMFUL
    harmful_step = next(s for s in report["steps"] if names[s["ingredient"]] == HARMFUL)
    assert harmful_step["kept"] is False
    assert harmful_step["candidate_score"] > report["soup_score"]
    # Every step is reported; a kept step improved on the best so far (loss: lower).
    assert len(report["steps"]) == len(HELPFUL)
    best = report["best_single"]["score"]
    for step in report["steps"]:
        assert step["kept"] == (step["candidate_score"] < best)
        best = min(best, step["candidate_score"]) if step["kept"] else best
    assert report["best_single"]["score"] == min(scores.values())
    assert report["final_score"] <= report["best_single"]["score"]
    assert report["beats_best_single"] is True
    assert report["final_score"] == pytest.approx(report["soup_score"], rel=1e-3)
    # O(N) reads: each ingredient once to score it, once to build the soup.
    assert report["bytes_read"] == 2 * len(scores) * report["model_bytes"]
    assert report["evaluations"] == len(scores) + len(report["steps"]) + 1
    assert report["in_memory"] is True
    assert any(e.phase == "evaluating" and "soup step" in (e.current or "") for e in events)

    # The written soup is the uniform average of the kept ingredients.
    merged = load_file(out / "model.safetensors")
    parts = [load_file(soup_world.root / n / "model.safetensors") for n in kept]
    for name, tensor in merged.items():
        expected = sum(p[name] for p in parts) / len(parts)
        torch.testing.assert_close(tensor, expected, rtol=1e-6, atol=1e-6)
    assert json.loads((out / "evaluation.json").read_text()) == report
    card = (out / "README.md").read_text()
    assert "## Evaluation" in card and "greedy soup (" in card
    assert yaml.safe_load((out / "tureen_recipe.yaml").read_text())["merge_method"] == "greedy_soup"
    assert not scratch_folder(out).exists()
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(out)


class Table:
    """An evaluator that reads each candidate's score from a table of its ingredients."""

    name = "table"
    higher_is_better = True

    def __init__(self, table: dict[frozenset[str], float]) -> None:
        self.table = table
        self.seen: list[tuple[str, ...]] = []
        self.in_memory: list[bool] = []

    def evaluate(self, candidate: Candidate) -> Score:
        names = frozenset(Path(i).name for i in candidate.ingredients)
        self.seen.append(tuple(sorted(names)))
        self.in_memory.append(candidate.in_memory)
        candidate.tensors()  # a real evaluator reads the candidate
        return Score(self.table.get(names, 0.0))


def table_for_ties() -> dict[frozenset[str], float]:
    one = {frozenset({n}): s for n, s in zip((*HELPFUL, HARMFUL), (5, 4, 3, 2, 1), strict=True)}
    return {
        **one,
        frozenset({"ing0", "ing1"}): 5.0,  # equal to the best: kept only under ">="
        frozenset({"ing0", "ing2"}): 6.0,
        frozenset({"ing0", "ing1", "ing2"}): 6.0,
        frozenset({"ing0", "ing2", "ing3"}): 7.0,
        frozenset({"ing0", "ing1", "ing2", "ing3"}): 7.0,
    }


def test_keep_rule_strict_and_non_strict(soup_world: SoupWorld, tmp_path: Path) -> None:
    strict, _ = soup(soup_world, tmp_path / "strict", evaluator=Table(table_for_ties()))
    assert [Path(r).name for r in strict["kept"]] == ["ing0", "ing2", "ing3"]
    assert strict["keep_rule"] == ">"
    loose, _ = soup(
        soup_world,
        tmp_path / "loose",
        evaluator=Table(table_for_ties()),
        extra={"parameters": {"keep_rule": ">="}},
    )
    assert [Path(r).name for r in loose["kept"]] == ["ing0", "ing1", "ing2", "ing3"]
    assert loose["final_score"] == 7.0


def test_max_ingredients_stops_the_search(soup_world: SoupWorld, tmp_path: Path) -> None:
    table = Table(table_for_ties())
    report, _ = soup(
        soup_world, tmp_path / "two", evaluator=table, extra={"parameters": {"max_ingredients": 2}}
    )
    assert [Path(r).name for r in report["kept"]] == ["ing0", "ing2"]
    assert [Path(s["ingredient"]).name for s in report["steps"]] == ["ing1", "ing2"]


def test_on_disk_search_matches_the_in_memory_search(soup_world: SoupWorld, tmp_path: Path) -> None:
    memory, in_memory_out = soup(soup_world, tmp_path / "memory")
    disk, on_disk_out = soup(soup_world, tmp_path / "disk", memory_limit_bytes=0)
    assert disk["in_memory"] is False
    assert disk["kept"] == memory["kept"]
    for a, b in zip(memory["steps"], disk["steps"], strict=True):
        assert a["candidate_score"] == pytest.approx(b["candidate_score"], rel=1e-4)
    first = load_file(in_memory_out / "model.safetensors")
    second = load_file(on_disk_out / "model.safetensors")
    assert first.keys() == second.keys()
    assert all(torch.equal(first[n], second[n]) for n in first)
    # Reads stay linear in N: per step, the float32 sum and one ingredient.
    assert disk["bytes_read"] <= 4 * len(disk["ingredients"]) * disk["model_bytes"]


def test_cancel_leaves_nothing(soup_world: SoupWorld, tmp_path: Path) -> None:
    table = Table(table_for_ties())
    calls = iter(range(1000))
    with pytest.raises(MergeCancelledError):
        soup(soup_world, tmp_path / "out", evaluator=table, should_cancel=lambda: next(calls) > 3)
    assert not (tmp_path / "out").exists()
    assert not scratch_folder(tmp_path / "out").exists()


def test_an_evaluator_is_required(soup_world: SoupWorld) -> None:
    document = soup_world.recipe()
    del document["evaluator"]
    with pytest.raises(RecipeError) as caught:
        build_evaluator(parse_recipe(document).evaluator)
    assert caught.value.field == "evaluator"


def test_a_scored_uniform_soup_compares_the_merge_with_its_inputs(
    soup_world: SoupWorld, tmp_path: Path
) -> None:
    document = soup_world.recipe()
    document["merge_method"] = "linear"
    recipe = parse_recipe(document)
    scored = run_evaluated_merge(
        recipe, tmp_path / "uniform", build_evaluator(recipe.evaluator), MergeOptions()
    )
    report = scored.report
    assert [Path(r["reference"]).name for r in report["inputs"]] == [*HELPFUL, HARMFUL]
    assert Path(report["best_input"]["reference"]).name in HELPFUL
    assert report["merge"]["score"] is not None
    assert report["beats_best_input"] == (report["merge"]["score"] <= report["best_input"]["score"])
    assert json.loads((scored.result.out_dir / "evaluation.json").read_text()) == report


def test_the_cli_runs_a_greedy_soup(
    soup_world: SoupWorld, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    recipe = tmp_path / "soup.yaml"
    recipe.write_text(yaml.safe_dump(soup_world.recipe()))
    assert cli(["merge", str(recipe), str(tmp_path / "out"), "--quiet"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert Path(printed["evaluation"]["best_single"]["reference"]).name in HELPFUL
    assert (tmp_path / "out" / "evaluation.json").is_file()


def test_on_disk_search_writes_ingredients_in_the_output_dtype(
    soup_world: SoupWorld, tmp_path: Path
) -> None:
    table = Table(table_for_ties())
    extra = {"out_dtype": "bfloat16"}
    report, out = soup(
        soup_world, tmp_path / "bf16", evaluator=table, memory_limit_bytes=0, extra=extra
    )
    assert report["in_memory"] is False
    assert [Path(r).name for r in report["kept"]] == ["ing0", "ing2", "ing3"]
    assert not any(table.in_memory)
    assert {t.dtype for t in load_file(out / "model.safetensors").values()} == {torch.bfloat16}
    # The float32 inputs were converted by the engine before being scored alone.
    assert report["bytes_read"] >= len(report["ingredients"]) * report["model_bytes"]


def test_on_disk_search_into_a_relative_output_folder(
    soup_world: SoupWorld, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Relative references resolve against the recipe's folder, not the working directory:
    # the search's own checkpoints must still be found.
    monkeypatch.chdir(tmp_path)
    recipe = parse_recipe(soup_world.recipe(out_dtype="bfloat16"))
    scored = run_evaluated_merge(
        recipe,
        Path("relative-out"),
        Table(table_for_ties()),
        MergeOptions(base_dir=soup_world.root),
        memory_limit_bytes=0,
    )
    assert scored.report["in_memory"] is False
    assert scored.result.out_dir == tmp_path / "relative-out"
    assert (tmp_path / "relative-out" / "model.safetensors").is_file()


def test_the_search_keeps_few_folders_on_disk(soup_world: SoupWorld, tmp_path: Path) -> None:
    out = tmp_path / "bounded"
    scratch = scratch_folder(out)
    counts: list[int] = []

    class Counting(Table):
        def evaluate(self, candidate: Candidate) -> Score:
            candidate.folder()  # an evaluator that needs a folder, like an HTTP one
            counts.append(len(list(scratch.iterdir())))
            return super().evaluate(candidate)

    for limit in (0, 1 << 40):  # through the disk, then in memory
        counts.clear()
        report, _ = soup(
            soup_world,
            out,
            evaluator=Counting(table_for_ties()),
            memory_limit_bytes=limit,
            extra={"out_dtype": "bfloat16"},
            overwrite=True,
        )
        assert len(report["kept"]) == 3
        # At most the running sum and the candidate being scored, whatever the steps.
        assert max(counts) <= 2, counts
