"""The SQLite job store: records, FIFO claims across processes, idempotency, cancellation."""

from __future__ import annotations

import asyncio
import gc
import json
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from service.jobs.models import Job, JobError, JobProgress, JobStatus, OutputOptions
from service.jobs.sqlite_store import SqliteJobStore
from service.jobs.store import (
    IdempotencyConflictError,
    JobNotFoundError,
    JobStore,
    wait_for_update,
    watch,
)

T0 = datetime(2025, 1, 1, tzinfo=UTC)


def make_job(index: int, **fields: object) -> Job:
    data: dict[str, object] = {
        "id": f"job-{index:03d}",
        "status": JobStatus.QUEUED,
        "recipe": {"merge_method": "linear", "models": [{"model": f"m{index}"}]},
        "output": OutputOptions(name=f"out-{index}"),
        "created_at": T0 + timedelta(seconds=index),
    }
    data.update(fields)
    return Job.model_validate(data)


@pytest.fixture
def store(tmp_path: Path) -> Iterator[SqliteJobStore]:
    opened = SqliteJobStore(tmp_path / "db" / "jobs.sqlite3")
    yield opened
    opened.close()


def test_is_a_job_store_in_wal_mode(store: SqliteJobStore) -> None:
    assert isinstance(store, JobStore)
    assert store.path.is_file()
    mode = store._connection().execute("PRAGMA journal_mode").fetchone()[0]
    assert mode == "wal"


def test_create_get_update_round_trip(store: SqliteJobStore, tmp_path: Path) -> None:
    job, created = store.create(make_job(1))
    assert created
    assert job.version == 1
    assert job.updated_at is not None
    assert store.get("job-001") == job
    assert store.get("missing") is None

    progress = JobProgress(phase="merging", tensors_done=3, tensors_total=9, eta_seconds=1.5)
    error = JobError(code="x", message="broken", details={"problems": ["a", "b"]})
    updated = store.update(
        "job-001", progress=progress, error=error, files=["a.safetensors"], merge_seconds=2.5
    )
    assert updated.version == 2
    assert updated.progress == progress
    assert updated.error == error
    assert updated.files == ["a.safetensors"]
    # A second store on the same file (another process, or after a restart) sees the same.
    reopened = SqliteJobStore(tmp_path / "db" / "jobs.sqlite3")
    assert reopened.get("job-001") == updated
    reopened.close()


def test_update_refuses_unknown_fields_and_missing_jobs(store: SqliteJobStore) -> None:
    store.create(make_job(1))
    with pytest.raises(TypeError, match="nonsense"):
        store.update("job-001", nonsense=1)
    with pytest.raises(TypeError, match="id"):
        store.update("job-001", id="other")
    with pytest.raises(JobNotFoundError) as caught:
        store.update("missing", attempts=1)
    assert caught.value.code == "not_found"


def test_claim_next_takes_the_oldest_queued_job(store: SqliteJobStore) -> None:
    for index in (3, 1, 2):  # inserted out of order: created_at decides
        store.create(make_job(index))
    store.create(make_job(0, status=JobStatus.SUCCEEDED))
    claimed = [store.claim_next() for _ in range(4)]
    assert [job.id if job else None for job in claimed] == ["job-001", "job-002", "job-003", None]
    first = claimed[0]
    assert first is not None
    assert first.status is JobStatus.RUNNING
    assert first.attempts == 1
    assert first.started_at is not None
    assert first.progress.phase == "planning"


_CLAIMER = textwrap.dedent(
    """
    import json, sys
    from pathlib import Path
    from service.jobs.sqlite_store import SqliteJobStore
    store = SqliteJobStore(Path(sys.argv[1]))
    print("ready", flush=True)
    sys.stdin.readline()  # start together
    claimed = []
    while (job := store.claim_next()) is not None:
        claimed.append(job.id)
    print(json.dumps(claimed), flush=True)
    """
)


