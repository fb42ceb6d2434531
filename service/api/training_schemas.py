"""The shapes of the training routes: a training job, a page of them, the request body."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, Field

from service.jobs.kinds.training import held_out_summary
from service.jobs.models import Job, JobError, JobProgress, JobStatus, OutputOptions


class TrainingJob(BaseModel):
    """A LoRA SFT or DPO training job and, once it succeeded, its adapter."""

    id: str
    kind: Literal["lora", "dpo"] = Field(description="lora (supervised) or dpo.")
    status: JobStatus
    name: str | None = Field(None, description="The adapter's folder name (default: the id).")
    config: dict[str, Any] = Field(description="The validated training config.")
    created_at: datetime
    started_at: datetime | None = None
    finished_at: datetime | None = None
    progress: JobProgress = Field(
        description="phase (loading, evaluating, training, saving, done), steps_done, "
        "steps_total, loss, eta_seconds."
    )
    error: JobError | None = None
    cancel_requested: bool = False
    attempts: int = 0
    adapter_dir: str | None = Field(None, description="The PEFT adapter folder, once succeeded.")
    adapter_reference: str | None = Field(
        None,
        description="The adapter as a merge recipe names it (relative to data_dir/inputs): "
        "use 'BASE+<adapter_reference>' as a model, once succeeded.",
    )
    files: list[str] = Field(default_factory=list)
    held_out: dict[str, Any] | None = Field(
        None, description="Held-out numbers before and after training, once succeeded."
    )
    steps: int | None = Field(None, description="Optimizer steps run, once succeeded.")
    seconds: float | None = Field(None, description="Seconds the successful run took.")
    version: int = 0

    @classmethod
    def from_job(cls, job: Job, adapter_reference: str) -> TrainingJob:
        """The API view of a training job record."""
        succeeded = job.status is JobStatus.SUCCEEDED
        evaluation = job.evaluation or {}
        return cls(
            id=job.id,
            kind=job.recipe.get("kind", "lora"),
            status=job.status,
            name=job.output.name,
            config=job.recipe,
            created_at=job.created_at,
            started_at=job.started_at,
            finished_at=job.finished_at,
            progress=job.progress,
            error=job.error,
            cancel_requested=job.cancel_requested,
            attempts=job.attempts,
            adapter_dir=job.output_dir if succeeded else None,
            adapter_reference=adapter_reference if succeeded else None,
            files=job.files,
            held_out=held_out_summary(evaluation),
            steps=evaluation.get("steps") if succeeded else None,
            seconds=job.merge_seconds if succeeded else None,
            version=job.version,
        )


class TrainingList(BaseModel):
    """One page of training jobs, newest first."""

    items: list[TrainingJob]
    total: int = Field(description="Jobs matching the filter, on every page.")
    limit: int
    offset: int


TRAINING_BODY_DOC = (
    "A training config, as JSON or YAML: `kind` (`lora` or `dpo`), `base_model` (a local "
    "model folder), `data` (`train`, optional `eval` JSONL files), and optional `lora`, "
    "`training`, `dpo`, `device`, `dtype`, `quantization`, plus `output.name` (the adapter "
    "folder's name). Relative paths are relative to `data_dir/inputs`; the adapter is written "
    "to `data_dir/inputs/trainings/<name or job id>`."
)


def _output_name_schema() -> dict[str, Any]:
    # The very field that validates the name, so the document cannot drift from it.
    name: dict[str, Any] = OutputOptions.model_json_schema()["properties"]["name"]
    return name


def training_body_openapi() -> dict[str, Any]:
    """``openapi_extra`` documenting the training request body, JSON or YAML."""
    schema = {
        "type": "object",
        "required": ["kind", "base_model", "data"],
        "properties": {
            "kind": {"type": "string", "enum": ["lora", "dpo"]},
            "base_model": {"type": "string"},
            "data": {
                "type": "object",
                "required": ["train"],
                "properties": {
                    "train": {"type": "string"},
                    "eval": {"type": "string"},
                    "eval_fraction": {"type": "number"},
                    "max_length": {"type": "integer"},
                },
            },
            "lora": {"type": "object"},
            "training": {"type": "object"},
            "dpo": {"type": "object"},
            "device": {"type": "string"},
            "dtype": {"type": "string", "enum": ["float32", "bfloat16", "float16"]},
            "quantization": {"type": "object"},
            "output": {
                "type": "object",
                "additionalProperties": False,
                "properties": {"name": _output_name_schema()},
            },
        },
    }
    content = {media: {"schema": schema} for media in ("application/json", "application/yaml")}
    return {"requestBody": {"required": True, "description": TRAINING_BODY_DOC, "content": content}}
