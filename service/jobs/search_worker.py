"""One search job in a process of its own.

``python -m service.jobs.search_worker --standby --db PATH ...`` (as the service runs it:
jobs handed over on standard input, see :mod:`service.jobs.standby`): reads the job's
validated spec from the job store and runs :func:`merge_kernels.search.run_search`, its
state saved into the job's record after every evaluation (so a restarted or resumed search
scores no point twice), its progress (evaluations done of the budget, the best score so
far) written into ``Job.progress``, and the cancel and pause flags polled between
evaluations and while a candidate is merged. A stop for a pause keeps the state; a
cancellation drops it with the partial output. The winner is written like a merge's output,
with ``report.json``, ``scores.svg`` and ``best_recipe.yaml``, and the report is kept in
``Job.evaluation``.
"""

from __future__ import annotations

import argparse
import logging
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from merge_kernels.errors import MergeCancelledError, TureenError
from merge_kernels.runner import MergeOptions
from service.jobs import standby
from service.jobs.failures import job_error
from service.jobs.models import JobError, JobProgress, JobStatus
from service.jobs.sqlite_store import paused_fields, utcnow
from service.jobs.store import JobStore
from service.jobs.worker import discard_staging, start_worker

log = logging.getLogger(__name__)

STOP_POLL_INTERVAL_S = 0.1


class StopPoll:
    """``should_stop`` for the search: the job's cancel or pause flag, read at most every
    interval (a job that no longer exists stops too)."""

    def __init__(self, store: JobStore, job_id: str, interval: float = STOP_POLL_INTERVAL_S):
        self.store = store
        self.job_id = job_id
        self.interval = interval
        self._last_read = float("-inf")
        self._stop = False

    def __call__(self) -> bool:
        """True once a cancellation or a pause was asked for."""
        now = time.monotonic()
        if not self._stop and now - self._last_read >= self.interval:
            self._last_read = now
            try:
                job = self.store.get(self.job_id)
                self._stop = job is None or job.cancel_requested or job.pause_requested
            except Exception:  # a busy database must not fail the search; ask again later
                log.warning("could not read the flags of search %s", self.job_id, exc_info=True)
        return self._stop


class SearchProgressWriter:
    """Writes the search's progress (one write per evaluation and per phase) into the store."""

    def __init__(self, store: JobStore, job_id: str) -> None:
        self.store = store
        self.job_id = job_id
        self.best: float | None = None

    def __call__(self, update: Any) -> None:
        """Record ``update`` (a :class:`~merge_kernels.search.SearchProgress`)."""
        if update.best is not None:
            self.best = update.best
        if update.phase == "writing" and update.score is not None:
            self.best = update.score
        snapshot = JobProgress(
            phase="done" if update.phase == "done" else f"search: {update.phase}",
            evaluations_done=update.done,
            evaluations_total=update.budget,
            best_score=self.best,
            last_score=update.score if update.phase == "evaluated" else None,
            eta_seconds=0.0 if update.phase == "done" else None,
        )
        try:
            self.store.update(self.job_id, progress=snapshot)
        except Exception:  # a lost progress report must not fail the search
            log.warning("could not record progress of search %s", self.job_id, exc_info=True)