def test_concurrent_claims_from_two_processes_never_share_a_job(
    store: SqliteJobStore,
) -> None:
    for index in range(60):
        store.create(make_job(index))
    processes = [
        subprocess.Popen(
            [sys.executable, "-c", _CLAIMER, str(store.path)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    for process in processes:
        assert process.stdout is not None
        assert process.stdout.readline().strip() == "ready"
    for process in processes:
        assert process.stdin is not None
        process.stdin.write("go\n")
        process.stdin.flush()
    results = []
    for process in processes:
        out, _ = process.communicate(timeout=60)
        assert process.returncode == 0
        results.append(json.loads(out.strip().splitlines()[-1]))
    first, second = (set(ids) for ids in results)
    assert not first & second
    assert first | second == {f"job-{index:03d}" for index in range(60)}
    assert all(job.attempts == 1 for job in store.list(limit=100)[0])


def test_idempotency_key_returns_the_job_or_conflicts(store: SqliteJobStore) -> None:
    job, created = store.create(make_job(1), idempotency_key="k1", body_hash="h1")
    assert created
    again, created_again = store.create(make_job(2), idempotency_key="k1", body_hash="h1")
    assert (again, created_again) == (job, False)
    assert store.get("job-002") is None
    with pytest.raises(IdempotencyConflictError) as caught:
        store.create(make_job(3), idempotency_key="k1", body_hash="other")
    assert caught.value.code == "idempotency_conflict"
    assert caught.value.details["job_id"] == "job-001"
    assert store.find_idempotent("k1") == (job, "h1")
    assert store.find_idempotent("k2") is None
    # Jobs without a key never collide with each other.
    assert store.create(make_job(4))[1]
    assert store.create(make_job(5))[1]


def test_cancel_transitions(store: SqliteJobStore) -> None:
    store.create(make_job(1))
    store.create(make_job(2))
    store.create(make_job(3, status=JobStatus.SUCCEEDED))

    cancelled = store.request_cancel("job-001")  # queued: at once
    assert cancelled.status is JobStatus.CANCELLED
    assert cancelled.cancel_requested
    assert cancelled.finished_at is not None

    running = store.claim_next()
    assert running is not None
    assert running.id == "job-002"
    assert not store.cancel_requested("job-002")
    flagged = store.request_cancel("job-002")  # running: flagged for the worker
    assert flagged.status is JobStatus.RUNNING
    assert flagged.cancel_requested
    assert store.cancel_requested("job-002")
    assert store.request_cancel("job-002") == flagged  # asking again changes nothing

    finished = store.get("job-003")
    assert store.request_cancel("job-003") == finished  # finished: unchanged
    assert store.cancel_requested("gone")  # a vanished job's worker should stop
    with pytest.raises(JobNotFoundError):
        store.request_cancel("gone")


def test_requeue_interrupted_keeps_fifo_order(store: SqliteJobStore) -> None:
    for index in (1, 2, 3):
        store.create(make_job(index))
    store.claim_next()  # job-001 running when the "server died"
    store.update("job-001", worker_pid=1234)
    assert store.requeue_interrupted() == ["job-001"]
    job = store.get("job-001")
    assert job is not None
    assert job.status is JobStatus.QUEUED
    assert job.worker_pid is None
    assert job.attempts == 1
    again = store.claim_next()
    assert again is not None
    assert again.id == "job-001"
    assert again.attempts == 2
    assert store.requeue_interrupted() == ["job-001"]


def test_counts_and_merge_totals(store: SqliteJobStore) -> None:
    store.create(make_job(1))
    store.create(make_job(2, status=JobStatus.SUCCEEDED, bytes_written=100, merge_seconds=1.5))
    store.create(make_job(3, status=JobStatus.SUCCEEDED, bytes_written=50, merge_seconds=0.5))
    store.create(make_job(4, status=JobStatus.FAILED, bytes_written=7))
    counts = store.counts()
    assert counts == {
        JobStatus.QUEUED: 1,
        JobStatus.RUNNING: 0,
        JobStatus.SUCCEEDED: 2,
        JobStatus.FAILED: 1,
        JobStatus.CANCELLED: 0,
        JobStatus.PUBLISHING: 0,
        JobStatus.PAUSED: 0,
    }
    assert store.merge_totals() == (150, 2.0, 2)


def test_list_is_newest_first_with_pagination_and_filter(store: SqliteJobStore) -> None:
    for index in range(7):
        status = JobStatus.FAILED if index % 3 == 0 else JobStatus.QUEUED
        store.create(make_job(index, status=status))
    page, total = store.list(limit=3)
    assert total == 7
    assert [job.id for job in page] == ["job-006", "job-005", "job-004"]
    page, total = store.list(limit=3, offset=6)
    assert [job.id for job in page] == ["job-000"]
    failed, total = store.list(status=JobStatus.FAILED, limit=2, offset=1)
    assert total == 3
    assert [job.id for job in failed] == ["job-003", "job-000"]
    assert store.list(offset=50) == ([], 7)


def test_naive_and_aware_times_sort_together(store: SqliteJobStore) -> None:
    store.create(make_job(2, created_at=datetime(2025, 1, 1, 0, 0, 2)))  # naive: UTC
    store.create(make_job(1, created_at=datetime(2025, 1, 1, 0, 0, 1, 500000, tzinfo=UTC)))
    claimed = store.claim_next()
    assert claimed is not None
    assert claimed.id == "job-001"


def test_waiting_for_changes(store: SqliteJobStore) -> None:
    job, _ = store.create(make_job(1))
    assert wait_for_update(store, job.id, job.version, timeout=0.05) == job  # timed out
    with pytest.raises(JobNotFoundError):
        wait_for_update(store, "missing", 0, timeout=0.05)

    def finish_later() -> None:
        time.sleep(0.3)
        store.update(job.id, status=JobStatus.RUNNING)
        time.sleep(0.3)
        store.update(job.id, status=JobStatus.SUCCEEDED)

    async def collect() -> list[Job]:
        return [seen async for seen in watch(store, job.id, interval=0.05)]

    thread = threading.Thread(target=finish_later)
    thread.start()
    seen = asyncio.run(collect())
    thread.join()
    assert [j.status for j in seen] == [JobStatus.QUEUED, JobStatus.RUNNING, JobStatus.SUCCEEDED]
    assert [j.version for j in seen] == [1, 2, 3]


def test_store_connection_per_thread_released_with_the_thread(tmp_path: Path) -> None:
    store = SqliteJobStore(tmp_path / "t.sqlite3")
    seen: list[int] = []

    def count() -> None:
        seen.append(sum(store.counts().values()))
        seen.append(len(store._connections))

    thread = threading.Thread(target=count)
    thread.start()
    thread.join()
    assert seen == [0, 2]  # the creating thread's connection and the new thread's
    del thread
    gc.collect()
    assert len(store._connections) == 1
    store.close()
    assert len(store._connections) == 0
