"""The job record the store keeps and the API returns."""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from merge_kernels.checkpoints.reference import REPO_ID_PATTERN, REVISION_PATTERN, is_hub_repo_id

DEFAULT_KIND = "merge"  # records made before jobs had kinds are merges


class JobStatus(StrEnum):
    """Where a job is in its life."""

    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"
    PUBLISHING = "publishing"  # merged; the output is being uploaded to the Hub
    PAUSED = "paused"  # kept as it is, not run, until resumed (then queued again)

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
    # -- training jobs -------------------------------------------------------------------
    steps_done: int | None = Field(None, description="Training: optimizer steps done.")
    steps_total: int | None = Field(None, description="Training: optimizer steps planned.")
    loss: float | None = Field(None, description="Training: loss of the last step.")
    # -- end training jobs ---------------------------------------------------------------
    # -- search jobs ---------------------------------------------------------------------
    evaluations_done: int | None = Field(None, description="Search: candidates scored.")
    evaluations_total: int | None = Field(None, description="Search: the evaluations budget.")
    best_score: float | None = Field(None, description="Search: the best score so far.")
    last_score: float | None = Field(
        None, description="Search: the last candidate's score (none: it failed)."
    )
    # -- end search jobs -----------------------------------------------------------------
    stage: str | None = Field(
        None,
        description="Multi-document jobs: the stage being run, its `name` (or `merges[i]` "
        "for the unnamed final merge).",
    )


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
    # -- publishing to the Hugging Face Hub ------------------------------------------------
    publish: PublishOptions | None = Field(
        None,
        description="Publish the output to the Hugging Face Hub once merged. The Hub token "
        "goes in the X-HF-Token header (or the server's configuration), never in the body.",
    )
    # -- end publishing ----------------------------------------------------------------------


# -- publishing to the Hugging Face Hub ------------------------------------------------------


NAMESPACED_REPO_ID_PATTERN = rf"^(?=[^/]*/)(?!.*(?:--|\.\.))(?!.*\.git$){REPO_ID_PATTERN}$"


class PublishOptions(BaseModel):
    """Where and how to publish a merge's output on the Hugging Face Hub (no secrets here)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    repo_id: str = Field(
        max_length=96 * 2 + 1,
        description="The model repository, 'namespace/name'; created when missing.",
        # What _namespaced checks, for the schema: a namespace, the Hub's grammar, no '--'
        # or '..', no '.git' ending (lookarounds, which pydantic's own patterns lack).
        json_schema_extra={"pattern": NAMESPACED_REPO_ID_PATTERN},
    )
    private: bool | None = Field(
        None,
        description="Visibility of a repository created for this: true private, false public; "
        "default private. An existing repository keeps its visibility, except that publishing "
        "with true to a public one is refused.",
    )
    revision: str | None = Field(
        None,
        pattern=rf"^{REVISION_PATTERN}$",
        max_length=255,
        description="Branch to commit to, created from main when missing (default main); "
        "with create_pr, the branch the pull request targets.",
    )
    commit_message: str | None = Field(
        None, min_length=1, max_length=1000, description="Default: names the job and method."
    )
    create_pr: bool = Field(False, description="Open a pull request instead of committing.")

    @field_validator("repo_id")
    @classmethod
    def _namespaced(cls, value: str) -> str:
        if "/" not in value or not is_hub_repo_id(value):
            raise ValueError("must be 'namespace/name', a valid Hub repository id")
        return value


class PublishState(StrEnum):
    """Where a job's publication to the Hub is."""

    PENDING = "pending"
    PUBLISHING = "publishing"
    PUBLISHED = "published"
    FAILED = "failed"


class JobPublish(BaseModel):
    """A job's publication to the Hub: where to, how far it came, and its commit."""

    model_config = ConfigDict(frozen=True)

    options: PublishOptions
    state: PublishState = PublishState.PENDING
    step: str | None = Field(None, description="What the upload is doing now.")
    token_source: Literal["request", "server"] = Field(
        "server",
        description="Whose Hub token publishes: the request's X-HF-Token (held in the server's "
        "memory only, never stored) or the server's configured token.",
    )
    attempts: int = Field(0, description="Publishing attempts started so far.")
    requested_at: datetime | None = None
    started_at: datetime | None = None
    finished_at: datetime | None = None
    repo_url: str | None = None
    commit_url: str | None = Field(None, description="The commit, once published.")
    commit_sha: str | None = None
    pr_url: str | None = Field(None, description="The pull request, with create_pr.")
    error: JobError | None = Field(None, description="Why the last attempt failed.")


# -- end publishing ---------------------------------------------------------------------------


class StageState(StrEnum):
    """Where one stage of a multi-document job is."""

    PENDING = "pending"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    REUSED = "reused"  # an earlier attempt of the job had finished it; kept as it was
    FAILED = "failed"
    CANCELLED = "cancelled"


class JobStage(BaseModel):
    """One merge of a multi-document job (mergekit-multimerge), in the order they run."""

    model_config = ConfigDict(frozen=True)

    index: int = Field(description="The document's position in the request (`merges[i]`).")
    name: str | None = Field(None, description="The document's `name`; none for the final one.")
    final: bool = Field(
        False,
        description="Whether this merge writes the job's output; the others are "
        "intermediates, private to the job and removed once it succeeds.",
    )
    reads: list[str] = Field(
        default_factory=list, description="Names of the stages whose outputs this one reads."
    )
    state: StageState = StageState.PENDING
    progress: JobProgress = Field(default_factory=JobProgress)
    started_at: datetime | None = None
    finished_at: datetime | None = None

    @property
    def label(self) -> str:
        """The stage as messages name it: its name, or ``merges[i]`` when it has none."""
        return self.name if self.name is not None else f"merges[{self.index}]"


class Job(BaseModel):
    """A merge job (the store keeps every kind's jobs as this record)."""

    model_config = ConfigDict(frozen=True)

    id: str
    kind: str = Field(
        DEFAULT_KIND,
        description="What the job does: merge, training or search (see the job kinds).",
    )
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
    pause_requested: bool = Field(
        False,
        description="Pausing was asked for; a running job's worker is stopped within seconds "
        "and the job turns `paused`, keeping what it has done for when it is resumed.",
    )
    resumed_shards: int = Field(
        0, description="Output shards a resumed run found already finished and kept."
    )
    bytes_written: int | None = Field(None, description="Bytes of output, once succeeded.")
    merge_seconds: float | None = Field(
        None, description="Seconds the successful run took (its last attempt)."
    )
    worker_pid: int | None = Field(None, description="Process id of the worker running it.")
    warnings: list[str] = Field(
        default_factory=list,
        description="What the recipe gets away with, as mergekit accepts it (`field: "
        "message`): parameters the method does not use, an assumed density. `strict: true` "
        "in the recipe makes each an error.",
    )
    evaluation: dict[str, Any] | None = Field(  # scored merges and greedy soups
        None,
        description="The evaluation report of a greedy soup or of a merge with an evaluator: "
        "every score, every step, the final score (also in the output's evaluation.json).",
    )
    publish: JobPublish | None = Field(  # publishing to the Hugging Face Hub
        None, description="Publication of the output to the Hugging Face Hub, when asked for."
    )
    stages: list[JobStage] | None = Field(  # multi-document recipes
        None,
        description="A multi-document recipe's merges, in the order they run (none for a "
        "single recipe). The job's `progress` follows the running stage.",
    )
    updated_at: datetime | None = Field(None, description="When the record last changed.")
    version: int = Field(
        0, description="Increases with every change of the record, for noticing updates."
    )
