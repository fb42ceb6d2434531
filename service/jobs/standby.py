"""The worker side of :mod:`service.jobs.worker_pool`: wait for jobs, run them, announce.

Every job kind's worker process runs this loop: it announces ``READY`` on its standard
output, reads one ``{"job_id": ..., "output": ...}`` JSON line from its standard input, runs
that job (its log captured, see :mod:`service.jobs.job_log`), and announces again. End of
input (the service stopped, or wants one job per process) ends the loop; so does a job that
left the process large, so that its memory goes back to the system.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import sys
from collections.abc import Callable
from pathlib import Path
from typing import NoReturn

from service.jobs import job_log
from service.jobs.sqlite_store import open_store
from service.jobs.store import JobStore
from service.jobs.worker_pool import READY

MAX_JOBS_PER_WORKER = 100  # then a fresh process, so that nothing accumulates
RECYCLE_RSS_BYTES = 1 << 30  # a worker that peaked above this exits after its job


def serve(
    run: Callable[[str, Path], object],
    *,
    log_dir: Path | None,
    max_jobs: int = MAX_JOBS_PER_WORKER,
    recycle_rss_bytes: int = RECYCLE_RSS_BYTES,
) -> None:
    """Run the jobs handed over on standard input, one at a time, until input ends.

    Args:
        run: runs one claimed job to its end, given its id and output folder; it records
            the outcome in the store itself.
        log_dir: where each job's log is kept (None: standard error only).
        max_jobs: jobs after which the process ends anyway.
        recycle_rss_bytes: a peak resident size after which the process ends.
    """
    for _ in range(max_jobs):
        sys.stdout.buffer.write(READY)
        sys.stdout.buffer.flush()
        line = sys.stdin.readline()
        if not line.strip():
            return  # the service stopped, or needs this worker no more
        assignment = json.loads(line)
        job_id = str(assignment["job_id"])
        with job_log.capturing(log_dir, job_id):
            run(job_id, Path(assignment["output"]))
        if peak_rss_bytes() > recycle_rss_bytes:
            return  # give a large job's memory back to the system


def run_worker(
    run: Callable[[JobStore, str, Path], object],
    *,
    store_location: str,
    standby: bool,
    job_id: str | None,
    output: Path | None,
    log_dir: Path | None,
) -> int:
    """A worker process's work: the jobs handed over in standby mode, or the one named.

    Args:
        run: runs one claimed job to its end in the store, given its id and output folder.
        store_location: the store's ``location``.
        standby: serve jobs from standard input (see :func:`serve`).
        job_id: otherwise, the job to run.
        output: its output folder.
        log_dir: where each job's log is kept.

    Returns:
        The process exit status, 0 (outcomes are recorded in the store).

    Raises:
        SystemExit: neither ``standby`` nor a job and its output.
    """
    if not standby and (job_id is None or output is None):
        raise SystemExit("give JOB_ID and --output, or --standby")
    store = open_store(store_location)
    try:
        if standby:
            serve(lambda job_id, output: run(store, job_id, output), log_dir=log_dir)
        elif job_id is not None and output is not None:
            with job_log.capturing(log_dir, job_id):
                run(store, job_id, output)
    finally:
        store.close()
    return 0


def run_from_args(run: Callable[[JobStore, str, Path], object], args: argparse.Namespace) -> int:
    """:func:`run_worker` with the options every worker command takes (``--db``,
    ``--standby``, ``--job-id``, ``--output``, ``--log-dir``)."""
    return run_worker(
        run,
        store_location=args.db,
        standby=args.standby,
        job_id=args.job_id,
        output=args.output,
        log_dir=args.log_dir,
    )


def exit_at_once(code: int) -> NoReturn:
    """End a worker process whose outcome is recorded and whose store is closed: skip the
    interpreter's slow teardown (torch's), so the service sees the process end, and frees
    its slot, at once."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def peak_rss_bytes() -> int:
    """This process's peak resident memory since it started its program.

    ``VmHWM`` rather than ``ru_maxrss``: the latter survives ``exec``, so a worker started
    by a large service would inherit the service's peak.
    """
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
