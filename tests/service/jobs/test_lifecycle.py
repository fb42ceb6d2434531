"""Jobs cut short: cancelled while running, worker killed, server restarted mid-merge."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from merge_kernels.runner import run_merge
from service.jobs.manager import JobManager
from service.jobs.models import Job, JobStatus, OutputOptions
from service.jobs.worker import worker_command
from tests.service.jobs.conftest import SHARD_BYTES, ties_recipe, wait_finished, wait_for

pytestmark = pytest.mark.slow

Make = Callable[..., JobManager]


def staging_of(manager: JobManager, name: str) -> Path:
    return manager.settings.outputs_dir / f".{name}.tureen-partial"


def merging(manager: JobManager, job_id: str) -> Job:
    """Wait until the job's worker has merged some tensors, and return the job."""
    job: Job = wait_for(
        lambda: (
            (job := manager.get(job_id)).status is JobStatus.RUNNING
            and job.worker_pid is not None
            and job.progress.bytes_done > 0
            and job
        ),
        timeout=60,
    )
    return job


def test_cancel_running_job_stops_within_seconds_without_output(
    make_manager: Make, large_models: Path
) -> None:
    manager = make_manager()
    manager.start()
    output = OutputOptions(name="cancelled", shard_size=SHARD_BYTES)
    job, _ = manager.submit(ties_recipe(large_models), output)
    worker = merging(manager, job.id).worker_pid
    assert worker is not None
    # Freeze the worker so the merge cannot finish before it reads the cancel flag, which
    # it does at most every 0.5 s.
    os.kill(worker, signal.SIGSTOP)
    asked = time.monotonic()
    assert manager.cancel(job.id).cancel_requested
    time.sleep(0.6)
    os.kill(worker, signal.SIGCONT)
    done = wait_finished(manager, job.id, timeout=10)
    assert time.monotonic() - asked < 5
    assert done.status is JobStatus.CANCELLED
    assert done.error is None
    assert done.progress.phase == "cancelled"
    assert not (manager.settings.outputs_dir / "cancelled").exists()
    assert not staging_of(manager, "cancelled").exists()


def test_killed_worker_fails_its_job_and_the_service_carries_on(
    make_manager: Make, large_models: Path, small_models: Path
) -> None:
    manager = make_manager()
    manager.start()
    output = OutputOptions(name="killed", shard_size=SHARD_BYTES)
    job, _ = manager.submit(ties_recipe(large_models), output)
    running = merging(manager, job.id)
    assert running.worker_pid is not None
    os.kill(running.worker_pid, signal.SIGKILL)
    failed = wait_finished(manager, job.id, timeout=10)
    assert failed.status is JobStatus.FAILED
    assert failed.error is not None
    assert failed.error.code == "worker_crashed"
    assert failed.error.details == {"exit_code": None, "signal": "SIGKILL"}
    assert "SIGKILL" in failed.error.message
    assert not staging_of(manager, "killed").exists()

    following, _ = manager.submit(ties_recipe(small_models), OutputOptions())
    assert wait_finished(manager, following.id).status is JobStatus.SUCCEEDED


def test_restart_resumes_an_interrupted_job_to_identical_output(
    make_manager: Make, large_models: Path, tmp_path: Path
) -> None:
    # Task arithmetic is fast; the worker is frozen as soon as a shard is finished, so the
    # interruption always lands mid-merge however fast the machine is.
    recipe = ties_recipe(large_models, method="task_arithmetic")
    output = OutputOptions(name="resumed", shard_size=SHARD_BYTES)
    first = make_manager()
    first.start()
    job, _ = first.submit(recipe, output)
    pid: int = wait_for(lambda: first.get(job.id).worker_pid, timeout=30)
    manifest = staging_of(first, "resumed") / "tureen-manifest.json"

    def shards_done() -> int:
        try:
            return len(json.loads(manifest.read_text())["shards"])
        except (OSError, ValueError):
            return 0

    wait_for(shards_done, timeout=60, interval=0.002)
    os.kill(pid, signal.SIGSTOP)  # a hung worker: stop() must kill it after its timeout
    kept = shards_done()
    first.stop(timeout=1.0)
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)  # the worker is gone (and reaped)...
    assert first.get(job.id).status is JobStatus.RUNNING  # ...but its job was not failed

    second = make_manager()  # a new server process on the same database
    second.start()
    done = wait_finished(second, job.id)
    assert done.status is JobStatus.SUCCEEDED, done.error
    assert done.attempts == 2
    assert done.resumed_shards == kept > 0

    reference = run_merge(recipe, tmp_path / "reference" / "resumed", second.engine_options(output))
    assert reference.shards_resumed == 0
    out = second.settings.outputs_dir / "resumed"
    assert sorted(done.files) == sorted(reference.files)
    for name in reference.files:
        assert (out / name).read_bytes() == (reference.out_dir / name).read_bytes(), name


_ORPHANING_PARENT = """
import json, os, subprocess, sys
command = [os.getpid() if part == "PARENT" else part for part in json.loads(sys.argv[1])]
print(subprocess.Popen([str(part) for part in command]).pid, flush=True)
"""


def _alive(pid: int) -> bool:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False
    return "State:\tZ" not in status  # a zombie nobody reaped has stopped all the same


def test_worker_stops_when_the_service_process_dies(make_manager: Make, large_models: Path) -> None:
    manager = make_manager()  # not started: the job is claimed by hand
    output = OutputOptions(name="orphan", shard_size=SHARD_BYTES)
    job, _ = manager.submit(ties_recipe(large_models), output)
    claimed = manager.store.claim_next()
    assert claimed is not None
    command = worker_command(
        job.id,
        store_location=manager.store.location,
        output=manager.output_path(job),
        device="cpu",
        base_dir=manager.settings.inputs_dir,
        allowed_roots=manager.settings.input_roots,
        parent_pid=0,
    )
    command[command.index("--parent-pid") + 1] = "PARENT"
    parent = subprocess.run(
        [sys.executable, "-c", _ORPHANING_PARENT, json.dumps(command)],
        capture_output=True,
        text=True,
        check=True,
    )
    pid = int(parent.stdout)
    wait_for(lambda: not _alive(pid), timeout=30)
    left = manager.get(job.id)
    assert left.status is JobStatus.RUNNING  # for the next server start to resume
    assert left.progress.bytes_done < left.progress.bytes_total or left.progress.bytes_total == 0
    assert not (manager.settings.outputs_dir / "orphan").exists()
