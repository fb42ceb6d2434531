"""Candidates: merged models offered to an evaluator, and the evaluator's interface.

A greedy soup scores many candidate models. Small ones live in memory: an evaluator that
can take tensors (the held-out LM evaluator) loads them straight into a model, and nothing
is written to disk. An evaluator that needs a checkpoint folder (an HTTP evaluator in
another process) asks for :meth:`Candidate.folder`, which writes the candidate once, with
the config and tokenizer of the inputs, into a scratch folder.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import torch
from safetensors.torch import load_file

from merge_kernels.checkpoints.base import Checkpoint
from merge_kernels.io.dtypes import dtype_code
from merge_kernels.io.shard_plan import OutputTensor, plan_shards
from merge_kernels.io.shard_writer import ShardWriter
from merge_kernels.model_card import copy_tokenizer, write_config


@dataclass(frozen=True)
class Score:
    """What an evaluator says of one candidate.

    Attributes:
        value: the score the soup compares (see :attr:`Evaluator.higher_is_better`).
        metrics: every metric the evaluator measured, by name (``value`` among them).
    """

    value: float
    metrics: Mapping[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, float | dict[str, float | None] | None]:
        """JSON-able form; NaN and infinities become null."""
        return {
            "score": finite_or_none(self.value),
            "metrics": {name: finite_or_none(v) for name, v in self.metrics.items()},
        }


def finite_or_none(value: float) -> float | None:
    """``value``, or None when it is NaN or infinite (JSON has no such numbers)."""
    return value if math.isfinite(value) else None


class Evaluator(Protocol):
    """Scores candidate models: checkpoint in, number out.

    Attributes:
        name: what the score measures, for reports (e.g. ``held_out:loss``).
        higher_is_better: whether a larger score is better (a loss is not).
    """

    name: str
    higher_is_better: bool

    def evaluate(self, candidate: Candidate) -> Score:
        """Score ``candidate``; raises TureenError subclasses on bad input."""
        ...


def is_better(score: float, best: float, *, higher_is_better: bool, allow_equal: bool) -> bool:
    """Whether ``score`` beats ``best`` (NaN never does)."""
    if math.isnan(score):
        return False
    if math.isnan(best):
        return True
    if allow_equal and score == best:
        return True
    return score > best if higher_is_better else score < best


class Candidate:
    """One model to score: tensors in memory, or a checkpoint folder, or both.

    Args:
        label: a short description for reports (``ingredient 2``, ``soup step 3``).
        step: position in the evaluation sequence (0-based).
        ingredients: references of the inputs this candidate averages.
        tensors: the candidate's tensors in their output dtype, or None if it lives in
            ``folder`` only.
        folder: a checkpoint folder holding the candidate, or None to write one on demand.
        companion: the checkpoint whose config and tokenizer the candidate shares.
        scratch: where a folder is written on demand.
    """

    def __init__(
        self,
        label: str,
        step: int,
        ingredients: Sequence[str],
        *,
        tensors: Mapping[str, torch.Tensor] | None = None,
        folder: Path | None = None,
        companion: Checkpoint | None = None,
        scratch: Path | None = None,
    ) -> None:
        if tensors is None and folder is None:
            raise ValueError("a candidate needs tensors or a folder")
        self.label = label
        self.step = step
        self.ingredients = tuple(ingredients)
        self._tensors = tensors
        self._folder = folder
        self._companion = companion
        self._scratch = scratch

    @property
    def in_memory(self) -> bool:
        """Whether the tensors are held in memory (no disk read needed to score it)."""
        return self._tensors is not None

    @property
    def written_folder(self) -> Path | None:
        """The candidate's folder if it has one already (never writes one)."""
        return self._folder

    def tensors(self) -> Mapping[str, torch.Tensor]:
        """The candidate's tensors (read from its folder if it lives on disk only)."""
        if self._tensors is not None:
            return self._tensors
        assert self._folder is not None
        loaded: dict[str, torch.Tensor] = {}
        for path in sorted(self._folder.glob("*.safetensors")):
            loaded.update(load_file(path))
        return loaded

    def folder(self) -> Path:
        """A checkpoint folder with the candidate, written into the scratch folder once."""
        if self._folder is not None:
            return self._folder
        if self._scratch is None or self._companion is None:
            raise ValueError(f"{self.label} has no folder and nowhere to write one")
        assert self._tensors is not None
        target = self._scratch / f"candidate-{self.step:04d}"
        target.mkdir(parents=True, exist_ok=True)
        tensors = self._tensors
        # Written in place tensor by tensor, never serialised whole in memory.
        planned = [OutputTensor(n, dtype_code(t.dtype), tuple(t.shape)) for n, t in tensors.items()]
        (spec,) = plan_shards(planned, max(1, sum(p.nbytes for p in planned)))
        with ShardWriter(target, spec) as writer:
            for name, tensor in tensors.items():
                writer.write(name, tensor)
            writer.finish()
        first = next(iter(tensors.values()), None)
        write_config(
            self._companion, target, dtype_code(first.dtype) if first is not None else None
        )
        copy_tokenizer(self._companion, target)
        self._folder = target
        return target

    def config(self) -> dict[str, object]:
        """The model config (``config.json``) the candidate's tensors belong to."""
        if self._companion is not None and self._companion.has_config:
            return dict(self._companion.config)
        assert self._folder is not None
        loaded: dict[str, object] = json.loads((self._folder / "config.json").read_text())
        return loaded

    def tokenizer_folder(self) -> Path | None:
        """A folder holding the tokenizer files, if the inputs have one."""
        if self._folder is not None:
            return self._folder
        return self._companion.folder if self._companion is not None else None