def run_search_job(
    store: JobStore,
    job_id: str,
    output: Path,
    options: MergeOptions,
    *,
    evaluator_hosts: Sequence[str],
) -> JobStatus:
    """Run (or resume) one claimed search job to its end and record the outcome.

    Args:
        store: the job store.
        job_id: a search job in state running.
        output: the winner's output folder.
        options: engine options (device, allowed roots, the folder paths are relative to).
        evaluator_hosts: hosts an HTTP evaluator may be on.

    Returns:
        The job's status afterwards (``running`` is never left: a pause records ``paused``).
    """
    from merge_kernels.search import SearchStoppedError, parse_search_spec, run_search
    from service.evaluation.config import build_evaluator
    from service.jobs.kinds.search import JobSearchState

    job = store.get(job_id)
    if job is None or job.status is not JobStatus.RUNNING:
        log.warning("search %s is not running; nothing to do", job_id)
        return job.status if job is not None else JobStatus.FAILED

    def evaluators(section: Mapping[str, Any]) -> Any:
        return build_evaluator(
            section,
            base_dir=options.base_dir,
            allowed_roots=options.allowed_roots,
            allowed_hosts=evaluator_hosts,
            device=options.device,
        )

    started = time.monotonic()
    error: JobError | None = None
    try:
        spec = parse_search_spec(job.recipe, base_dir=options.base_dir)
        report = run_search(
            spec,
            output,
            evaluators=evaluators,
            state_store=JobSearchState(store, job_id),
            options=options,
            on_progress=SearchProgressWriter(store, job_id),
            should_stop=StopPoll(store, job_id),
        )
    except (SearchStoppedError, MergeCancelledError):
        current = store.get(job_id) or job
        if not current.cancel_requested:
            # Paused: the state is kept for the resumption; nothing was written at output.
            store.update(job_id, **paused_fields(current))
            log.info("search %s paused", job_id)
            return JobStatus.PAUSED
        log.info("search %s cancelled", job_id)
    except TureenError as failure:
        log.info("search %s failed: %s", job_id, failure.message)
        error = job_error(failure, store)
    except Exception as failure:
        log.exception("search %s failed unexpectedly", job_id)
        error = job_error(failure, store)
    else:
        current = store.get(job_id) or job
        files = sorted(
            str(path.relative_to(report.out_dir))
            for path in report.out_dir.rglob("*")
            if path.is_file()
        )
        store.update(
            job_id,
            status=JobStatus.SUCCEEDED,
            finished_at=utcnow(),
            output_dir=str(report.out_dir),
            files=files,
            bytes_written=sum((report.out_dir / name).stat().st_size for name in files),
            merge_seconds=time.monotonic() - started,
            evaluation=report.data,
            error=None,
            progress=current.progress.model_copy(update={"phase": "done", "eta_seconds": 0.0}),
        )
        log.info("search %s succeeded: %s", job_id, report.out_dir)
        return JobStatus.SUCCEEDED
    discard_staging(output)
    fields: dict[str, object] = {"finished_at": utcnow(), "error": error}
    status = JobStatus.FAILED if error is not None else JobStatus.CANCELLED
    if error is None:
        progress = (store.get(job_id) or job).progress
        fields["progress"] = progress.model_copy(update={"phase": "cancelled", "eta_seconds": None})
    store.update(job_id, status=status, **fields)  # a cancelled job's state is dropped
    return status


def _arguments(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m service.jobs.search_worker")
    parser.add_argument("job_id", nargs="?")
    parser.add_argument("--standby", action="store_true", help="wait for jobs on stdin")
    parser.add_argument("--db", required=True, help="the job store's location")
    parser.add_argument("--output", type=Path, help="the winner's output folder")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--base-dir", type=Path, required=True)
    parser.add_argument("--allow-root", type=Path, action="append", default=[])
    parser.add_argument("--evaluator-host", action="append", default=[])
    parser.add_argument("--parent-pid", type=int, default=None)
    parser.add_argument("--log-level", default="info")
    parser.add_argument("--log-dir", type=Path, default=None, help="where job logs are kept")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the search jobs handed over (or the one named); 0 once outcomes are recorded."""
    args = _arguments(argv)
    start_worker(args, "search", "search")
    options = MergeOptions(
        device=args.device, allowed_roots=tuple(args.allow_root), base_dir=args.base_dir
    )
    hosts = tuple(args.evaluator_host)

    def run(store: JobStore, job_id: str, output: Path) -> JobStatus:
        return run_search_job(store, job_id, output, options, evaluator_hosts=hosts)

    return standby.run_from_args(run, args)


if __name__ == "__main__":
    standby.exit_at_once(main())
