"""Accepting, dispatching, cancelling and watching training jobs.

Training jobs live in a store of their own (``data_dir/trainings.sqlite3``, the same
:class:`~service.jobs.models.Job` records with ``kind = "training"``), so the merge
dispatcher never sees them. :class:`TrainingManager` validates a training config before it
becomes a job (paths inside the allowed folders, the base a local model folder, the data
well-formed), runs one training at a time in a worker process of its own
(:mod:`service.jobs.training_worker`), enforces cancellation, and fails the jobs of workers
that die.

A finished adapter is written to ``data_dir/inputs/trainings/<name or job id>``: inside the
inputs folder, so a merge recipe can use it at once as ``base+trainings/<job id>``.
"""

from __future__ import annotations

import builtins  # `list` is a method name in the class below
import hashlib
import json
import logging
import os
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from merge_kernels.checkpoints.confinement import (
    Confinement,
    PathOutsideRootsError,
    check_path_text,
)
from merge_kernels.errors import CheckpointNotFoundError
from service.jobs import job_log
from service.jobs.manager import OutputExistsError
from service.jobs.models import Job, JobError, JobStatus, OutputOptions
from service.jobs.sqlite_store import utcnow
from service.jobs.store import (
    IdempotencyConflictError,
    JobNotFoundError,
    JobStore,
    watch,
)
from service.jobs.worker import describe_exit, discard_staging, worker_environment
from service.settings import ServiceSettings
from training.base_loading import check_base_folder
from training.config import AnyTrainingConfig, parse_training_config
from training.data import read_jsonl
from training.errors import TrainingConfigError

log = logging.getLogger(__name__)

TRAINING_KIND = "training"
TRAININGS_FOLDER = "trainings"  # under data_dir/inputs
STORE_NAME = "trainings.sqlite3"
DISPATCH_INTERVAL_S = 0.2
CANCEL_GRACE_S = 10.0  # a worker that ignores a cancel this long is killed
_SERVER_FIELDS = ("output_dir", "overwrite")


def training_store_path(settings: ServiceSettings) -> Path:
    """The SQLite store of training jobs, ``data_dir / "trainings.sqlite3"``."""
    return settings.data_dir / STORE_NAME


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


@dataclass
class _Worker:
    process: subprocess.Popen[bytes]
    cancel_seen_at: float | None = None


