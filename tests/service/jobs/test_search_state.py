"""A search job's state in the job store: saved beside the record, kept across updates and
restarts, dropped when the job is cancelled, added to databases made before it existed."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest

from service.jobs.kinds.search import JobSearchState
from service.jobs.models import Job, JobProgress, JobStatus, OutputOptions
from service.jobs.sqlite_store import SqliteJobStore
from service.jobs.store import JobNotFoundError

STATE = {"version": 1, "evaluations": [{"index": 0, "score": 1.5}], "strategy": {"x": [0.5]}}


def search_job(job_id: str = "s1") -> Job:
    return Job(
        id=job_id,
        kind="search",
        status=JobStatus.QUEUED,
        recipe={"budget": {"evaluations": 3}},
        output=OutputOptions(),
        created_at=datetime(2026, 1, 1, tzinfo=UTC),
    )


@pytest.fixture
def store(tmp_path: Path) -> Iterator[SqliteJobStore]:
    opened = SqliteJobStore(tmp_path / "jobs.sqlite3")
    yield opened
    opened.close()


def test_the_state_round_trips_and_survives_record_updates(store: SqliteJobStore) -> None:
    store.create(search_job())
    states = JobSearchState(store, "s1")
    assert states.load() is None
    states.save(STATE)
    store.claim_next()
    store.update("s1", progress=JobProgress(phase="search: evaluated", evaluations_done=1))
    store.requeue_interrupted()
    assert states.load() == STATE
    # Never part of the record (nor of any API view of it).
    assert "search_state" not in (store.get("s1") or search_job()).model_dump()


def test_a_cancelled_search_keeps_no_state(store: SqliteJobStore) -> None:
    store.create(search_job())
    store.save_search_state("s1", STATE)
    store.request_cancel("s1")
    assert store.search_state("s1") is None
    store.save_search_state("s1", STATE)  # a worker saving late: dropped too
    assert store.search_state("s1") is None


def test_saving_for_a_missing_job_is_refused(store: SqliteJobStore) -> None:
    with pytest.raises(JobNotFoundError):
        store.save_search_state("nope", STATE)
    assert store.search_state("nope") is None


def test_an_older_database_gains_the_column(tmp_path: Path) -> None:
    path = tmp_path / "old.sqlite3"
    opened = SqliteJobStore(path)
    opened.create(search_job("old"))
    opened.close()
    with sqlite3.connect(path) as db:  # as a database made before searches existed
        db.execute("ALTER TABLE jobs DROP COLUMN search_state")
    reopened = SqliteJobStore(path)
    try:
        assert reopened.search_state("old") is None
        reopened.save_search_state("old", STATE)
        assert reopened.search_state("old") == STATE
        assert reopened.get("old") is not None
    finally:
        reopened.close()
