"""The model-wide trim's map-reduce (no cluster needed): the maps run here, shard by shard,
in an order other than the plan's, and must give exactly the local pre-pass's trim states."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from merge_kernels.executors.trim_reduce import (
    histogram_part,
    model_trim_scope,
    reduce_model_trims,
    tie_counts_part,
)
from merge_kernels.recipe import parse_recipe
from merge_kernels.runner import MergeOptions, close_inputs, plan_merge
from merge_kernels.synthetic import LlamaShape, write_checkpoint
from merge_kernels.trim_prepass import stream_trim_states

SHAPE = LlamaShape(hidden_size=32, intermediate_size=64, num_hidden_layers=2, vocab_size=96)


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("steps")
    write_checkpoint(root / "base", SHAPE, seed=0)
    base = load_file(root / "base" / "model.safetensors")
    for index in (1, 2):  # task vectors of five values: many entries tie at the threshold
        generator = torch.Generator().manual_seed(index)
        (root / f"ft{index}").mkdir()
        save_file(
            {
                n: t + torch.randint(-2, 3, t.shape, generator=generator) * 0.25
                for n, t in base.items()
            },
            root / f"ft{index}" / "model.safetensors",
        )
        (root / f"ft{index}" / "config.json").write_text(
            (root / "base" / "config.json").read_text()
        )
    return root


def test_map_reduce_over_shards_equals_the_streaming_prepass(models: Path) -> None:
    recipe = parse_recipe(
        {
            "merge_method": "ties",
            "base_model": "base",
            "parameters": {"density": 0.3, "trim_scope": "model", "trim_ties": "exact_k"},
            "models": [{"model": "ft1"}, {"model": "ft2", "parameters": {"density": 0.5}}],
        }
    )
    options = MergeOptions(base_dir=models, max_shard_bytes=12_000, chunk_elements=1500)
    plan, inputs = plan_merge(recipe, options)
    try:
        scope = model_trim_scope(plan)
        assert scope is not None
        assert any(piece.start is not None for piece in scope.pieces)  # row chunks too
        shards = [shard.filename for shard in reversed(plan.shards)]
        assert len(shards) > 5

        def map_histograms(selectors):  # type: ignore[no-untyped-def]
            return [histogram_part(plan, scope, [name], selectors) for name in shards]

        def map_tie_counts(thresholds):  # type: ignore[no-untyped-def]
            return [tie_counts_part(plan, scope, [name], thresholds) for name in shards]

        reduced = reduce_model_trims(scope, map_histograms, map_tie_counts)
        expected = stream_trim_states(plan, scope.pieces, scope.densities, scope.ties, lambda: None)
    finally:
        close_inputs(inputs)
    assert reduced == expected
    # The threshold falls among tied entries, so the running tie counts were needed.
    assert any(state.threshold.keep_at_value > 0 for state in reduced[scope.pieces[0].key])
    assert any(state.ties_before > 0 for states in reduced.values() for state in states)
