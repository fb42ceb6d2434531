"""The held-out LM evaluator on real tiny Llamas: metrics, determinism, errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from safetensors.torch import load_file

from merge_kernels.candidates import Candidate
from merge_kernels.errors import EvaluationError, RecipeError
from service.evaluation.config import build_evaluator
from tests.service.evaluation.conftest import HARMFUL, SoupWorld


def folder_candidate(folder: Path) -> Candidate:
    return Candidate(folder.name, 0, [folder.name], folder=folder)


def test_the_target_scores_best_on_every_metric(soup_world: SoupWorld) -> None:
    evaluator = build_evaluator(
        {"type": "held_out", "data": str(soup_world.held_out), "metric": "loss"}
    )
    assert evaluator.name == "held_out:loss"
    assert evaluator.higher_is_better is False
    target = evaluator.evaluate(folder_candidate(soup_world.target))
    noisy = evaluator.evaluate(folder_candidate(soup_world.root / "ing0"))
    harmful = evaluator.evaluate(folder_candidate(soup_world.root / HARMFUL))
    assert target.value < noisy.value < harmful.value
    assert target.metrics["token_accuracy"] > noisy.metrics["token_accuracy"]
    assert set(target.metrics) == {"loss", "token_accuracy"}


def test_exact_match_of_greedy_generation(soup_world: SoupWorld) -> None:
    evaluator = build_evaluator(
        {
            "type": "held_out",
            "data": str(soup_world.exact),
            "metric": "exact_match",
            "max_new_tokens": 3,
            "batch_size": 5,
        }
    )
    assert evaluator.higher_is_better is True
    # The target wrote these completions with its own greedy choices: it reproduces them all.
    assert evaluator.evaluate(folder_candidate(soup_world.target)).value == 1.0
    assert evaluator.evaluate(folder_candidate(soup_world.root / HARMFUL)).value < 0.5


def test_scores_are_deterministic_and_independent_of_where_the_tensors_live(
    soup_world: SoupWorld,
) -> None:
    evaluator = build_evaluator(
        {"type": "held_out", "data": str(soup_world.held_out), "metric": "token_accuracy"}
    )
    folder = soup_world.root / "ing1"
    from_disk = evaluator.evaluate(folder_candidate(folder))
    again = evaluator.evaluate(folder_candidate(folder))
    assert from_disk == again
    from merge_kernels.checkpoints.opening import open_checkpoint

    with open_checkpoint(str(folder)) as checkpoint:
        in_memory = Candidate(
            "in memory",
            1,
            ["ing1"],
            tensors=load_file(folder / "model.safetensors"),
            companion=checkpoint,
        )
        assert in_memory.in_memory
        assert evaluator.evaluate(in_memory) == from_disk


def test_text_records_score_every_token_after_the_first(
    soup_world: SoupWorld, tmp_path: Path
) -> None:
    data = tmp_path / "text.jsonl"
    records = [json.loads(line) for line in soup_world.held_out.read_text().splitlines()]
    data.write_text(
        "\n".join(json.dumps({"text": r["prompt"] + r["completion"]}) for r in records) + "\n"
    )
    evaluator = build_evaluator({"type": "held_out", "data": str(data)})
    target = evaluator.evaluate(folder_candidate(soup_world.target))
    harmful = evaluator.evaluate(folder_candidate(soup_world.root / HARMFUL))
    assert 0 < target.value < harmful.value


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("", "holds no records"),
        ("{not json}\n", "line 1 is not JSON"),
        ('{"prompt": "a"}\n', "line 1: give"),
        ('{"prompt": "a", "completion": ""}\n', "non-empty completion"),
    ],
)
def test_bad_data_files_are_refused_naming_the_line(
    tmp_path: Path, content: str, message: str
) -> None:
    data = tmp_path / "bad.jsonl"
    data.write_text(content)
    with pytest.raises(RecipeError, match=message) as caught:
        build_evaluator({"type": "held_out", "data": str(data)})
    assert caught.value.field == "evaluator.data"


def test_bad_evaluator_sections_name_the_field(tmp_path: Path) -> None:
    with pytest.raises(RecipeError) as missing:
        build_evaluator(None)
    assert missing.value.field == "evaluator"
    with pytest.raises(RecipeError) as metric:
        build_evaluator({"type": "held_out", "data": "x.jsonl", "metric": "bleu"})
    assert metric.value.field == "evaluator.metric"
    with pytest.raises(RecipeError) as kind:
        build_evaluator({"type": "oracle"})
    assert kind.value.field == "evaluator"
    with pytest.raises(RecipeError, match="no such file") as absent:
        build_evaluator({"type": "held_out", "data": str(tmp_path / "absent.jsonl")})
    assert absent.value.field == "evaluator.data"
    outside = tmp_path / "outside.jsonl"
    outside.write_text('{"text": "abc"}\n')
    with pytest.raises(RecipeError, match="outside the folders") as refused:
        build_evaluator(
            {"type": "held_out", "data": str(outside)}, allowed_roots=[tmp_path / "roots"]
        )
    assert refused.value.field == "evaluator.data"


def test_a_candidate_of_another_architecture_is_refused(
    soup_world: SoupWorld, tmp_path: Path
) -> None:
    evaluator = build_evaluator({"type": "held_out", "data": str(soup_world.held_out)})
    folder = soup_world.root / "ing0"
    tensors = load_file(folder / "model.safetensors")
    tensors.pop("model.norm.weight")
    from merge_kernels.checkpoints.opening import open_checkpoint

    with open_checkpoint(str(folder)) as checkpoint:
        broken = Candidate("broken", 0, [], tensors=tensors, companion=checkpoint)
        with pytest.raises(EvaluationError, match=r"missing \['model.norm.weight'\]"):
            evaluator.evaluate(broken)


def test_evaluators_sharing_a_model_do_not_disturb_each_other(soup_world: SoupWorld) -> None:
    by_loss = build_evaluator({"type": "held_out", "data": str(soup_world.held_out)})
    by_exact = build_evaluator(
        {
            "type": "held_out",
            "data": str(soup_world.exact),
            "metric": "exact_match",
            "max_new_tokens": 3,
        }
    )
    target, harmful = soup_world.target, soup_world.root / HARMFUL
    first = [by_loss.evaluate(folder_candidate(target)).value]
    first.append(by_exact.evaluate(folder_candidate(harmful)).value)
    # Interleaved the other way round: each evaluation loads its own candidate first.
    second_exact = by_exact.evaluate(folder_candidate(harmful)).value
    second_loss = by_loss.evaluate(folder_candidate(target)).value
    assert first == [second_loss, second_exact]
    assert by_exact.evaluate(folder_candidate(target)).value == 1.0