class TrainingManager:
    """Runs training jobs from a store, one at a time, each in a worker process.

    Thread-safe: ``submit``, ``cancel``, ``get`` and ``list`` may be called from any thread
    while the dispatcher thread runs.

    Args:
        store: the training jobs' store (not the merges' store).
        settings: the service settings (data dir, allowed roots, device).
        concurrency: trainings run at the same time.
    """

    def __init__(self, store: JobStore, settings: ServiceSettings, concurrency: int = 1) -> None:
        self.store = store
        self.settings = settings
        self.concurrency = concurrency
        self._workers: dict[str, _Worker] = {}
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def adapters_dir(self) -> Path:
        """Where adapters are written, ``data_dir/inputs/trainings``."""
        return self.settings.inputs_dir / TRAININGS_FOLDER

    @property
    def log_dir(self) -> Path:
        """Where the trainings' logs are kept, ``data_dir/logs/trainings``."""
        return job_log.logs_dir(self.settings.data_dir, "trainings")

    def log(self, job_id: str) -> str:
        """The training's log so far (see :mod:`service.jobs.job_log`).

        Raises:
            JobNotFoundError: no such job.
        """
        self.get(job_id)
        return job_log.read(self.log_dir, job_id)

    # -- life cycle ---------------------------------------------------------------------

    def start(self) -> None:
        """Re-queue trainings a previous server left running (they restart), then dispatch."""
        self.adapters_dir.mkdir(parents=True, exist_ok=True)
        requeued = self.store.requeue_interrupted()
        if requeued:
            log.info("re-queued %d interrupted training(s)", len(requeued))
        self._stopping.clear()
        self._thread = threading.Thread(target=self._dispatch, name="tureen-trainings", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop dispatching and end running workers; their jobs stay ``running`` to restart."""
        deadline = time.monotonic() + timeout
        self._stopping.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(max(0.0, deadline - time.monotonic()))
            self._thread = None
        with self._lock:
            workers, self._workers = dict(self._workers), {}
        for worker in workers.values():
            worker.process.terminate()
        for job_id, worker in workers.items():
            try:
                worker.process.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning("training worker of job %s did not stop; killing it", job_id)
                worker.process.kill()
                worker.process.wait()

    # -- requests -----------------------------------------------------------------------

    def validate(self, request: TrainingRequest, output_dir: Path) -> AnyTrainingConfig:
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
            "device": self.settings.device,
            **request.config,
            "output_dir": str(output_dir),
        }
        config = parse_training_config(
            document,
            request.kind,  # type: ignore[arg-type]
            base_dir=self.settings.inputs_dir,
        )
        roots = self.settings.input_roots
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

    def submit(
        self,
        request: TrainingRequest,
        *,
        idempotency_key: str | None = None,
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
        if idempotency_key is not None:
            found = self.store.find_idempotent(idempotency_key)
            if found is not None:
                job, known_hash = found
                if known_hash != request.body_hash:
                    raise IdempotencyConflictError(idempotency_key, job.id)
                return job, False
        job_id = uuid.uuid4().hex
        output_dir = self.adapters_dir / (request.output.name or job_id)
        config = self.validate(request, output_dir)
        with self._lock:
            if request.output.name is not None:
                self._check_name(request.output.name)
            job = Job(
                id=job_id,
                kind=TRAINING_KIND,
                status=JobStatus.QUEUED,
                recipe=config.model_dump(mode="json"),
                output=request.output,
                created_at=utcnow(),
            )
            job, created = self.store.create(
                job, idempotency_key=idempotency_key, body_hash=request.body_hash
            )
        if created:
            log.info("training %s queued (%s)", job.id, request.kind)
            self._wake.set()
        return job, created

    def _check_name(self, name: str) -> None:
        if os.path.lexists(self.adapters_dir / name):
            raise OutputExistsError(name, "an adapter folder of that name exists")
        for status in (JobStatus.QUEUED, JobStatus.RUNNING):
            page, _ = self.store.list(status=status, limit=500)
            if any(job.output.name == name for job in page):
                raise OutputExistsError(name, "an unfinished training writes to it")

    def cancel(self, job_id: str) -> Job:
        """Cancel a training: a queued one at once, a running one within seconds."""
        self.get(job_id)
        job = self.store.request_cancel(job_id)
        self._wake.set()
        return job

    def get(self, job_id: str) -> Job:
        """The training job with this id.

        Raises:
            JobNotFoundError: no such job.
        """
        job = self.store.get(job_id)
        if job is None:
            raise JobNotFoundError(job_id)
        return job

    def list(
        self, *, status: JobStatus | None = None, limit: int = 50, offset: int = 0
    ) -> tuple[list[Job], int]:
        """A page of training jobs, newest first, and the total count."""
        return self.store.list(status=status, limit=limit, offset=offset)

    def watch(self, job_id: str) -> AsyncIterator[Job]:
        """The job now and after each change until it is final."""
        return watch(self.store, job_id)

    def output_path(self, job: Job) -> Path:
        """The job's adapter folder, ``data_dir/inputs/trainings/<name or id>``."""
        root = self.adapters_dir.resolve()
        path = root / (job.output.name or job.id)
        if path.parent != root or path.name in ("", ".", ".."):
            raise ValueError(f"adapter name {path.name!r} leaves the trainings folder")
        return path

    def adapter_reference(self, job: Job) -> str:
        """How a merge recipe names the adapter (relative to ``data_dir/inputs``)."""
        return f"{TRAININGS_FOLDER}/{job.output.name or job.id}"

    # -- dispatching --------------------------------------------------------------------

    def _dispatch(self) -> None:
        while not self._stopping.is_set():
            try:
                self._reap()
                self._enforce_cancels()
                self._fill()
            except Exception:  # the dispatcher must outlive a bad moment of the database
                log.exception("training dispatcher error; retrying")
            self._wake.wait(DISPATCH_INTERVAL_S)
            self._wake.clear()

    def _reap(self) -> None:
        with self._lock:
            ended = {
                job_id: worker
                for job_id, worker in self._workers.items()
                if worker.process.poll() is not None
            }
            for job_id in ended:
                del self._workers[job_id]
        for job_id, worker in ended.items():
            job = self.store.get(job_id)
            if job is None or job.status is not JobStatus.RUNNING:
                continue  # the worker recorded the outcome
            discard_staging(self.output_path(job))
            if job.cancel_requested:
                self.store.update(job_id, status=JobStatus.CANCELLED, finished_at=utcnow())
                continue
            how, details = describe_exit(worker.process.returncode)
            log.error("training worker of job %s %s", job_id, how)
            job_log.append(self.log_dir, job_id, logging.ERROR, f"the worker process {how}")
            self.store.update(
                job_id,
                status=JobStatus.FAILED,
                finished_at=utcnow(),
                error=JobError(
                    code="worker_crashed",
                    message=f"the worker process running this training {how}",
                    details=details,
                ),
            )

    def _enforce_cancels(self) -> None:
        with self._lock:
            running = list(self._workers.items())
        now = time.monotonic()
        for job_id, worker in running:
            if worker.cancel_seen_at is None:
                if self.store.cancel_requested(job_id):
                    worker.cancel_seen_at = now
            elif now - worker.cancel_seen_at > CANCEL_GRACE_S:
                log.warning(
                    "training worker of job %s ignored its cancellation; killing it", job_id
                )
                worker.process.kill()

    def _fill(self) -> None:
        while not self._stopping.is_set():
            with self._lock:
                if len(self._workers) >= self.concurrency:
                    return
            job = self.store.claim_next()
            if job is None:
                return
            if job.cancel_requested:
                self.store.update(job.id, status=JobStatus.CANCELLED, finished_at=utcnow())
                continue
            try:
                process = subprocess.Popen(
                    self.worker_command(job),
                    env=worker_environment(),
                    stdin=subprocess.DEVNULL,
                    start_new_session=True,
                )
            except OSError as error:
                log.exception("cannot start a training worker for job %s", job.id)
                self.store.update(
                    job.id,
                    status=JobStatus.FAILED,
                    finished_at=utcnow(),
                    error=JobError(
                        code="internal_error", message=f"cannot start a worker: {error}"
                    ),
                )
                continue
            with self._lock:
                self._workers[job.id] = _Worker(process)
            self.store.update(job.id, worker_pid=process.pid)
            log.info("training %s started in worker %d", job.id, process.pid)

    def worker_command(self, job: Job) -> builtins.list[str]:
        """The command line of the worker process that runs ``job``."""
        return [
            sys.executable,
            "-m",
            "service.jobs.training_worker",
            job.id,
            "--db",
            self.store.location,
            "--output",
            str(self.output_path(job)),
            "--parent-pid",
            str(os.getpid()),
            "--log-level",
            self.settings.log_level,
            "--log-dir",
            str(self.log_dir),
        ]


def held_out_summary(evaluation: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """The held-out numbers a finished training recorded, if any."""
    if not evaluation:
        return None
    held_out = evaluation.get("held_out")
    return dict(held_out) if isinstance(held_out, Mapping) else None
