"""The search job kind: recipe searches (grid, random, CMA-ES) validated, queued and run.

A search spec (:mod:`merge_kernels.search.space`: a recipe with dimensions, a strategy, a
budget, the evaluators) is validated before it becomes a job, as a merge is: the spec
itself, its evaluators (data files inside the allowed folders, HTTP hosts allowed, as a
merge's evaluator), and the recipe at the middle of the space planned from headers like a
merge (every checkpoint inside the allowed folders, the memory budget, the disk). It then
runs in :mod:`service.jobs.search_worker`, one search at a time (a search merges and scores
candidates back to back and would only compete with itself for the machine), saving its
state into the job store after every evaluation: a paused, killed or restarted search
resumes where it was without scoring any point again. The winner is written to
``data_dir/searches/<name or job id>`` like a merge's output.
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

from merge_kernels.errors import RecipeError
from merge_kernels.search import SearchSpec, parse_search_spec
from merge_kernels.search.space import search_space
from service.evaluation.config import build_evaluator
from service.jobs.kinds import JobKind, WorkerSetup, register_kind
from service.jobs.kinds.merge import MergeJobs
from service.jobs.models import Job, JobStatus, OutputOptions
from service.jobs.sqlite_store import utcnow
from service.jobs.store import JobStore
from service.jobs.worker import discard_staging
from service.settings import ServiceSettings

log = logging.getLogger(__name__)

SEARCH_KIND = "search"
SEARCHES_FOLDER = "searches"  # under data_dir


def searches_dir(settings: ServiceSettings) -> Path:
    """Where search winners are written, ``data_dir/searches``."""
    return settings.data_dir / SEARCHES_FOLDER


def _standby_command(setup: WorkerSetup) -> Sequence[str]:
    settings = setup.settings
    command = [
        sys.executable,
        "-m",
        "service.jobs.search_worker",
        "--standby",
        "--db",
        setup.store_location,
        "--device",
        settings.device,
        "--base-dir",
        str(settings.inputs_dir),
        "--parent-pid",
        str(os.getpid()),
        "--log-level",
        settings.log_level,
        "--log-dir",
        str(setup.log_dir),
    ]
    for root in settings.input_roots:
        command += ["--allow-root", str(root)]
    for host in settings.evaluator_hosts:
        command += ["--evaluator-host", host]
    return command


SEARCH = register_kind(
    JobKind(
        name=SEARCH_KIND,
        noun="search",
        output_noun="output",
        log_folder="searches",
        output_root=searches_dir,
        standby_command=_standby_command,
        discard=discard_staging,
        concurrency=lambda settings: 1,  # candidates back to back: one search at a time
        spare=lambda settings: 0,  # one process per search
        cancel_grace_s=10.0,  # seen between evaluations and while a candidate is merged
        metric_family="tureen_searches",
    )
)


@dataclass(frozen=True)
class SearchRequest:
    """A search request as the client sent it, split into its parts.

    Attributes:
        spec: the spec document (without ``output``).
        output: output options; only ``name`` is used.
        body_hash: sha256 of the canonical request, for idempotency checks.
    """

    spec: dict[str, Any]
    output: OutputOptions
    body_hash: str


def split_request(document: object) -> SearchRequest:
    """Split a request body into the spec document and the output options.

    Raises:
        RecipeError: the body is no mapping, or ``output`` sets more than ``name``.
    """
    if not isinstance(document, Mapping):
        raise RecipeError("body", "the body must be a search spec: recipe, strategy, budget, ...")
    output_value = document.get("output") or {}
    if not isinstance(output_value, Mapping) or set(output_value) - {"name"}:
        raise RecipeError("output", "only output.name may be given for a search")
    try:
        output = OutputOptions(name=output_value.get("name"))
    except ValueError:
        raise RecipeError(
            "output.name", "use 1-128 letters, digits, '.', '_' or '-', starting alphanumeric"
        ) from None
    spec = {key: value for key, value in document.items() if key != "output"}
    canonical = json.dumps(
        {"spec": spec, "name": output.name}, sort_keys=True, separators=(",", ":"), default=str
    )
    return SearchRequest(spec, output, hashlib.sha256(canonical.encode()).hexdigest())


def parse_job_spec(document: Mapping[str, Any], settings: ServiceSettings) -> SearchSpec:
    """The spec a search job keeps, parsed as the service runs it (paths relative to
    ``data_dir/inputs``).

    Raises:
        RecipeError: naming the field.
    """
    return parse_search_spec(dict(document), base_dir=settings.inputs_dir)


def validate_search(jobs: MergeJobs, request: SearchRequest) -> SearchSpec:
    """Check a search as its job would run it.

    Raises:
        RecipeError: the spec, an evaluator (``evaluator.*``, ``test.*``) or the recipe at
            the middle of the space (``recipe.*``) is invalid.
        CheckpointNotFoundError, CheckpointFileError, IncompatibleCheckpointsError,
        OverMemoryBudgetError, InsufficientSpaceError: as a merge of that recipe.
    """
    settings = jobs.settings
    spec = parse_job_spec(request.spec, settings)
    sections: list[tuple[str, dict[str, Any] | None]] = [
        ("evaluator", spec.evaluator),
        ("test", spec.test_evaluator()),
    ]
    for field, section in sections:
        if section is None:
            continue
        try:
            build_evaluator(
                section,
                base_dir=settings.inputs_dir,
                allowed_roots=settings.input_roots,
                allowed_hosts=settings.evaluator_hosts,
                device=settings.device,
            )
        except RecipeError as error:
            if field == "evaluator":
                raise
            # The test section is the evaluator's with test's keys: name the test's field.
            where = error.field.replace("evaluator", "test", 1)
            raise RecipeError(where, error.message.removeprefix(f"{error.field}: ")) from None
    # Every corner of the space parses (checked by the space); the middle one is planned
    # like a merge, which checks each checkpoint against the allowed folders.
    space = search_space(spec, settings.inputs_dir)
    middle = space.instantiate(space.decode([0.5] * len(space.dimensions)))
    jobs.validate(middle, OutputOptions())
    return spec


def submit_search(
    jobs: MergeJobs, request: SearchRequest, *, idempotency_key: str | None = None
) -> tuple[Job, bool]:
    """Validate a search and queue it as a job.

    Returns:
        ``(job, created)``: the queued job, and False when the key returned an earlier job.

    Raises:
        IdempotencyConflictError: the key was used with a different body.
        OutputExistsError: ``output.name`` is taken.
        As :func:`validate_search`: the search cannot run.
    """
    repeat = jobs.idempotent_repeat(SEARCH_KIND, idempotency_key, request.body_hash)
    if repeat is not None:
        return repeat, False
    spec = validate_search(jobs, request)
    job = Job(
        id=uuid.uuid4().hex,
        kind=SEARCH_KIND,
        status=JobStatus.QUEUED,
        recipe=spec.model_dump(mode="json"),
        output=request.output,
        created_at=utcnow(),
    )
    job, created = jobs.enqueue(job, idempotency_key=idempotency_key, body_hash=request.body_hash)
    if created:
        log.info("search %s queued (%s)", job.id, spec.strategy.name)
    return job, created


class JobSearchState:
    """A :class:`~merge_kernels.search.state.SearchStateStore` in the job's record."""

    def __init__(self, store: JobStore, job_id: str) -> None:
        self.store = store
        self.job_id = job_id

    def load(self) -> dict[str, Any] | None:
        """The state the job saved last, or None."""
        return self.store.search_state(self.job_id)

    def save(self, state: dict[str, Any]) -> None:
        """Replace the job's saved state (committed on return)."""
        self.store.save_search_state(self.job_id, state)
