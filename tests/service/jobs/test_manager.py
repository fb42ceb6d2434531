"""The job manager with real worker processes: submission, validation, FIFO, cancellation."""

from __future__ import annotations

import itertools
import shutil
import sqlite3
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest

from merge_kernels.errors import (
    CheckpointNotFoundError,
    IncompatibleCheckpointsError,
    RecipeError,
)
from merge_kernels.recipe import parse_recipe
from merge_kernels.synthetic import LlamaShape, write_checkpoint
from service.jobs import dispatcher as dispatcher_module
from service.jobs.manager import (
    IdempotencyConflictError,
    JobManager,
    JobNotFoundError,
    OutputExistsError,
    OverMemoryBudgetError,
)
from service.jobs.models import Job, JobStatus, OutputOptions
from service.jobs.sqlite_store import utcnow
from service.jobs.worker_pool import WorkerPool
from tests.service.jobs.conftest import SMALL, ties_recipe, wait_finished, wait_for

Make = Callable[..., JobManager]


def assert_no_jobs(manager: JobManager) -> None:
    assert manager.list() == ([], 0)


def test_submitted_job_succeeds_with_files_and_progress(
    make_manager: Make, small_models: Path
) -> None:
    manager = make_manager()
    manager.start()
    job, created = manager.submit(ties_recipe(small_models, 3), OutputOptions(name="merged"))
    assert created
    assert job.status is JobStatus.QUEUED
    changed = manager.wait_for_update(job.id, job.version, timeout=30)
    assert changed.version > job.version
    assert changed.status is JobStatus.RUNNING
    done = wait_finished(manager, job.id)
    assert done.status is JobStatus.SUCCEEDED, done.error
    out = manager.settings.outputs_dir / "merged"
    assert done.output_dir == str(out)
    assert sorted(done.files) == sorted(p.name for p in out.iterdir())
    assert "model.safetensors" in done.files
    assert done.progress.phase == "done"
    assert done.progress.tensors_done == done.progress.tensors_total == len(SMALL.tensors())
    assert done.progress.bytes_done == done.progress.bytes_total > 0
    assert done.attempts == 1
    assert done.worker_pid is not None
    metrics = manager.metrics()
    assert metrics['tureen_jobs{state="succeeded"}'] == 1
    assert metrics["tureen_merged_bytes_total"] == done.bytes_written
    assert metrics["tureen_merge_seconds_count"] == 1


def test_invalid_merges_raise_before_any_job_exists(make_manager: Make, small_models: Path) -> None:
    manager = make_manager()
    output = OutputOptions()
    # A folder outside the allowed roots is refused exactly like one that does not exist,
    # so requests cannot probe the disk.
    messages = []
    for outside in ("/nowhere/x", str(Path(__file__).parent)):
        with pytest.raises(CheckpointNotFoundError) as missing:
            manager.submit(
                parse_recipe({"merge_method": "linear", "models": [{"model": outside}]}), output
            )
        assert missing.value.code == "path_not_allowed"
        messages.append(missing.value.message.replace(outside, "PATH"))
    assert messages[0] == messages[1]

    other = LlamaShape(hidden_size=32, intermediate_size=48, num_hidden_layers=2, vocab_size=96)
    write_checkpoint(small_models / "other-shape", other, seed=9)
    try:
        recipe = parse_recipe(
            {
                "merge_method": "task_arithmetic",
                "base_model": str(small_models / "base"),
                "models": [
                    {"model": str(small_models / "ft1")},
                    {"model": str(small_models / "other-shape")},
                ],
            }
        )
        with pytest.raises(IncompatibleCheckpointsError) as incompatible:
            manager.submit(recipe, output)
        assert incompatible.value.code == "incompatible_checkpoints"
    finally:
        shutil.rmtree(small_models / "other-shape")

    soup = {
        "merge_method": "greedy_soup",
        "models": [{"model": str(small_models / name)} for name in ("ft1", "ft2")],
    }
    with pytest.raises(RecipeError) as needs_evaluation:
        manager.submit(parse_recipe(soup), output)
    assert needs_evaluation.value.code == "invalid_recipe"
    assert_no_jobs(manager)


def test_over_budget_is_refused(make_manager: Make, small_models: Path) -> None:
    manager = make_manager(memory_budget_bytes=100_000_000)
    with pytest.raises(OverMemoryBudgetError) as caught:
        manager.submit(ties_recipe(small_models), OutputOptions())
    assert caught.value.code == "over_memory_budget"
    assert caught.value.details["budget_bytes"] == 100_000_000
    assert int(str(caught.value.details["estimate_bytes"])) > 100_000_000
    assert "100000000" in caught.value.message
    assert_no_jobs(manager)
    roomy = make_manager(memory_budget_bytes=10**12)
    assert roomy.submit(ties_recipe(small_models), OutputOptions())[1]


