"""``GET /v1/merges/{id}/tensor-stats``: how far a merge moved each tensor from a base.

For every tensor of a succeeded merge's output that the base also holds, the relative L2
distance ``‖merged − base‖ / ‖base‖`` (the per-tensor change measure of task-vector analyses,
e.g. Ilharco et al. 2023, "Editing Models with Task Arithmetic"), and the same per layer
(``sqrt(Σ‖Δ‖² / Σ‖base‖²)`` over the layer's tensors), which the console's compare view draws
as a heat strip. Tensors are read one at a time (large ones a block of rows at a time), so
memory stays bounded by the largest block; the result is cached per job and base under
``data_dir/cache/tensor-stats`` (not in the output folder, whose files are the merge's
downloads and what publishing uploads).
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from pathlib import Path
from typing import Annotated

import torch
from fastapi import APIRouter, Query
from fastapi import Path as PathParam
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool

from merge_kernels.checkpoints.base import Checkpoint
from merge_kernels.checkpoints.opening import open_checkpoint
from service.api.deps import Authenticated, ManagerDep
from service.errors import ApiError, error_responses
from service.jobs.manager import JobManager
from service.jobs.models import Job, JobStatus

router = APIRouter(prefix="/v1/merges", tags=["merges"], dependencies=[Authenticated])

#: Tensors larger than this are read a block of rows at a time.
BLOCK_BYTES = 64 * 1024 * 1024
#: Bumped when the cached format changes, so old caches are not read.
CACHE_VERSION = 1
OTHER = "other"

_LAYER = re.compile(r"(?:^|\.)(?:layers|layer|h|blocks)\.(\d+)\.")


class TensorChange(BaseModel):
    """One output tensor's change from the base."""

    name: str
    layer: str = Field(description="Its layer's number, or `other` (embeddings, norms, head).")
    relative_l2: float | None = Field(
        description="‖merged − base‖ / ‖base‖; null when the base lacks the tensor, its shape "
        "differs, or its norm is 0."
    )


class LayerChange(BaseModel):
    """One layer's change from the base, over the tensors both hold."""

    label: str = Field(description="The layer's number, or `other`.")
    tensors: int
    relative_l2: float | None


class TensorStats(BaseModel):
    """A merge's change from a base, per tensor and per layer."""

    job_id: str
    base: str = Field(description="The base, as the request named it.")
    relative_l2: float | None = Field(description="Over every tensor both hold.")
    layers: list[LayerChange] = Field(description="In layer order, `other` last.")
    tensors: list[TensorChange]


def layer_label(name: str) -> str:
    """The layer a tensor belongs to: its block number, or ``other``."""
    match = _LAYER.search(name)
    return match.group(1) if match else OTHER


