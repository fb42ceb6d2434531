"""A worker for a toy job kind, run as a real process by the dispatcher in tests.

``python -m tests.service.jobs.toy_worker --standby --db LOCATION [--log-dir DIR]``: each
job's ``recipe`` is ``{"text": ..., "steps": n, "hold": path or null}``. The job counts its
steps in ``progress``, waits while ``hold`` names a file that does not exist yet (so a test
can keep it running), stops when cancelled, and writes ``result.txt`` holding ``text`` into
its output folder.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from service.jobs import standby
from service.jobs.kinds import WorkerSetup
from service.jobs.models import JobProgress, JobStatus
from service.jobs.sqlite_store import open_store, utcnow
from service.jobs.store import JobStore

log = logging.getLogger(__name__)

HOLD_LIMIT_S = 60.0  # a held job gives up after this, so no test can leave it behind


def toy_command(setup: WorkerSetup) -> list[str]:
    """The standby command line of a toy worker (a ``JobKind.standby_command``)."""
    return [
        sys.executable,
        "-m",
        "tests.service.jobs.toy_worker",
        "--standby",
        "--db",
        setup.store_location,
        "--log-dir",
        str(setup.log_dir),
    ]


def run_toy_job(store: JobStore, job_id: str, output: Path) -> None:
    """Run one claimed toy job and record its outcome."""
    job = store.get(job_id)
    assert job is not None and job.status is JobStatus.RUNNING
    log.info("toy job %s started", job_id)
    steps = int(job.recipe.get("steps", 1))
    hold = job.recipe.get("hold")
    deadline = time.monotonic() + HOLD_LIMIT_S
    step = 0
    while step < steps or (hold and not Path(hold).exists() and time.monotonic() < deadline):
        if store.cancel_requested(job_id):
            store.update(job_id, status=JobStatus.CANCELLED, finished_at=utcnow())
            log.info("toy job %s cancelled", job_id)
            return
        if step < steps:
            step += 1
            store.update(job_id, progress=JobProgress(phase="counting", steps_done=step))
        time.sleep(0.05)
    output.mkdir(parents=True)
    (output / "result.txt").write_text(str(job.recipe["text"]))
    store.update(
        job_id,
        status=JobStatus.SUCCEEDED,
        finished_at=utcnow(),
        output_dir=str(output),
        files=["result.txt"],
        progress=JobProgress(phase="done", steps_done=steps, steps_total=steps),
    )
    log.info("toy job %s wrote %s", job_id, output.name)


def main(argv: Sequence[str] | None = None) -> int:
    """Serve toy jobs handed over on standard input."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--standby", action="store_true", required=True)
    parser.add_argument("--db", required=True)
    parser.add_argument("--log-dir", type=Path, default=None)
    args = parser.parse_args(argv)
    logging.basicConfig(level="INFO")
    store = open_store(args.db)
    try:
        standby.serve(
            lambda job_id, output: run_toy_job(store, job_id, output), log_dir=args.log_dir
        )
    finally:
        store.close()
    return 0


if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    os._exit(code)
