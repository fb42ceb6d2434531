"""Greedy soup candidates scored as Ray tasks, on nodes with the evaluator's resources.

The greedy soup's search (:mod:`merge_kernels.greedy_search`) takes a ``score_async``: a
function that starts scoring a candidate and returns a future. :class:`RayScorer` is one:
each candidate is scored by a Ray task that declares the evaluator's resources (a GPU when
the evaluator runs on CUDA), so that scoring runs on the cluster's GPU nodes while the driver
reads the next ingredient and builds the next candidate; ingredients alone are scored several
at once. The search keeps its order and its decisions: the result is the local search's.

A candidate in memory travels as its tensors (Ray's object store); one written to disk, and
the checkpoint whose config and tokenizer it shares, travel as paths: the nodes must see the
inputs and the scratch folder at the same paths (a shared filesystem). The evaluator is sent
once, pickled, and built again in each worker that scores.
"""

from __future__ import annotations

import shutil
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path

import torch

from merge_kernels.candidates import Candidate, Evaluator, Score
from merge_kernels.checkpoints import LocalCheckpoint
from merge_kernels.errors import TureenError
from merge_kernels.executors.ray_cluster import import_ray

DEFAULT_MAX_RETRIES = 3


@dataclass(frozen=True)
class PortableCandidate:
    """A candidate as a task receives it: tensors, or paths on the shared filesystem."""

    label: str
    step: int
    ingredients: tuple[str, ...]
    tensors: dict[str, torch.Tensor] | None
    folder: str | None
    companion: str | None
    scratch: str | None


def portable(candidate: Candidate) -> PortableCandidate:
    """What a node needs to score ``candidate`` (the tensors are not copied here).

    Raises:
        TureenError: the checkpoint it shares its config with is not a local folder (or a
            Hub snapshot), which a node could open by path.
    """
    # The candidate's sources, as the search built it (Candidate keeps them private).
    companion = getattr(candidate, "_companion", None)
    scratch = getattr(candidate, "_scratch", None)
    if companion is not None and type(companion) is not LocalCheckpoint:
        raise TureenError(
            f"{candidate.label}: candidates of a {type(companion).__name__} input cannot be "
            "scored on a Ray cluster; score them in this process",
            details={"executor": "ray"},
        )
    return PortableCandidate(
        candidate.label,
        candidate.step,
        candidate.ingredients,
        dict(candidate.tensors()) if candidate.in_memory else None,
        None if candidate.written_folder is None else str(candidate.written_folder),
        None if companion is None else str(companion.folder),
        None if scratch is None else str(scratch),
    )


def score_task(evaluator: Evaluator, sent: PortableCandidate) -> Score:
    """Score one candidate on a node; a folder written for it here is removed after."""
    companion = LocalCheckpoint(Path(sent.companion)) if sent.companion is not None else None
    candidate = Candidate(
        sent.label,
        sent.step,
        sent.ingredients,
        tensors=sent.tensors,
        folder=None if sent.folder is None else Path(sent.folder),
        companion=companion,
        scratch=None if sent.scratch is None else Path(sent.scratch),
    )
    try:
        return evaluator.evaluate(candidate)
    finally:
        written = candidate.written_folder
        if written is not None and sent.folder is None:
            shutil.rmtree(written, ignore_errors=True)
        if companion is not None:
            companion.close()


def evaluator_gpus(evaluator: Evaluator) -> float:
    """GPUs a scoring task declares: one when the evaluator runs on CUDA, else none."""
    device = getattr(evaluator, "device", None)
    return 1.0 if device is not None and torch.device(device).type == "cuda" else 0.0


class RayScorer:
    """Scores greedy soup candidates as Ray tasks: a ``score_async`` for the search."""

    def __init__(
        self,
        evaluator: Evaluator,
        *,
        address: str | None = None,
        num_cpus: float = 1.0,
        num_gpus: float | None = None,
        resources: dict[str, float] | None = None,
        max_retries: int = DEFAULT_MAX_RETRIES,
    ) -> None:
        """Connect (unless connected) and send the evaluator to the cluster once.

        Args:
            evaluator: scores the candidates (pickled to the nodes).
            address: the cluster (None: Ray's default, as for the Ray executor).
            num_cpus: CPUs each scoring task declares.
            num_gpus: GPUs each declares (None: one if the evaluator's device is CUDA).
            resources: custom resources each declares.
            max_retries: how often a task lost with its node is run again.

        Raises:
            ExecutorUnavailableError: the ``ray`` package is not installed.
        """
        self._ray = import_ray()
        if not self._ray.is_initialized():
            self._ray.init(address=address)
        self._evaluator = self._ray.put(evaluator)
        self._task = self._ray.remote(score_task).options(
            num_cpus=num_cpus,
            num_gpus=evaluator_gpus(evaluator) if num_gpus is None else num_gpus,
            resources=dict(resources or {}),
            max_retries=max_retries,
        )

    def __call__(self, candidate: Candidate) -> Future[Score]:
        """Start scoring ``candidate`` on the cluster."""
        ref = self._task.remote(self._evaluator, portable(candidate))
        future: Future[Score] = ref.future()
        return future