def _squared_norms(merged: Checkpoint, base: Checkpoint, name: str) -> tuple[float, float]:
    """(‖merged − base‖², ‖base‖²) of tensor ``name``, read in bounded blocks."""
    entry = merged.entries()[name]
    rows = entry.shape[0] if entry.shape else 0
    row_bytes = entry.nbytes // rows if rows else entry.nbytes
    blocks: list[tuple[int, int] | None] = [None]  # None: the whole tensor at once
    if rows > 1 and entry.nbytes > BLOCK_BYTES:
        step = max(1, BLOCK_BYTES // max(row_bytes, 1))
        blocks = [(start, min(start + step, rows)) for start in range(0, rows, step)]
    difference = reference = 0.0
    for block in blocks:
        if block is None:
            ours, theirs = merged.read(name), base.read(name)
        else:
            ours, theirs = merged.read_rows(name, *block), base.read_rows(name, *block)
        ours64, theirs64 = ours.to(torch.float64), theirs.to(torch.float64)
        difference += float(torch.sum((ours64 - theirs64) ** 2))
        reference += float(torch.sum(theirs64**2))
    return difference, reference


def _ratio(difference: float, reference: float) -> float | None:
    if reference <= 0 or not math.isfinite(difference) or not math.isfinite(reference):
        return None
    return math.sqrt(difference / reference)


def compute_stats(job_id: str, output: Path, base: Checkpoint, base_text: str) -> TensorStats:
    """The change of the checkpoint in ``output`` from ``base``, tensor by tensor."""
    tensors: list[TensorChange] = []
    sums: dict[str, list[float]] = {}
    with open_checkpoint(output, allowed_roots=[output]) as merged:
        base_entries = base.entries()
        for name, entry in sorted(merged.entries().items()):
            label = layer_label(name)
            theirs = base_entries.get(name)
            floating = entry.dtype.startswith(("F", "BF"))
            if theirs is None or theirs.shape != entry.shape or not floating:
                tensors.append(TensorChange(name=name, layer=label, relative_l2=None))
                continue
            difference, reference = _squared_norms(merged, base, name)
            tensors.append(
                TensorChange(name=name, layer=label, relative_l2=_ratio(difference, reference))
            )
            totals = sums.setdefault(label, [0.0, 0.0, 0.0])
            totals[0] += difference
            totals[1] += reference
            totals[2] += 1
    order = sorted(sums, key=lambda label: (label == OTHER, int(label) if label != OTHER else 0))
    layers = [
        LayerChange(label=label, tensors=int(sums[label][2]), relative_l2=_ratio(*sums[label][:2]))
        for label in order
    ]
    overall = _ratio(sum(s[0] for s in sums.values()), sum(s[1] for s in sums.values()))
    return TensorStats(
        job_id=job_id, base=base_text, relative_l2=overall, layers=layers, tensors=tensors
    )


def _cache_file(manager: JobManager, job: Job, base: str) -> Path:
    key = json.dumps([CACHE_VERSION, job.id, str(job.finished_at), base])
    digest = hashlib.sha256(key.encode()).hexdigest()[:24]
    return manager.settings.data_dir / "cache" / "tensor-stats" / f"{digest}.json"


def tensor_stats(manager: JobManager, job_id: str, base_text: str) -> TensorStats:
    """The (cached) change of a succeeded merge from ``base_text``.

    Raises:
        ApiError: 409 when the job has not succeeded.
        CheckpointNotFoundError, CheckpointFileError, RecipeError: the base cannot be opened
            (a path outside the allowed roots counts as missing).
    """
    job = manager.get(job_id)
    if job.status is not JobStatus.SUCCEEDED:
        raise ApiError(
            409,
            "job_not_succeeded",
            f"job {job_id} is {job.status.value}; its output exists only once it has succeeded",
            details={"job_id": job_id, "status": job.status.value},
        )
    settings = manager.settings
    # The base is resolved against the allowed roots first, cached or not: a cached result
    # is served only for a base the roots still allow.
    with open_checkpoint(
        base_text, base_dir=settings.inputs_dir, allowed_roots=settings.input_roots
    ) as base:
        cache = _cache_file(manager, job, base_text)
        try:
            return TensorStats.model_validate_json(cache.read_bytes())
        except (OSError, ValueError):
            pass  # not computed yet (or unreadable): compute it again
        stats = compute_stats(job_id, manager.output_path(job), base, base_text)
    cache.parent.mkdir(parents=True, exist_ok=True)
    partial = cache.with_suffix(".partial")
    partial.write_text(stats.model_dump_json())
    partial.replace(cache)  # atomic: a concurrent reader sees the old state or the whole file
    return stats


@router.get(
    "/{job_id}/tensor-stats",
    response_model=TensorStats,
    summary="A merge's change from a base, per tensor and per layer",
    responses=error_responses(401, 404, 409, 422),
)
async def get_tensor_stats(
    job_id: Annotated[str, PathParam(description="The job id.", max_length=128)],
    manager: ManagerDep,
    base: Annotated[
        str,
        Query(
            min_length=1,
            max_length=4096,
            description="The checkpoint to compare with, as a recipe names it (usually the "
            "recipe's base_model).",
        ),
    ],
) -> TensorStats:
    """Relative L2 distance of each output tensor, and of each layer, to the base's."""
    return await run_in_threadpool(tensor_stats, manager, job_id, base)
