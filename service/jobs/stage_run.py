"""Running a multi-document job's stages in its worker (see :mod:`service.jobs.stages`).

The stages run in dependency order through
:func:`~merge_kernels.multi_merge_run.run_multi_merge`: each is an ordinary atomic,
resumable merge. The named ones write the job's intermediates folder, which only this job's
stages may read (it joins the allowed roots for them alone); the final one writes the job's
output, published exactly as a single merge's. The job's ``stages`` record each stage's
state and progress, and the job's ``progress`` follows the running stage.

Cancelled or failed, the job keeps nothing: intermediates, staging folder and commit
records are removed (as :func:`service.jobs.worker.discard_staging` does for every job).
Interrupted by a restart, it keeps them: the next attempt keeps each intermediate an
earlier attempt finished and resumes the unfinished merge after its last finished shard.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path
from typing import Any

from merge_kernels.errors import MergeCancelledError, TureenError
from merge_kernels.multi_merge import MergeStep, MultiMerge
from merge_kernels.multi_merge_run import run_multi_merge, step_options
from merge_kernels.runner import MergeOptions, MergeResult, Progress, committed_result
from service.jobs.failures import job_error
from service.jobs.models import Job, JobError, JobProgress, JobStage, JobStatus, StageState
from service.jobs.sqlite_store import utcnow
from service.jobs.stages import (
    MERGES_KEY,
    discard_intermediates,
    in_stage,
    intermediates_folder,
    parse_stages,
    stage_label,
    stage_records,
)
from service.jobs.store import JobStore
from service.jobs.worker import (
    CancelPoll,
    ProgressWriter,
    discard_staging,
    forget_commit,
    parse_job_recipe,
    succeeded_fields,
)

log = logging.getLogger(__name__)


def job_stages(job: Job, output: Path, options: MergeOptions) -> tuple[MultiMerge, MergeOptions]:
    """The job's merges, their intermediates in the job's own folder, and the options they
    run with: ``options`` whose allowed roots also hold that folder.

    Raises:
        RecipeError: the stored documents no longer validate.
    """
    base_dir = options.base_dir or Path.cwd()
    folder = intermediates_folder(output)
    merges = parse_stages(
        job.recipe[MERGES_KEY],
        intermediate_dir=folder,
        base_dir=base_dir,
        parse=lambda document: parse_job_recipe(document, base_dir=base_dir),
    )
    if options.allowed_roots is not None:
        # The job's own intermediates, named only through document names (never a path a
        # request gave: every path of every document was checked against the roots).
        options = replace(options, allowed_roots=(*options.allowed_roots, folder))
    return merges, options


def committed_stages_result(job: Job, output: Path, options: MergeOptions) -> MergeResult | None:
    """The final merge's result if its worker published ``output`` before it died, else None
    (see :func:`service.jobs.worker.record_if_committed`)."""
    merges, options = job_stages(job, output, options)
    final = next(step for step in merges.steps if step.final)
    return committed_result(final.recipe, output, step_options(final, options))


class _StageTracker:
    """Keeps the job's stage records and writes them with the running stage's progress."""

    def __init__(self, store: JobStore, job: Job, merges: MultiMerge) -> None:
        self.store = store
        self.job_id = job.id
        known = job.stages or []
        fresh = stage_records(merges)
        # A resumed job keeps what earlier attempts recorded, except a stage's running state.
        if [(s.index, s.name) for s in known] == [(s.index, s.name) for s in fresh]:
            self.stages = [_pending_if_running(stage) for stage in known]
        else:
            self.stages = fresh
        self.steps = list(merges.steps)
        self.position: int | None = None
        self.writer: _StageProgressWriter | None = None

    def announce(self, step: MergeStep, target: Path, reused: bool) -> None:
        """``run_multi_merge``'s announcement: the previous stage ended well, ``step`` starts."""
        self.finish(StageState.SUCCEEDED)
        self.position = self.steps.index(step)
        now = utcnow()
        if reused:
            log.info("stage %s: kept from an earlier attempt", stage_label(step))
            stage = self.stages[self.position]
            self._set(state=StageState.REUSED, started_at=stage.started_at or now, finished_at=now)
            self.position = None
            return
        log.info("stage %s: merging", stage_label(step))
        self._set(state=StageState.RUNNING, started_at=now, finished_at=None)
        self.writer = _StageProgressWriter(self, stage_label(step))
        self.store.update(
            self.job_id,
            stages=self.stages,
            progress=JobProgress(phase="planning", stage=stage_label(step)),
        )

    def __call__(self, progress: Progress) -> None:
        if self.writer is not None:
            self.writer(progress)

    def finish(self, state: StageState) -> None:
        """End the running stage, if any, in ``state`` and record it."""
        if self.position is None:
            return
        self._set(state=state, finished_at=utcnow())
        self.position = None
        self.store.update(self.job_id, stages=self.stages)

    def current(self) -> MergeStep | None:
        """The stage running now."""
        return None if self.position is None else self.steps[self.position]

    def with_progress(self, snapshot: JobProgress) -> list[JobStage]:
        """The stage records with ``snapshot`` as the running stage's progress."""
        if self.position is not None:
            self._set(progress=snapshot.model_copy(update={"stage": None}))
        return self.stages

    def _set(self, **changes: Any) -> None:
        assert self.position is not None
        stage = self.stages[self.position]
        self.stages[self.position] = stage.model_copy(update=changes)


