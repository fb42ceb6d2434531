"""One training job in a process of its own.

``python -m service.jobs.training_worker JOB_ID --db PATH --output DIR`` (or ``--standby``,
as the service runs it: jobs handed over on standard input, see :mod:`service.jobs.standby`):
reads the job's validated config from the job store, trains the adapter into ``DIR``
(published only once complete), writes progress (steps, loss, ETA; at most four times a
second) and the outcome back, and polls the store's cancel flag before every optimizer
step. A crash or an out-of-memory kill ends only this process; the service fails the job.
If the service process dies, the worker exits promptly and the job restarts with the next
server.
"""

from __future__ import annotations

import argparse
import logging
import time
from collections.abc import Sequence
from pathlib import Path

from merge_kernels.errors import TureenError
from service.jobs import standby
from service.jobs.failures import job_error
from service.jobs.models import JobError, JobProgress, JobStatus
from service.jobs.sqlite_store import utcnow
from service.jobs.store import JobStore
from service.jobs.worker import CancelPoll, discard_staging, start_worker
from training.progress import TrainingProgress

log = logging.getLogger(__name__)

PROGRESS_INTERVAL_S = 0.25


class TrainingProgressWriter:
    """Writes training progress into the store, throttled (phase changes always written)."""

    def __init__(self, store: JobStore, job_id: str, interval: float = PROGRESS_INTERVAL_S):
        self.store = store
        self.job_id = job_id
        self.interval = interval
        self._last_write = float("-inf")
        self._last_phase: str | None = None
        self._last_loss: float | None = None

    def __call__(self, update: TrainingProgress) -> None:
        """Record ``update`` unless the last write was too recent."""
        now = time.monotonic()
        if update.loss is not None:
            self._last_loss = update.loss
        final_step = update.total_steps > 0 and update.step == update.total_steps
        if (
            update.phase == self._last_phase
            and not final_step
            and now - self._last_write < self.interval
        ):
            return
        self._last_write = now
        self._last_phase = update.phase
        snapshot = JobProgress(
            phase=update.phase,
            steps_done=update.step,
            steps_total=update.total_steps or None,
            loss=self._last_loss,
            eta_seconds=0.0 if update.phase == "done" else update.eta_seconds,
        )
        try:
            self.store.update(self.job_id, progress=snapshot)
        except Exception:  # a lost progress report must not fail the training
            log.warning("could not record progress of training %s", self.job_id, exc_info=True)


def run_training_job(store: JobStore, job_id: str, output: Path) -> JobStatus:
    """Run one claimed training job to its end and record the outcome in the store.

    Args:
        store: the training store.
        job_id: a job in state running.
        output: the adapter folder to write.

    Returns:
        The job's final status.
    """
    from training.config import parse_training_config
    from training.errors import TrainingCancelledError
    from training.runner import run_training

    job = store.get(job_id)
    if job is None or job.status is not JobStatus.RUNNING:
        log.warning("training %s is not running; nothing to do", job_id)
        return job.status if job is not None else JobStatus.FAILED
    error: JobError | None = None
    try:
        document = {**job.recipe, "output_dir": str(output), "overwrite": False}
        config = parse_training_config(document, job.recipe.get("kind", "lora"))
        report = run_training(
            config,
            progress=TrainingProgressWriter(store, job_id),
            should_stop=CancelPoll(store, job_id),
        )
    except TrainingCancelledError:
        log.info("training %s cancelled", job_id)
    except TureenError as failure:
        log.info("training %s failed: %s", job_id, failure.message)
        error = job_error(failure, store)
    except Exception as failure:
        log.exception("training %s failed unexpectedly", job_id)
        error = job_error(failure, store)
    else:
        current = store.get(job_id) or job
        store.update(
            job_id,
            status=JobStatus.SUCCEEDED,
            finished_at=utcnow(),
            output_dir=str(output),
            files=report.get("files", []),
            merge_seconds=report.get("seconds"),
            evaluation={
                "held_out": report.get("held_out"),
                "steps": report.get("training", {}).get("steps"),
                "data": report.get("data"),
            },
            error=None,
            progress=current.progress.model_copy(update={"phase": "done", "eta_seconds": 0.0}),
        )
        log.info("training %s succeeded: %s", job_id, output)
        return JobStatus.SUCCEEDED
    discard_staging(output)
    fields: dict[str, object] = {"finished_at": utcnow(), "error": error}
    status = JobStatus.FAILED if error is not None else JobStatus.CANCELLED
    if error is None:
        progress = (store.get(job_id) or job).progress
        fields["progress"] = progress.model_copy(update={"phase": "cancelled", "eta_seconds": None})
    store.update(job_id, status=status, **fields)
    return status


def main(argv: Sequence[str] | None = None) -> int:
    """Run the training job named on the command line; 0 once its outcome is recorded."""
    parser = argparse.ArgumentParser(prog="python -m service.jobs.training_worker")
    parser.add_argument("job_id", nargs="?")
    parser.add_argument("--standby", action="store_true", help="wait for jobs on stdin")
    parser.add_argument("--db", required=True, help="the job store's location")
    parser.add_argument("--output", type=Path, help="the adapter folder")
    parser.add_argument("--parent-pid", type=int, default=None)
    parser.add_argument("--log-level", default="info")
    parser.add_argument("--log-dir", type=Path, default=None, help="where job logs are kept")
    args = parser.parse_args(argv)
    start_worker(args, "training", "training")
    import warnings

    from transformers.utils import logging as transformers_logging

    warnings.filterwarnings("ignore", category=FutureWarning)
    transformers_logging.disable_progress_bar()  # type: ignore[no-untyped-call]
    return standby.run_from_args(run_training_job, args)


if __name__ == "__main__":
    standby.exit_at_once(main())
