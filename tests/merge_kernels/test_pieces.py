"""Reading a piece from every input: sequential and parallel reads give the same tensors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import merge_kernels.pieces as pieces
import merge_kernels.thread_pools as thread_pools
from merge_kernels.recipe import parse_recipe
from merge_kernels.runner import MergeOptions, close_inputs, plan_merge
from merge_kernels.synthetic import LlamaShape, write_checkpoint

SHAPE = LlamaShape(hidden_size=32, intermediate_size=64, num_hidden_layers=2, vocab_size=96)


def test_parallel_reads_equal_sequential_reads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for index in range(3):
        write_checkpoint(tmp_path / f"m{index}", SHAPE, seed=index + 1, base_seed=0)
    recipe = parse_recipe(
        {"merge_method": "linear", "models": [{"model": str(tmp_path / f"m{i}")} for i in range(3)]}
    )
    monkeypatch.setattr(thread_pools, "_POOLS", {})
    plan, inputs = plan_merge(recipe, MergeOptions(chunk_elements=512))
    try:
        units = [p for tensor in plan.tensors for p in pieces.pieces_of(tensor)]
        assert any(p.start is not None for p in units)  # row chunks are read too
        monkeypatch.setattr(pieces, "PARALLEL_READS_FROM_CORES", 10**6)
        sequential = [pieces.read_piece(plan, unit) for unit in units]
        monkeypatch.setattr(pieces, "PARALLEL_READS_FROM_CORES", 1)
        parallel = [pieces.read_piece(plan, unit) for unit in units]
    finally:
        close_inputs(inputs)
    assert "input" in thread_pools._POOLS  # the parallel path ran
    for one, other in zip(sequential, parallel, strict=True):
        assert len(one) == len(other) == 3
        assert all(torch.equal(a, b) for a, b in zip(one, other, strict=True))