def _pending_if_running(stage: JobStage) -> JobStage:
    if stage.state is not StageState.RUNNING:
        return stage
    return stage.model_copy(update={"state": StageState.PENDING})


class _StageProgressWriter(ProgressWriter):
    """Progress of one stage: in the job's ``progress`` (naming the stage) and its record."""

    def __init__(self, tracker: _StageTracker, label: str) -> None:
        super().__init__(tracker.store, tracker.job_id)
        self.tracker = tracker
        self.label = label

    def fields(self, snapshot: JobProgress) -> dict[str, object]:
        snapshot = snapshot.model_copy(update={"stage": self.label})
        return {"progress": snapshot, "stages": self.tracker.with_progress(snapshot)}


def run_stage_job(store: JobStore, job: Job, output: Path, options: MergeOptions) -> JobStatus:
    """Run a claimed multi-document job to its end and record the outcome.

    Args:
        store: the job store.
        job: the job, running.
        output: the job's output folder.
        options: engine options, the job's output options applied.

    Returns:
        The job's final status.
    """
    tracker: _StageTracker | None = None
    error: JobError | None = None
    try:
        merges, options = job_stages(job, output, options)
        tracker = _StageTracker(store, job, merges)
        results = run_multi_merge(
            merges,
            output,
            options,
            progress=tracker,
            announce=tracker.announce,
            should_cancel=CancelPoll(store, job.id),
        )
        tracker.finish(StageState.SUCCEEDED)
    except MergeCancelledError:
        log.info("job %s cancelled", job.id)
    except Exception as failure:
        step = tracker.current() if tracker is not None else None
        if isinstance(failure, TureenError) and step is not None:
            failure = in_stage(failure, step)
        if isinstance(failure, TureenError | FileExistsError):
            log.info("job %s failed: %s", job.id, failure)
        else:
            log.exception("job %s failed unexpectedly", job.id)
        error = job_error(failure, store)
    else:
        final = results[-1].result
        log.info("job %s succeeded: %s", job.id, final.out_dir)
        succeeded = succeeded_fields(store.get(job.id) or job, final)
        done = succeeded["progress"]
        assert isinstance(done, JobProgress)
        succeeded["progress"] = done.model_copy(update={"stage": None})
        # The run's time is every stage's it merged, not the final one's alone.
        succeeded["merge_seconds"] = sum(item.result.seconds for item in results if not item.reused)
        store.update(job.id, **succeeded)
        forget_commit(output)
        discard_intermediates(output)
        return JobStatus.SUCCEEDED
    if tracker is not None:
        tracker.finish(StageState.CANCELLED if error is None else StageState.FAILED)
    # No partial output is kept, intermediates included: nothing could resume them.
    discard_staging(output)
    fields: dict[str, object] = {"finished_at": utcnow(), "error": error}
    if error is None:
        status = JobStatus.CANCELLED
        progress = (store.get(job.id) or job).progress
        fields["progress"] = progress.model_copy(
            update={"phase": "cancelled", "current": None, "eta_seconds": None}
        )
    else:
        status = JobStatus.FAILED  # the progress is kept: it shows where the merge stopped
    store.update(job.id, status=status, **fields)
    return status
