"""The training job kind: LoRA and DPO trainings validated, queued and run.

A training config is validated before it becomes a job (paths inside the allowed folders,
the base a local model folder, the data well-formed), then run by
:mod:`service.jobs.training_worker`, one training at a time, one process per training.
A finished adapter is written to ``data_dir/inputs/trainings/<name or job id>``: inside the
inputs folder, so a merge recipe can use it at once as ``base+trainings/<job id>``. An
interrupted training starts again with the next server.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sys
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from merge_kernels.checkpoints.confinement import (
    Confinement,
    PathOutsideRootsError,
    check_path_text,
)
from merge_kernels.errors import CheckpointNotFoundError
from service.jobs.kinds import JobKind, WorkerSetup, register_kind
from service.jobs.models import Job, JobStatus, OutputOptions
from service.jobs.sqlite_store import utcnow
from service.jobs.system import JobSystem
from service.jobs.worker import discard_staging
from service.settings import ServiceSettings
from training.base_loading import check_base_folder
from training.config import AnyTrainingConfig, parse_training_config
from training.data import read_jsonl
from training.errors import TrainingConfigError

log = logging.getLogger(__name__)

TRAINING_KIND = "training"
TRAININGS_FOLDER = "trainings"  # under data_dir/inputs
_SERVER_FIELDS = ("output_dir", "overwrite")


def adapters_dir(settings: ServiceSettings) -> Path:
    """Where adapters are written, ``data_dir/inputs/trainings``."""
    return settings.inputs_dir / TRAININGS_FOLDER


def _standby_command(setup: WorkerSetup) -> Sequence[str]:
    return [
        sys.executable,
        "-m",
        "service.jobs.training_worker",
        "--standby",
        "--db",
        setup.store_location,
        "--parent-pid",
        str(os.getpid()),
        "--log-level",
        setup.settings.log_level,
        "--log-dir",
        str(setup.log_dir),
    ]


TRAINING = register_kind(
    JobKind(
        name=TRAINING_KIND,
        noun="training",
        output_noun="adapter",
        log_folder="trainings",
        output_root=adapters_dir,
        standby_command=_standby_command,
        discard=discard_staging,
        concurrency=lambda settings: 1,  # a training takes the whole machine
        spare=lambda settings: 0,  # one process per training: its memory goes back after
        cancel_grace_s=10.0,  # a cancel is seen before the next optimizer step
        metric_family="tureen_trainings",
    )
)


def _as_given(config: dict[str, Any], field: str) -> str:
    """The text the client gave for a dotted config field, for messages (never our paths)."""
    value: Any = config
    for part in field.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    return str(value)


@dataclass(frozen=True)
class TrainingRequest:
    """A training request as the client sent it, split into its parts.

    Attributes:
        kind: ``lora`` or ``dpo``.
        config: the config document (without ``kind`` and ``output``).
        output: output options; only ``name`` is used.
        body_hash: sha256 of the canonical request, for idempotency checks.
    """

    kind: str
    config: dict[str, Any]
    output: OutputOptions
    body_hash: str


def split_request(document: object) -> TrainingRequest:
    """Split a request body into kind, config document and output options.

    Raises:
        TrainingConfigError: the body is no mapping, ``kind`` is missing or unknown, or it
            sets a field the service decides (``output_dir``, ``overwrite``).
    """
    if not isinstance(document, dict):
        raise TrainingConfigError("body", "the body must be a mapping: a training config")
    kind = document.get("kind")
    if kind not in ("lora", "dpo"):
        raise TrainingConfigError("kind", "give kind: lora (supervised LoRA) or dpo")
    for field in _SERVER_FIELDS:
        if field in document:
            raise TrainingConfigError(
                field, "the service chooses where adapters go; name it with output.name"
            )
    output_value = document.get("output") or {}
    if not isinstance(output_value, dict) or set(output_value) - {"name"}:
        raise TrainingConfigError("output", "only output.name may be given for a training")
    try:
        output = OutputOptions(name=output_value.get("name"))
    except ValueError as error:
        raise TrainingConfigError(
            "output.name", "use 1-128 letters, digits, '.', '_' or '-', starting alphanumeric"
        ) from error
    config = {key: value for key, value in document.items() if key not in ("kind", "output")}
    canonical = json.dumps(
        {"kind": kind, "config": config, "name": output.name},
        sort_keys=True,
        separators=(",", ":"),
        default=str,
    )
    return TrainingRequest(kind, config, output, hashlib.sha256(canonical.encode()).hexdigest())


def validate_training(
    settings: ServiceSettings, request: TrainingRequest, output_dir: Path
) -> AnyTrainingConfig:
    """Check a training request as its job would run it.

    Relative paths are relative to ``data_dir/inputs``; a path outside the allowed
    folders is refused like a missing one, so a request cannot probe the server's disk.

    Returns:
        The validated config, writing to ``output_dir``.

    Raises:
        TrainingConfigError: a field is invalid or names an unusable path.
        TrainingDataError: a data file is malformed.
    """
    document: dict[str, Any] = {
        "device": settings.device,
        **request.config,
        "output_dir": str(output_dir),
    }
    config = parse_training_config(
        document,
        request.kind,  # type: ignore[arg-type]
        base_dir=settings.inputs_dir,
    )
    roots = settings.input_roots
    paths = {"base_model": config.base_model, "data.train": config.data.train}
    if config.data.eval is not None:
        paths["data.eval"] = config.data.eval
    confinement = Confinement.of(roots)
    for field, path in paths.items():
        try:
            check_path_text(str(path), field)
        except CheckpointNotFoundError as error:
            raise TrainingConfigError(field, error.message) from None
        if not confinement.contains(path) or not path.exists():
            raise TrainingConfigError(
                field,
                f"{_as_given(request.config, field)} does not exist in a folder the "
                "service may read (data_dir/inputs or an --allow-root folder); relative "
                "paths are relative to data_dir/inputs",
            )
    # transformers opens the base folder's files itself: none may link outside the roots.
    try:
        confinement.check_tree(config.base_model)
        for path in paths.values():
            confinement.resolve(path)
    except PathOutsideRootsError as error:
        raise TrainingConfigError("base_model", error.message) from None
    check_base_folder(config.base_model)
    forms = ("preference",) if request.kind == "dpo" else ("prompt_completion", "text")
    for data_file in (config.data.train, config.data.eval):
        if data_file is not None:
            read_jsonl(data_file, forms)  # type: ignore[arg-type]
    return config


def submit_training(
    jobs: JobSystem, request: TrainingRequest, *, idempotency_key: str | None = None
) -> tuple[Job, bool]:
    """Validate a training and queue it as a job.

    Returns:
        ``(job, created)``: the queued job, and False when the key returned an earlier
        job.

    Raises:
        IdempotencyConflictError: the key was used with a different body.
        OutputExistsError: ``output.name`` is taken.
        TrainingConfigError, TrainingDataError: the training cannot run.
    """
    repeat = jobs.idempotent_repeat(TRAINING_KIND, idempotency_key, request.body_hash)
    if repeat is not None:
        return repeat, False
    job_id = uuid.uuid4().hex
    output_dir = adapters_dir(jobs.settings) / (request.output.name or job_id)
    config = validate_training(jobs.settings, request, output_dir)
    job = Job(
        id=job_id,
        kind=TRAINING_KIND,
        status=JobStatus.QUEUED,
        recipe=config.model_dump(mode="json"),
        output=request.output,
        created_at=utcnow(),
    )
    job, created = jobs.enqueue(job, idempotency_key=idempotency_key, body_hash=request.body_hash)
    if created:
        log.info("training %s queued (%s)", job.id, request.kind)
    return job, created


def adapter_reference(job: Job) -> str:
    """How a merge recipe names the job's adapter (relative to ``data_dir/inputs``)."""
    return f"{TRAININGS_FOLDER}/{job.output.name or job.id}"


def held_out_summary(evaluation: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """The held-out numbers a finished training recorded, if any."""
    if not evaluation:
        return None
    held_out = evaluation.get("held_out")
    return dict(held_out) if isinstance(held_out, Mapping) else None