def test_idempotency_and_taken_output_names(make_manager: Make, small_models: Path) -> None:
    manager = make_manager()
    recipe = ties_recipe(small_models)
    first, created = manager.submit(
        recipe, OutputOptions(name="one"), idempotency_key="k", body_hash="h"
    )
    again, created_again = manager.submit(
        recipe, OutputOptions(name="one"), idempotency_key="k", body_hash="h"
    )
    assert created
    assert not created_again
    assert again.id == first.id
    with pytest.raises(IdempotencyConflictError):
        manager.submit(recipe, OutputOptions(), idempotency_key="k", body_hash="other")
    with pytest.raises(OutputExistsError, match="unfinished job"):
        manager.submit(recipe, OutputOptions(name="one"))
    (manager.settings.outputs_dir / "two").mkdir(parents=True)
    with pytest.raises(OutputExistsError, match="folder"):
        manager.submit(recipe, OutputOptions(name="two"))
    assert manager.list()[1] == 1


def test_workers_one_runs_jobs_one_at_a_time_in_fifo_order(
    make_manager: Make, small_models: Path
) -> None:
    manager = make_manager(workers=1)
    recipe = ties_recipe(small_models)
    ids = [manager.submit(recipe, OutputOptions())[0].id for _ in range(3)]
    manager.start()
    jobs = [wait_finished(manager, job_id) for job_id in ids]
    assert all(job.status is JobStatus.SUCCEEDED for job in jobs)
    for earlier, later in itertools.pairwise(jobs):
        assert earlier.started_at is not None
        assert earlier.finished_at is not None
        assert later.started_at is not None
        assert earlier.finished_at <= later.started_at
    # Outputs default to the job id, under the data dir.
    assert {p.name for p in manager.settings.outputs_dir.iterdir()} == set(ids)


def test_cancel_queued_and_missing_jobs(make_manager: Make, small_models: Path) -> None:
    manager = make_manager()
    job, _ = manager.submit(ties_recipe(small_models), OutputOptions())
    cancelled = manager.cancel(job.id)
    assert cancelled.status is JobStatus.CANCELLED
    assert manager.cancel(job.id) == cancelled
    with pytest.raises(JobNotFoundError) as caught:
        manager.cancel("nope")
    assert caught.value.code == "not_found"
    with pytest.raises(JobNotFoundError):
        manager.get("nope")
    manager.start()  # a cancelled job is never run
    assert manager.wait_for_update(job.id, cancelled.version, timeout=0.5) == cancelled


def test_output_path_stays_under_the_data_dir(make_manager: Make, small_models: Path) -> None:
    manager = make_manager()
    job, _ = manager.submit(ties_recipe(small_models), OutputOptions(name="named.v1"))
    assert manager.output_path(job) == manager.settings.outputs_dir / "named.v1"
    assert manager.output_path(job).is_relative_to(manager.settings.data_dir)


def test_jobs_that_fail_at_once_in_a_warm_worker_free_their_slot(
    make_manager: Make, small_models: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A job the worker refuses ends within milliseconds of being handed over, often before
    # the dispatcher has noted the worker as busy; with one worker, a slot noted after the
    # worker freed it was never freed again and every later job stayed queued. Starting the
    # next spare worker after a hand-over takes a while on a loaded machine; so it does here.
    top_up = WorkerPool._top_up

    def slow_top_up(pool: WorkerPool) -> None:
        time.sleep(0.3)
        top_up(pool)

    monkeypatch.setattr(WorkerPool, "_top_up", slow_top_up)
    manager = make_manager(workers=1, standby_worker=True)
    refused = {"merge_method": "no_such_method", "models": [{"model": "nowhere"}]}
    failing = []
    for _ in range(4):
        job = Job(
            id=uuid.uuid4().hex,
            status=JobStatus.QUEUED,
            recipe=refused,
            output=OutputOptions(),
            created_at=utcnow(),
        )
        failing.append(manager.store.create(job)[0].id)
    valid, _ = manager.submit(ties_recipe(small_models), OutputOptions(name="after"))
    manager.start()
    for job_id in failing:
        assert wait_finished(manager, job_id, timeout=30).status is JobStatus.FAILED
    done = wait_finished(manager, valid.id, timeout=30)
    assert done.status is JobStatus.SUCCEEDED, done.error
    wait_for(lambda: manager.metrics()["tureen_workers_busy"] == 0, timeout=10)
    assert manager.dispatcher_problem() is None


def test_a_stalled_dispatcher_is_reported(
    make_manager: Make, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(dispatcher_module, "STALLED_AFTER_S", 1.0)
    manager = make_manager(workers=1)
    assert manager.dispatcher_problem() == "the job dispatcher is not running"
    manager.start()
    assert manager.dispatcher_problem() is None
    # Another process holding the database's write lock blocks the dispatcher's next claim.
    blocker = sqlite3.connect(manager.settings.database_path, isolation_level=None)
    try:
        blocker.execute("BEGIN IMMEDIATE")
        problem = wait_for(manager.dispatcher_problem, timeout=10)
        assert "has not run for" in problem
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
    wait_for(lambda: manager.dispatcher_problem() is None, timeout=10)
