"""The job record the store keeps and the API returns."""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class JobStatus(StrEnum):
    """Where a job is in its life."""

    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def finished(self) -> bool:
        return self in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED)


class JobProgress(BaseModel):
    """How far a running job has come."""

    model_config = ConfigDict(frozen=True)

    phase: str = Field("queued", description="queued, planning, merging, finishing, done")
    tensors_done: int = 0
    tensors_total: int = 0
    bytes_done: int = 0
    bytes_total: int = 0
    current: str | None = Field(None, description="Tensor being merged.")
    eta_seconds: float | None = Field(None, description="Estimated seconds left.")


class JobError(BaseModel):
    """Why a job failed: the same shape as the API's error body."""

    model_config = ConfigDict(frozen=True)

    code: str
    message: str
    details: dict[str, Any] = Field(default_factory=dict)


class OutputOptions(BaseModel):
    """Output options a client may give with a merge request."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str | None = Field(
        None,
        pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$",
        description="Folder name of the output under the data directory (default: the job id).",
    )
    shard_size: int | None = Field(
        None, ge=1_000_000, description="Largest output shard in bytes (default 5 GB)."
    )
    dtype: str | None = Field(
        None, pattern="^(float32|float16|bfloat16)$", description="Output dtype override."
    )


class Job(BaseModel):
    """A merge job."""

    model_config = ConfigDict(frozen=True)

    id: str
    kind: str = Field("merge", description="merge (later: greedy_soup, training)")
    status: JobStatus
    recipe: dict[str, Any] = Field(description="The validated recipe document.")
    output: OutputOptions
    created_at: datetime
    started_at: datetime | None = None
    finished_at: datetime | None = None
    progress: JobProgress = Field(default_factory=JobProgress)
    error: JobError | None = None
    output_dir: str | None = Field(None, description="Where the result is, once succeeded.")
    files: list[str] = Field(default_factory=list)
    attempts: int = Field(0, description="How many times a worker started this job.")
    cancel_requested: bool = Field(
        False, description="Cancellation was asked for; a running job stops within seconds."
    )
    resumed_shards: int = Field(
        0, description="Output shards a resumed run found already finished and kept."
    )
    bytes_written: int | None = Field(None, description="Bytes of output, once succeeded.")
    merge_seconds: float | None = Field(
        None, description="Seconds the successful run took (its last attempt)."
    )
    worker_pid: int | None = Field(None, description="Process id of the worker running it.")
    updated_at: datetime | None = Field(None, description="When the record last changed.")
    version: int = Field(
        0, description="Increases with every change of the record, for noticing updates."
    )
