"""One job system for every kind: per-kind concurrency and the old training store's migration."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import pytest

from service.jobs import dispatcher as dispatcher_module
from service.jobs import kinds as kinds_module
from service.jobs.kinds import JobKind, get_kind, register_kind, unregister_kind
from service.jobs.kinds.merge import MERGE
from service.jobs.kinds.training import TRAINING
from service.jobs.manager import JobManager, JobNotFoundError
from service.jobs.models import Job, JobStatus, OutputOptions
from service.jobs.sqlite_store import SqliteJobStore, utcnow
from service.jobs.store_migration import adopt_training_store
from service.settings import ServiceSettings
from tests.service.jobs.conftest import ties_recipe, wait_finished, wait_for
from tests.service.jobs.toy_worker import toy_command

Make = Callable[..., JobManager]


def queued(kind: str, recipe: dict[str, object], **fields: object) -> Job:
    values: dict[str, object] = {"status": JobStatus.QUEUED, **fields}
    return Job(
        id=uuid.uuid4().hex,
        kind=kind,
        recipe=recipe,
        output=OutputOptions(),
        created_at=utcnow(),
        **values,  # type: ignore[arg-type]
    )


@pytest.fixture
def toy_trainings(monkeypatch: pytest.MonkeyPatch) -> JobKind:
    """The training kind as registered, its worker swapped for the toy worker (no torch)."""
    kind = replace(TRAINING, standby_command=toy_command)
    monkeypatch.setitem(kinds_module._KINDS, TRAINING.name, kind)
    return kind


def test_the_built_in_kinds_concurrency(make_settings: Callable[..., ServiceSettings]) -> None:
    settings = make_settings(workers=3)
    assert get_kind("merge") is MERGE and get_kind("training") is TRAINING
    assert MERGE.concurrency(settings) == 3
    assert TRAINING.concurrency(settings) == 1
    with pytest.raises(ValueError, match="already registered"):
        register_kind(replace(MERGE))
    with pytest.raises(LookupError, match="known: "):
        get_kind("serach")


def test_a_training_and_a_merge_run_together_but_two_trainings_never_do(
    make_manager: Make, small_models: Path, toy_trainings: JobKind, tmp_path: Path
) -> None:
    manager = make_manager(workers=1, standby_worker=False)
    holds = [tmp_path / "release-1", tmp_path / "release-2"]
    first, second = (
        manager.store.create(queued("training", {"text": f"t{i}", "hold": str(hold)}))[0]
        for i, hold in enumerate(holds)
    )
    merge, _ = manager.submit(ties_recipe(small_models), OutputOptions())
    manager.start()
    # The merge runs while the first training holds the training slot...
    assert wait_finished(manager, merge.id).status is JobStatus.SUCCEEDED
    assert manager.get(first.id, kind="training").status is JobStatus.RUNNING
    # ...and the second training waits for it, though merge slots are free.
    assert manager.get(second.id, kind="training").status is JobStatus.QUEUED
    holds[0].touch()
    done = wait_for(lambda: (j := manager.get(first.id, kind="training")).status.finished and j)
    assert done.status is JobStatus.SUCCEEDED
    assert (manager.output_path(done) / "result.txt").read_text() == "t0"
    assert manager.output_path(done).parent == manager.settings.inputs_dir / "trainings"
    wait_for(lambda: manager.get(second.id, kind="training").status is JobStatus.RUNNING)
    holds[1].touch()
    later = wait_for(lambda: (j := manager.get(second.id, kind="training")).status.finished and j)
    assert later.status is JobStatus.SUCCEEDED
    assert done.finished_at is not None and later.started_at is not None
    assert done.finished_at <= later.started_at
    # One store; each kind sees its own jobs only.
    assert [job.id for job in manager.list()[0]] == [merge.id]
    assert {job.id for job in manager.list(kind="training")[0]} == {first.id, second.id}
    metrics = manager.metrics()
    assert metrics['tureen_jobs{state="succeeded"}'] == 1
    assert metrics['tureen_trainings{state="succeeded"}'] == 2


def test_a_job_is_found_only_as_its_own_kind(make_manager: Make) -> None:
    manager = make_manager()
    job, _ = manager.store.create(queued("training", {"text": "x"}), idempotency_key="k")
    assert manager.get(job.id, kind="training") == job
    with pytest.raises(JobNotFoundError):
        manager.get(job.id)  # not a merge
    with pytest.raises(JobNotFoundError):
        manager.cancel(job.id)
    # Idempotency keys are per kind: a merge may use the training's key.
    other, created = manager.store.create(queued("merge", {}), idempotency_key="k")
    assert created and other.id != job.id
    assert manager.idempotent_repeat("training", "k", None) == job
    # Merge numbers count merges only; each kind's states are counted apart.
    manager.store.create(queued("training", {}, status=JobStatus.SUCCEEDED, merge_seconds=3.0))
    assert manager.store.merge_totals() == (0, 0.0, 0)
    assert manager.store.counts("training")[JobStatus.SUCCEEDED] == 1
    assert manager.store.counts("merge")[JobStatus.SUCCEEDED] == 0


def _old_training_store(data_dir: Path) -> list[Job]:
    data_dir.mkdir(parents=True, exist_ok=True)
    old = SqliteJobStore(data_dir / "trainings.sqlite3")
    jobs = [
        old.create(queued("training", {"text": "a"}), idempotency_key="a", body_hash="h")[0],
        old.update(old.create(queued("training", {"text": "b"}))[0].id, status="succeeded"),
        old.create(queued("training", {"text": "c"}))[0],
    ]
    old.claim_next()  # the first one was running when the old server stopped
    old.close()
    return jobs


def test_the_old_training_store_is_copied_once_then_renamed(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    jobs = _old_training_store(data_dir)
    store = SqliteJobStore(data_dir / "jobs.sqlite3")
    merge, _ = store.create(queued("merge", {}), idempotency_key="a", body_hash="other")
    assert adopt_training_store(store, data_dir) == 3
    assert not (data_dir / "trainings.sqlite3").exists()
    assert (data_dir / "trainings.sqlite3.migrated").is_file()
    assert adopt_training_store(store, data_dir) == 0  # once only
    copied, total = store.list(kind="training")
    assert total == 3 and {job.id for job in copied} == {job.id for job in jobs}
    assert store.get(jobs[1].id).status is JobStatus.SUCCEEDED  # type: ignore[union-attr]
    assert store.get(jobs[0].id).status is JobStatus.RUNNING  # type: ignore[union-attr]
    # Both kinds keep their idempotency key "a".
    assert store.find_idempotent("a", "training") == (store.get(jobs[0].id), "h")
    assert store.find_idempotent("a") == (merge, "other")
    # A copy interrupted before the rename is repeated without doubling anything.
    (data_dir / "trainings.sqlite3.migrated").rename(data_dir / "trainings.sqlite3")
    assert adopt_training_store(store, data_dir) == 0
    assert store.list(kind="training")[1] == 3
    store.close()


def test_starting_the_manager_migrates_and_requeues_the_trainings(
    make_manager: Make, toy_trainings: JobKind
) -> None:
    manager = make_manager(standby_worker=False)
    jobs = _old_training_store(manager.settings.data_dir)
    manager.start()
    assert (manager.settings.data_dir / "trainings.sqlite3.migrated").is_file()

    def finished(job: Job) -> Job:
        return wait_for(lambda: (j := manager.get(job.id, kind="training")).status.finished and j)

    # The interrupted training is re-queued by the one restart rule and runs again; the
    # queued one runs; the finished one is left alone. (The toy worker stands in.)
    again, untouched, waiting = (finished(job) for job in jobs)
    assert again.status is JobStatus.SUCCEEDED and again.attempts == 2
    assert waiting.status is JobStatus.SUCCEEDED and waiting.attempts == 1
    assert untouched.attempts == 0 and untouched.version == jobs[1].version
    assert (manager.output_path(waiting) / "result.txt").read_text() == "c"


def test_an_older_database_loses_its_global_idempotency_index(tmp_path: Path) -> None:
    path = tmp_path / "jobs.sqlite3"
    SqliteJobStore(path).close()
    with sqlite3.connect(path) as db:
        db.execute("DROP INDEX jobs_kind_idempotency")
        db.execute("CREATE UNIQUE INDEX jobs_idempotency ON jobs (idempotency_key)")
    store = SqliteJobStore(path)
    store.create(queued("merge", {}), idempotency_key="k")
    assert store.create(queued("training", {}), idempotency_key="k")[1]
    store.close()
    unregister_kind("not-registered")  # forgetting an unknown kind is harmless


def test_pause_and_resume_in_the_store(tmp_path: Path) -> None:
    store = SqliteJobStore(tmp_path / "jobs.sqlite3")
    waiting = store.create(queued("toy", {}))[0]
    paused = store.request_pause(waiting.id)
    assert paused.status is JobStatus.PAUSED and paused.progress.phase == "paused"
    assert store.claim_next() is None  # a paused job is never claimed
    assert store.request_pause(waiting.id) == paused  # already paused: unchanged
    again = store.resume(waiting.id)
    assert again.status is JobStatus.QUEUED and again.created_at == waiting.created_at
    running = store.claim_next()
    assert running is not None and running.id == waiting.id
    flagged = store.request_pause(running.id)
    assert flagged.status is JobStatus.RUNNING and flagged.pause_requested
    assert not store.resume(running.id).pause_requested  # withdrawn before it took effect
    store.request_pause(running.id)
    # A server that stopped while the pause was under way: the job is paused, not re-queued.
    assert store.requeue_interrupted() == []
    stopped = store.get(running.id)
    assert stopped is not None and stopped.status is JobStatus.PAUSED
    assert not stopped.pause_requested and stopped.attempts == 1
    cancelled = store.request_cancel(running.id)
    assert cancelled.status is JobStatus.CANCELLED and cancelled.finished_at is not None
    assert store.resume(running.id) == cancelled  # finished: unchanged
    store.close()


@pytest.mark.parametrize(("still_pausing", "status"), [(True, "paused"), (False, "queued")])
def test_a_worker_stopped_for_a_pause_leaves_its_job_paused_or_queued_if_resumed_since(
    make_manager: Make, still_pausing: bool, status: str
) -> None:
    manager = make_manager()
    manager.store.create(queued("training", {"text": "x"}))
    job = manager.store.claim_next()
    assert job is not None
    if still_pausing:
        job = manager.store.request_pause(job.id)
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    worker = dispatcher_module._Worker(TRAINING, process, pause_sent_at=time.monotonic())
    manager.dispatcher._worker_gone(worker, job)
    after = manager.get(job.id, kind="training")
    assert after.status == status and after.error is None and not after.pause_requested
