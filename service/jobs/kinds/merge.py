"""The merge job kind: merges (single and multi-document) validated, queued and run.

A merge is validated before it becomes a job (the plan is built from headers, so a bad
recipe or incompatible checkpoints are refused at once, and the memory budget and the disk
are checked), then run by :mod:`service.jobs.worker` in standby worker processes, at most
``settings.workers`` at a time. A worker that dies after publishing its output has its job
recorded as succeeded (the engine's commit record vouches for it); otherwise the partial
output is discarded. An interrupted merge resumes after its last finished shard.

:class:`MergeJobs` is the job system with the merge submission methods and the publisher
that uploads merges to the Hugging Face Hub.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from merge_kernels.checkpoints import open_checkpoint
from merge_kernels.errors import TureenError
from merge_kernels.io.disk_space import require_space
from merge_kernels.io.safetensors_header import header_limits
from merge_kernels.multi_merge import MergeStep, MultiMerge
from merge_kernels.plan import MergePlan, PlannedInput
from merge_kernels.recipe import Recipe
from merge_kernels.runner import MergeOptions, close_inputs, plan_merge
from merge_kernels.slices import input_references
from service.evaluation.config import build_evaluator
from service.hub import Publisher
from service.jobs.kinds import JobKind, WorkerSetup, register_kind
from service.jobs.models import Job, JobStage, JobStatus, OutputOptions
from service.jobs.sqlite_store import utcnow
from service.jobs.stages import in_stage, recipe_record, stage_records, stage_warnings
from service.jobs.store import JobStore
from service.jobs.system import JobSystem
from service.jobs.worker import (
    discard_staging,
    record_if_committed,
    with_output_options,
    worker_command,
)
from service.settings import ServiceSettings

log = logging.getLogger(__name__)

MERGE_KIND = "merge"


class OverMemoryBudgetError(TureenError):
    """The merge's estimated peak memory exceeds the service's memory budget."""

    code = "over_memory_budget"

    def __init__(self, estimate: int, budget: int) -> None:
        super().__init__(
            f"this merge is estimated to need {estimate / 1024**3:.2f} GiB ({estimate} bytes) "
            f"of memory at its peak, more than the service's budget of "
            f"{budget / 1024**3:.2f} GiB ({budget} bytes); merge fewer or smaller models",
            details={"estimate_bytes": estimate, "budget_bytes": budget},
        )


def engine_options(settings: ServiceSettings, output: OutputOptions | None = None) -> MergeOptions:
    """The engine options merge jobs run (and are planned) with, for ``output``."""
    options = MergeOptions(
        device=settings.device,
        allowed_roots=settings.input_roots,
        base_dir=settings.inputs_dir,
        executor=settings.executor,
        ray_address=settings.ray_address,
    )
    return with_output_options(options, output) if output is not None else options


def _standby_command(setup: WorkerSetup) -> Sequence[str]:
    settings = setup.settings
    return worker_command(
        None,
        store_location=setup.store_location,
        output=None,
        device=settings.device,
        base_dir=settings.inputs_dir,
        allowed_roots=settings.input_roots,
        evaluator_hosts=settings.evaluator_hosts,
        log_level=settings.log_level,
        public_url=settings.public_url,
        log_dir=setup.log_dir,
        executor=settings.executor,
        ray_address=settings.ray_address,
    )


def _recover(store: JobStore, job: Job, output: Path, settings: ServiceSettings) -> bool:
    # It died after publishing the output, before recording it.
    return record_if_committed(store, job, output, engine_options(settings))


MERGE = register_kind(
    JobKind(
        name=MERGE_KIND,
        noun="job",
        output_noun="output",
        log_folder="merges",
        output_root=lambda settings: settings.outputs_dir,
        standby_command=_standby_command,
        discard=discard_staging,
        concurrency=lambda settings: settings.workers,
        spare=lambda settings: 1 if settings.standby_worker else 0,
        cancel_grace_s=5.0,
        recover=_recover,
        metric_family="tureen_jobs",
    )
)


class MergeJobs(JobSystem):
    """The job system, with merge submission and publishing to the Hub.

    Args:
        store: where jobs are kept.
        settings: the service settings (data dir, allowed roots, workers, budget, device).
    """

    def __init__(self, store: JobStore, settings: ServiceSettings) -> None:
        super().__init__(store, settings)
        # Publishing to the Hugging Face Hub runs in this process (see service.hub).
        self.publisher = Publisher(store, settings, self.output_path)

    def start(self) -> None:
        """Start the job system, then the publisher (see :meth:`JobSystem.start`)."""
        super().start()
        self.publisher.start()  # publishing to the Hub

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the publisher, then the job system (see :meth:`JobSystem.stop`)."""
        deadline = time.monotonic() + timeout
        self.publisher.stop(timeout / 2)  # publishing to the Hub
        super().stop(max(0.0, deadline - time.monotonic()))

    @property
    def log_dir(self) -> Path:
        """Where the merges' logs are kept, ``data_dir/logs/merges``."""
        return self.kind_log_dir(MERGE_KIND)

    def engine_options(self, output: OutputOptions | None = None) -> MergeOptions:
        """The engine options jobs run with (and are planned with), for ``output``."""
        return engine_options(self.settings, output)

    def check_evaluator(self, recipe: Recipe) -> None:
        """Check the recipe's evaluator (data file inside the roots, host allowed), if any.

        Checked before a job exists, so that a bad data path or a disallowed host is a 4xx,
        not a failed job.

        Raises:
            RecipeError: naming ``evaluator.*``.
        """
        if recipe.method.needs_evaluation or recipe.evaluator is not None:
            options = self.engine_options()
            build_evaluator(
                recipe.evaluator,
                base_dir=options.base_dir,
                allowed_roots=options.allowed_roots,
                allowed_hosts=self.settings.evaluator_hosts,
                device=options.device,
            )

    def plan(self, recipe: Recipe, output: OutputOptions) -> tuple[MergePlan, list[PlannedInput]]:
        """Plan the merge as a job would run it, within the service's header limits, after
        checking its evaluator; the caller closes the inputs.

        Raises:
            RecipeError, CheckpointNotFoundError, CheckpointFileError: the merge cannot be
                planned (headers over the limits included).
        """
        self.check_evaluator(recipe)
        with header_limits(self.settings.header_limits()):
            return plan_merge(recipe, self.engine_options(output))

    def validate(self, recipe: Recipe, output: OutputOptions) -> int:
        """Plan the merge from headers, as a job would run it, and check the memory budget.

        Returns:
            The plan's peak-memory estimate in bytes.

        Raises:
            RecipeError, IncompatibleCheckpointsError, CheckpointNotFoundError,
            CheckpointFileError: the merge cannot run.
            OverMemoryBudgetError: the estimate exceeds ``settings.memory_budget_bytes``.
            InsufficientSpaceError: the output does not fit on the data dir's disk.
        """
        options = self.engine_options(output)
        plan, inputs = self.plan(recipe, output)
        try:
            plan.raise_for_problems()
            estimate = plan.peak_memory_estimate()
            output_bytes = plan.output_bytes
        finally:
            close_inputs(inputs)
        # Refused now rather than failed later; the worker checks again before it writes.
        require_space(self.settings.outputs_dir, output_bytes, options.space_reserve_bytes)
        budget = self.settings.memory_budget_bytes
        if budget is not None and estimate > budget:
            raise OverMemoryBudgetError(estimate, budget)
        return estimate

    def submit(
        self,
        recipe: Recipe,
        output: OutputOptions,
        *,
        idempotency_key: str | None = None,
        body_hash: str | None = None,
        hub_token: str | None = None,
    ) -> tuple[Job, bool]:
        """Validate a merge and queue it as a job.

        Blocks while the inputs' headers are read (for Hub references, downloaded), so call
        it from a worker thread in an async server.

        Args:
            recipe: the validated recipe.
            output: the client's output options.
            idempotency_key: the client's key for this request; a repeat with the same
                ``body_hash`` returns the first job without validating again.
            body_hash: a hash of the request body.
            hub_token: the request's Hugging Face token for ``output.publish``; held in this
                process's memory only (see :mod:`service.hub`), never stored.

        Returns:
            ``(job, created)``: the queued job, and False when the key returned an
            existing job.

        Raises:
            IdempotencyConflictError: the key was used with a different body.
            OutputExistsError: ``output.name`` is taken.
            OverMemoryBudgetError: the merge needs more memory than the budget.
            TureenError: the engine's errors for a merge that cannot run (see ``validate``).
        """
        repeat = self.idempotent_repeat(MERGE_KIND, idempotency_key, body_hash)
        if repeat is not None:
            return repeat, False
        self.validate(recipe, output)
        return self._create(
            recipe.model_dump(mode="json"),
            output,
            warnings=recipe.warnings(),
            stages=None,
            idempotency_key=idempotency_key,
            body_hash=body_hash,
            hub_token=hub_token,
            method=recipe.merge_method,
        )

    def plan_stage(
        self, step: MergeStep, output: OutputOptions, intermediate_dir: Path
    ) -> tuple[MergePlan, list[PlannedInput]] | None:
        """Plan one stage of a multi-document merge; errors name the stage.

        A stage that reads another stage's output (``intermediate_dir/name``, not written
        before the job runs) cannot be planned yet: its other inputs are opened (headers
        only), so that every file under them is checked against the roots now, and None is
        returned.

        Raises:
            As :meth:`plan`, the message and details naming the stage.
        """
        try:
            if not step.needs:
                return self.plan(step.recipe, output)
            options = self.engine_options(output)
            with header_limits(self.settings.header_limits()):
                for _, _, reference in input_references(step.recipe):
                    if not str(reference).startswith(f"{intermediate_dir}/"):
                        with open_checkpoint(
                            reference,
                            allowed_roots=options.allowed_roots,
                            allow_pickle=options.allow_pickle,
                            base_dir=options.base_dir,
                        ) as checkpoint:
                            # Read through the confinement, as a plan reads them.
                            _ = (checkpoint.config, checkpoint.entries())
            return None
        except TureenError as error:
            raise in_stage(error, step) from None

    def validate_stages(self, merges: MultiMerge, output: OutputOptions) -> None:
        """:meth:`validate` every stage that can be planned before the job runs: those that
        read only the request's checkpoints. The others are planned as they start; their
        other inputs are opened now (see :meth:`plan_stage`).

        Raises:
            As :meth:`validate`, the message and details naming the stage.
        """
        for step in merges.steps:
            if step.needs:
                self.plan_stage(step, output, merges.intermediate_dir)
                continue
            try:
                self.validate(step.recipe, output)
            except TureenError as error:
                raise in_stage(error, step) from None

    def submit_stages(
        self,
        merges: MultiMerge,
        output: OutputOptions,
        *,
        idempotency_key: str | None = None,
        body_hash: str | None = None,
        hub_token: str | None = None,
    ) -> tuple[Job, bool]:
        """Validate a multi-document merge and queue it as one job (see :meth:`submit`).

        The job's stages run in ``merges``' order; only the final one writes the output.

        Raises:
            As :meth:`submit`, errors of a stage naming it.
        """
        repeat = self.idempotent_repeat(MERGE_KIND, idempotency_key, body_hash)
        if repeat is not None:
            return repeat, False
        self.validate_stages(merges, output)
        return self._create(
            recipe_record(merges),
            output,
            warnings=stage_warnings(merges),
            stages=stage_records(merges),
            idempotency_key=idempotency_key,
            body_hash=body_hash,
            hub_token=hub_token,
            method=" then ".join(step.recipe.merge_method for step in merges.steps),
        )

    def _create(
        self,
        recipe: dict[str, Any],
        output: OutputOptions,
        *,
        warnings: list[str],
        stages: list[JobStage] | None,
        idempotency_key: str | None,
        body_hash: str | None,
        hub_token: str | None,
        method: str,
    ) -> tuple[Job, bool]:
        job = Job(
            id=uuid.uuid4().hex,
            kind=MERGE_KIND,
            status=JobStatus.QUEUED,
            recipe=recipe,
            output=output,
            created_at=utcnow(),
            warnings=warnings,
            stages=stages,
            publish=(  # publishing to the Hub
                Publisher.initial(output.publish, hub_token) if output.publish else None
            ),
        )
        job, created = self.enqueue(job, idempotency_key=idempotency_key, body_hash=body_hash)
        if created:
            if output.publish is not None:
                self.publisher.remember(job.id, hub_token)
            log.info("job %s queued (%s)", job.id, method)
        return job, created
