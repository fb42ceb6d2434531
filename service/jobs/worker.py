"""One merge job, run in a process of its own: ``python -m service.jobs.worker JOB_ID --db PATH``.

The API process never merges: it starts this module for each claimed job, so that an
out-of-memory kill or a crash of the merge ends only this process. The worker reads the job
from the store, runs the engine, writes progress (at most four times a second, with an ETA)
and the outcome back, and polls the store's cancel flag. Everything it needs comes from its
arguments and the store; nothing is pickled, and no API token reaches it.

The service runs workers in *standby* mode (``--standby``, see
:mod:`service.jobs.worker_pool`): a worker announces on standard output that it is ready,
reads a job id and output folder from standard input, runs the job, and announces again. It
has paid for Python's and torch's start-up once, so a small merge takes a fraction of a
second end to end instead of seconds.

If the API process dies, the worker exits promptly too and leaves its job ``running`` with
its staging folder intact, so that the next server start re-queues the job and the engine
resumes after the last finished shard.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import signal
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from merge_kernels.errors import MergeCancelledError, TureenError
from merge_kernels.evaluated_merge import run_evaluated_merge, scratch_folder
from merge_kernels.io.staging import STAGING_SUFFIX, StagingDir
from merge_kernels.recipe import Recipe, parse_recipe
from merge_kernels.runner import (
    MergeOptions,
    MergeResult,
    Progress,
    committed_result,
    run_merge,
)
from service.evaluation.config import DEFAULT_EVALUATOR_HOSTS, build_evaluator
from service.jobs import standby
from service.jobs.failures import job_error
from service.jobs.models import Job, JobError, JobProgress, JobStatus, OutputOptions
from service.jobs.sqlite_store import utcnow
from service.jobs.stages import discard_intermediates, is_multi_document
from service.jobs.store import JobStore

log = logging.getLogger(__name__)

PROGRESS_INTERVAL_S = 0.25  # at most four progress writes a second
CANCEL_POLL_INTERVAL_S = 0.5
PARENT_POLL_INTERVAL_S = 0.5
EXIT_PARENT_GONE = 75  # the job stays "running" for the next server start to resume


def parse_job_recipe(document: Mapping[str, Any], *, base_dir: Path) -> Recipe:
    """Validate a job's recipe document the way the service does everywhere.

    Args:
        document: the recipe as JSON-able data.
        base_dir: folder relative local references are relative to (the data dir's inputs).

    Returns:
        The recipe.

    Raises:
        RecipeError: the recipe is invalid.
    """
    return parse_recipe(document, base_dir=base_dir)


def candidate_url(public_url: str | None, job_id: str) -> Callable[[Path], str] | None:
    """Where an evaluator downloads a candidate folder of ``job_id`` from tureen's API."""
    if public_url is None:
        return None
    base = public_url.rstrip("/")

    def url(folder: Path) -> str:
        # The written soup is scored in the staging folder, before it is published: "final".
        name = "final" if folder.name.endswith(STAGING_SUFFIX) else folder.name
        return f"{base}/v1/merges/{job_id}/candidates/{name}/files/"

    return url


def discard_staging(output: Path) -> None:
    """Remove the partial work of a failed or cancelled job writing ``output``: its staging
    folder, any greedy-soup candidates or intermediate merges, and any commit record."""
    # Only the folder's path matters for discarding; the fingerprint is not consulted.
    staging = StagingDir(output, "discard")
    staging.discard()
    staging.forget_commit()
    shutil.rmtree(scratch_folder(output), ignore_errors=True)
    discard_intermediates(output)  # a multi-document job's


def forget_commit(output: Path) -> None:
    """Drop the commit record of ``output`` once its job's success is in the store."""
    StagingDir(output, "forget").forget_commit()


def with_output_options(options: MergeOptions, output: OutputOptions) -> MergeOptions:
    """``options`` with a job's output shard size and dtype, where it sets them."""
    if output.shard_size is not None:
        options = replace(options, max_shard_bytes=output.shard_size)
    if output.dtype is not None:
        options = replace(options, out_dtype=output.dtype)
    return options


def record_if_committed(store: JobStore, job: Job, output: Path, options: MergeOptions) -> bool:
    """Mark ``job`` succeeded if its worker published ``output`` but died before saying so.

    The engine leaves a commit record beside a published output until the worker has
    recorded the success; a record that matches the job's fingerprint, with an output folder
    that matches the record, means the job's work is complete.

    Args:
        store: the job store.
        job: a running job whose worker is gone.
        output: its output folder.
        options: the service's engine options (the job's ``shard_size`` and ``dtype`` are
            applied here, as ``run_job`` does).

    Returns:
        True if the job was recorded as succeeded.
    """
    if not StagingDir(output, "probe").commit_record.exists():
        return False
    options = with_output_options(options, job.output)
    try:
        if is_multi_document(job.recipe):
            from service.jobs.stage_run import committed_stages_result  # it imports this

            result = committed_stages_result(job, output, options)
        else:
            recipe = parse_job_recipe(job.recipe, base_dir=options.base_dir or Path.cwd())
            result = committed_result(recipe, output, options)
    except Exception:  # the inputs are gone or changed: the output cannot be vouched for
        log.warning("cannot check the published output of job %s", job.id, exc_info=True)
        return False
    if result is None:
        return False
    log.info("job %s had published its output before its worker ended", job.id)
    store.update(job.id, **succeeded_fields(job, result))
    forget_commit(output)
    discard_intermediates(output)
    return True


class ProgressWriter:
    """Writes the engine's progress into the store, throttled, with an estimate of time left.

    Args:
        store: the job store.
        job_id: the job whose progress this is.
        interval: least seconds between two writes (phase changes are always written).
    """

    def __init__(self, store: JobStore, job_id: str, interval: float = PROGRESS_INTERVAL_S):
        self.store = store
        self.job_id = job_id
        self.interval = interval
        self._last_write = float("-inf")
        self._last_phase: str | None = None
        # The rate is measured from the first tensor merged in this run, so that shards kept
        # from an earlier attempt do not make the estimate optimistic.
        self._rate_start: tuple[float, int] | None = None

    def _eta(self, progress: Progress, now: float) -> float | None:
        if self._rate_start is None:
            return None
        started, bytes_at_start = self._rate_start
        elapsed = now - started
        done = progress.bytes_done - bytes_at_start
        if elapsed < 1.0 or done <= 0:
            return None
        return max(0.0, (progress.bytes_total - progress.bytes_done) * elapsed / done)

    def __call__(self, progress: Progress) -> None:
        """Record ``progress`` unless the last write was too recent."""
        now = time.monotonic()
        if self._rate_start is None and progress.current is not None:
            self._rate_start = (now, progress.bytes_done)
        phase_changed = progress.phase != self._last_phase
        if not phase_changed and now - self._last_write < self.interval:
            return
        self._last_write = now
        self._last_phase = progress.phase
        snapshot = JobProgress(
            phase=progress.phase,
            tensors_done=progress.tensors_done,
            tensors_total=progress.tensors_total,
            bytes_done=progress.bytes_done,
            bytes_total=progress.bytes_total,
            current=progress.current,
            eta_seconds=0.0 if progress.phase == "done" else self._eta(progress, now),
        )
        try:
            self.store.update(self.job_id, **self.fields(snapshot))
        except Exception:  # a lost progress report must not fail the merge
            log.warning("could not record progress of job %s", self.job_id, exc_info=True)

    def fields(self, snapshot: JobProgress) -> dict[str, object]:
        """The job's fields that record ``snapshot``."""
        return {"progress": snapshot}


class CancelPoll:
    """The engine's ``should_cancel``: reads the store's cancel flag at most every interval.

    Args:
        store: the job store.
        job_id: the job to watch.
        interval: least seconds between two reads of the store.
    """

    def __init__(self, store: JobStore, job_id: str, interval: float = CANCEL_POLL_INTERVAL_S):
        self.store = store
        self.job_id = job_id
        self.interval = interval
        self._last_read = float("-inf")
        self._cancelled = False

    def __call__(self) -> bool:
        """True once the job's cancellation was requested."""
        now = time.monotonic()
        if not self._cancelled and now - self._last_read >= self.interval:
            self._last_read = now
            try:
                self._cancelled = self.store.cancel_requested(self.job_id)
            except Exception:  # a busy database must not fail the merge; ask again later
                log.warning("could not read the cancel flag of job %s", self.job_id, exc_info=True)
        return self._cancelled


def watch_parent(parent_pid: int, work: str = "merge") -> None:
    """Exit at once (``EXIT_PARENT_GONE``) when ``parent_pid`` is no longer the parent.

    Reparenting means the API process died: the job is left ``running`` for a restart.
    Meant for a daemon thread; ``work`` names what stops, for the log.
    """
    while True:
        if os.getppid() != parent_pid:
            log.error("the service process %d is gone; stopping the %s", parent_pid, work)
            os._exit(EXIT_PARENT_GONE)
        time.sleep(PARENT_POLL_INTERVAL_S)


def start_worker(args: argparse.Namespace, label: str, work: str) -> None:
    """A worker command's start: log lines marked ``label[pid]`` at ``--log-level``, and with
    ``--parent-pid`` a daemon thread that ends the process once the service is gone."""
    logging.basicConfig(
        level=args.log_level.upper(),
        format=f"%(asctime)s %(levelname)s {label}[%(process)d] %(message)s",
    )
    if args.parent_pid is not None:
        threading.Thread(
            target=watch_parent, args=(args.parent_pid, work), name="tureen-parent", daemon=True
        ).start()


def succeeded_fields(
    job: Job, result: MergeResult, evaluation: dict[str, Any] | None = None
) -> dict[str, object]:
    return {
        "evaluation": evaluation,
        # A merge asked to be published is handed to the API process's publisher.
        "status": JobStatus.PUBLISHING if job.output.publish else JobStatus.SUCCEEDED,
        "finished_at": utcnow(),
        "output_dir": str(result.out_dir),
        "files": result.files,
        "resumed_shards": result.shards_resumed,
        "bytes_written": result.bytes_written,
        "merge_seconds": result.seconds,
        "error": None,
        "progress": job.progress.model_copy(
            update={"phase": "done", "eta_seconds": 0.0, "current": None}
        ),
    }


def run_job(
    store: JobStore,
    job_id: str,
    output: Path,
    options: MergeOptions,
    *,
    evaluator_hosts: Sequence[str] = DEFAULT_EVALUATOR_HOSTS,
    public_url: str | None = None,
) -> JobStatus:
    """Run one claimed job to its end and record the outcome in the store.

    Args:
        store: the job store.
        job_id: a job in state running.
        output: the job's output folder.
        options: engine options; ``max_shard_bytes`` and ``out_dtype`` are taken from the
            job's output options when it sets them.
        evaluator_hosts: hosts an HTTP evaluator in the recipe may be on.
        public_url: the service's address for evaluators, to give them candidate URLs.

    Returns:
        The job's final status (unchanged if the job was not running).
    """
    job = store.get(job_id)
    if job is None or job.status is not JobStatus.RUNNING:
        log.warning("job %s is not running; nothing to do", job_id)
        return job.status if job is not None else JobStatus.FAILED
    options = with_output_options(options, job.output)
    if is_multi_document(job.recipe):
        from service.jobs.stage_run import run_stage_job  # it imports this module

        return run_stage_job(store, job, output, options)
    writer = ProgressWriter(store, job_id)
    error: JobError | None = None
    try:
        recipe = parse_job_recipe(job.recipe, base_dir=options.base_dir or Path.cwd())
        evaluation = None
        if recipe.method.needs_evaluation or recipe.evaluator is not None:
            evaluator = build_evaluator(
                recipe.evaluator,
                base_dir=options.base_dir,
                allowed_roots=options.allowed_roots,
                allowed_hosts=evaluator_hosts,
                device=options.device,
                candidate_url=candidate_url(public_url, job_id),
            )
            scored = run_evaluated_merge(
                recipe,
                output,
                evaluator,
                options,
                progress=writer,
                should_cancel=CancelPoll(store, job_id),
            )
            result, evaluation = scored.result, scored.report
        else:
            result = run_merge(
                recipe, output, options, progress=writer, should_cancel=CancelPoll(store, job_id)
            )
    except MergeCancelledError:
        log.info("job %s cancelled", job_id)
    except (TureenError, FileExistsError) as failure:
        log.info("job %s failed: %s", job_id, failure)
        error = job_error(failure, store)
    except Exception as failure:
        log.exception("job %s failed unexpectedly", job_id)
        error = job_error(failure, store)
    else:
        log.info("job %s succeeded: %s", job_id, result.out_dir)
        store.update(job_id, **succeeded_fields(store.get(job_id) or job, result, evaluation))
        forget_commit(output)
        return JobStatus.SUCCEEDED
    # No partial output is kept: nothing could resume it, and it may be large.
    discard_staging(output)
    fields: dict[str, object] = {"finished_at": utcnow(), "error": error}
    if error is None:
        status = JobStatus.CANCELLED
        progress = (store.get(job_id) or job).progress
        fields["progress"] = progress.model_copy(
            update={"phase": "cancelled", "current": None, "eta_seconds": None}
        )
    else:
        status = JobStatus.FAILED  # the progress is kept: it shows where the merge stopped
    store.update(job_id, status=status, **fields)
    return status


def worker_command(
    job_id: str | None,
    *,
    store_location: str,
    output: Path | None,
    device: str,
    base_dir: Path,
    allowed_roots: Sequence[Path],
    parent_pid: int | None = None,
    evaluator_hosts: Sequence[str] = DEFAULT_EVALUATOR_HOSTS,
    log_level: str = "info",
    public_url: str | None = None,
    log_dir: Path | None = None,
    executor: str = "local",
    ray_address: str | None = None,
) -> list[str]:
    """The command line that runs one job in a worker process of this one.

    Args:
        job_id: the claimed job, or None for a standby worker: it imports the engine,
            writes ``READY`` to its standard output, reads ``{"job_id": ..., "output": ...}``
            as one JSON line from its standard input, runs the job, and repeats (end of
            input: it exits).
        store_location: the store's ``location``.
        output: the job's output folder (None for a standby worker).
        device: where the kernels run.
        base_dir: folder relative local references are relative to.
        allowed_roots: folders local checkpoints may be read from.
        parent_pid: the process that starts the worker (default: this one); the worker
            stops when that process disappears.
        evaluator_hosts: hosts an HTTP evaluator in the recipe may be on.
        log_level: how much the worker logs.
        public_url: the service's address for evaluators (candidate download URLs).
        log_dir: where each job's log is kept (see :mod:`service.jobs.job_log`); None: the
            log goes to standard error only.
        executor: where the shards are merged, ``local`` or ``ray``.
        ray_address: the Ray cluster for ``ray`` (None: Ray's own default).

    Returns:
        The argument list for ``subprocess.Popen``.
    """
    assignment = ["--standby"] if job_id is None else [job_id, "--output", str(output)]
    command = [
        sys.executable,
        "-m",
        "service.jobs.worker",
        *assignment,
        "--db",
        store_location,
        "--device",
        device,
        "--base-dir",
        str(base_dir),
        "--parent-pid",
        str(os.getpid() if parent_pid is None else parent_pid),
    ]
    for root in allowed_roots:
        command += ["--allow-root", str(root)]
    for host in evaluator_hosts:
        command += ["--evaluator-host", host]
    if public_url is not None:
        command += ["--public-url", public_url]
    if log_dir is not None:
        command += ["--log-dir", str(log_dir)]
    if executor != "local":
        command += ["--executor", executor]
    if ray_address is not None:
        command += ["--ray-address", ray_address]
    return [*command, "--log-level", log_level]


def worker_environment() -> dict[str, str]:
    """This process's environment without the service's own ``TUREEN_*`` settings."""
    # Workers get what they need from their arguments; API tokens above all stay here.
    return {name: value for name, value in os.environ.items() if not name.startswith("TUREEN_")}


def describe_exit(returncode: int) -> tuple[str, dict[str, str | int | None]]:
    """How a worker ended, in words and as error details (``exit_code`` and ``signal``)."""
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = f"signal {-returncode}"
        hint = " (the system may have run out of memory)" if name == "SIGKILL" else ""
        return f"was killed by {name}{hint}", {"exit_code": None, "signal": name}
    return f"exited with status {returncode}", {"exit_code": returncode, "signal": None}


def _arguments(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m service.jobs.worker", description=__doc__)
    parser.add_argument("job_id", nargs="?")
    parser.add_argument("--standby", action="store_true", help="wait for a job on stdin")
    parser.add_argument("--db", required=True, help="the job store's location")
    parser.add_argument("--output", type=Path, help="the output folder")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--base-dir", type=Path, required=True)
    parser.add_argument("--allow-root", type=Path, action="append", default=[])
    parser.add_argument("--parent-pid", type=int, default=None)
    parser.add_argument("--evaluator-host", action="append", default=[])
    parser.add_argument("--log-level", default="info")
    parser.add_argument("--public-url", default=None)
    parser.add_argument("--log-dir", type=Path, default=None, help="where job logs are kept")
    parser.add_argument("--executor", choices=["local", "ray"], default="local")
    parser.add_argument("--ray-address", default=None, help="the Ray cluster (executor ray)")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the job named on the command line; returns the process exit status (0: recorded)."""
    args = _arguments(argv)
    start_worker(args, "worker", "merge")
    options = MergeOptions(
        device=args.device,
        allowed_roots=tuple(args.allow_root),
        base_dir=args.base_dir,
        keep_commit_record=True,  # dropped once the success is in the store
        executor=args.executor,
        ray_address=args.ray_address,
    )
    hosts = tuple(args.evaluator_host)

    def run(store: JobStore, job_id: str, output: Path) -> JobStatus:
        return run_job(
            store, job_id, output, options, evaluator_hosts=hosts, public_url=args.public_url
        )

    # In standby, everything heavy is imported by now, so a job handed over starts at once.
    return standby.run_from_args(run, args)


if __name__ == "__main__":
    standby.exit_at_once(main())
