"""The job store in one SQLite file, shared by the API process and its worker processes.

The database runs in WAL mode (readers never wait for the writer), with one connection per
thread and process. Every state change is a ``BEGIN IMMEDIATE`` transaction, so two
processes claiming jobs at the same moment can never both get the same one. Structured
fields (recipe, output options, progress, error, file list) are JSON text; times are UTC in a
fixed-width ISO form, so that they sort as text.
"""

from __future__ import annotations

import builtins  # `list` is a method name in the class below
import json
import os
import sqlite3
import threading
import weakref
from collections.abc import Collection, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from merge_kernels.errors import InsufficientSpaceError
from merge_kernels.io.disk_space import free_bytes
from service.jobs.models import DEFAULT_KIND, Job, JobProgress, JobStatus
from service.jobs.store import IdempotencyConflictError, JobNotFoundError, JobStore

_JSON_COLUMNS = frozenset(
    {
        *("recipe", "output", "progress", "error", "files", "publish", "evaluation"),
        *("warnings", "stages"),
    }
)
_TIME_COLUMNS = frozenset({"created_at", "started_at", "finished_at", "updated_at"})
_JOB_COLUMNS = tuple(Job.model_fields)
# Kept beside the record, never in it (nor in the API's view): the idempotency key, and a
# search job's state (JSON), saved after every evaluation.
_EXTRA_COLUMNS = ("idempotency_key", "body_hash", "search_state")
_TIME_FORMAT = "%Y-%m-%dT%H:%M:%S.%fZ"
_FIFO = "ORDER BY created_at ASC, rowid ASC"
_NEWEST = "ORDER BY created_at DESC, rowid DESC"


def _where(
    *, status: str | None = None, kind: str | None = None, kinds: Collection[str] | None = None
) -> tuple[str, tuple[str, ...]]:
    """A ``WHERE`` clause and its arguments for the filters given (none: no clause)."""
    clauses: list[str] = []
    args: list[str] = []
    if status is not None:
        clauses.append("status = ?")
        args.append(status)
    if kind is not None:
        clauses.append("kind = ?")
        args.append(kind)
    if kinds is not None:
        clauses.append(f"kind IN ({', '.join('?' * len(kinds))})")
        args.extend(kinds)
    return ("WHERE " + " AND ".join(clauses) if clauses else ""), tuple(args)


def paused_fields(job: Job) -> dict[str, Any]:
    """The changes that make ``job`` paused: its record and output otherwise kept."""
    return {
        "status": JobStatus.PAUSED,
        "pause_requested": False,
        "worker_pid": None,
        "progress": job.progress.model_copy(update={"phase": "paused", "eta_seconds": None}),
    }


def _free(path: Path) -> int | None:
    try:
        return free_bytes(path.parent)
    except OSError:
        return None


def utcnow() -> datetime:
    """The current time, timezone-aware UTC."""
    return datetime.now(UTC)


def _time_text(value: datetime | None) -> str | None:
    if value is None:
        return None
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)  # naive times are taken to be UTC already
    return value.astimezone(UTC).strftime(_TIME_FORMAT)


def _to_row(job: Job) -> dict[str, Any]:
    data = job.model_dump(mode="json")
    row: dict[str, Any] = {}
    for column in _JOB_COLUMNS:
        if column in _TIME_COLUMNS:
            row[column] = _time_text(getattr(job, column))
        elif column in _JSON_COLUMNS:
            row[column] = json.dumps(data[column], separators=(",", ":"))
        else:
            row[column] = data[column]
    return row


def _from_row(row: sqlite3.Row) -> Job:
    data: dict[str, Any] = {}
    for column in _JOB_COLUMNS:
        value = row[column]
        if column in _JSON_COLUMNS and value is not None:
            value = json.loads(value)
        if value is not None:
            data[column] = value
    return Job.model_validate(data)


class _Connection(sqlite3.Connection):
    """A connection that can be weakly referenced (the base class cannot)."""


class SqliteJobStore(JobStore):
    """Jobs in a SQLite database file; safe across threads and processes.

    Args:
        path: the database file; it and its folder are created, and the schema too.
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path).resolve()
        self.location = str(self.path)
        self._local = threading.local()
        # Weak, so that a finished thread's connection is closed with its thread-local data.
        self._connections: weakref.WeakSet[_Connection] = weakref.WeakSet()
        self._lock = threading.Lock()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._create_schema()

    # -- connections -------------------------------------------------------------------

    def _connection(self) -> sqlite3.Connection:
        # A connection must not cross a fork, nor (for clean transactions) be shared by threads.
        connection: sqlite3.Connection | None = getattr(self._local, "connection", None)
        if connection is not None and getattr(self._local, "pid", None) == os.getpid():
            return connection
        # check_same_thread is off only so that close() may close it from another thread.
        connection = sqlite3.connect(
            self.path,
            timeout=30.0,
            isolation_level=None,
            check_same_thread=False,
            factory=_Connection,
        )
        connection.row_factory = sqlite3.Row
        connection.execute("PRAGMA busy_timeout = 30000")
        connection.execute("PRAGMA journal_mode = WAL")
        connection.execute("PRAGMA synchronous = NORMAL")
        self._local.connection = connection
        self._local.pid = os.getpid()
        with self._lock:
            self._connections.add(connection)
        return connection

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """A write transaction that holds the database's write lock from its start.

        Raises:
            InsufficientSpaceError: the database's disk is full.
        """
        connection = self._connection()
        try:
            connection.execute("BEGIN IMMEDIATE")
            try:
                yield connection
            except BaseException:
                if connection.in_transaction:
                    connection.execute("ROLLBACK")
                raise
            connection.execute("COMMIT")
        except sqlite3.OperationalError as error:
            if getattr(error, "sqlite_errorcode", None) != sqlite3.SQLITE_FULL:
                raise
            if connection.in_transaction:
                connection.execute("ROLLBACK")
            raise InsufficientSpaceError(
                f"the disk of the job database {self.path} is full; free some space in the "
                "data dir and try again",
                details={"folder": str(self.path.parent), "free_bytes": _free(self.path)},
            ) from error

    def _create_schema(self) -> None:
        columns = ", ".join(
            f"{name} TEXT PRIMARY KEY" if name == "id" else name
            for name in (*_JOB_COLUMNS, *_EXTRA_COLUMNS)
        )
        with self._write() as db:
            db.execute(f"CREATE TABLE IF NOT EXISTS jobs ({columns})")
            # Fields added to Job after the file was created become new columns.
            present = {row["name"] for row in db.execute("PRAGMA table_info(jobs)")}
            for name in (*_JOB_COLUMNS, *_EXTRA_COLUMNS):
                if name not in present:
                    db.execute(f"ALTER TABLE jobs ADD COLUMN {name}")
            # Idempotency keys are the client's, per kind: one key may name a merge and a
            # training. (Files made before several kinds shared a store had one global index.)
            db.execute("DROP INDEX IF EXISTS jobs_idempotency")
            db.execute(
                "CREATE UNIQUE INDEX IF NOT EXISTS jobs_kind_idempotency "
                "ON jobs (kind, idempotency_key)"
            )
            db.execute("CREATE INDEX IF NOT EXISTS jobs_status ON jobs (status, created_at)")
            db.execute("CREATE INDEX IF NOT EXISTS jobs_created ON jobs (created_at)")

    def close(self) -> None:
        """Close every connection this store opened (in any thread)."""
        with self._lock:
            connections = list(self._connections)
            self._connections = weakref.WeakSet()
        for connection in connections:
            connection.close()
        self._local = threading.local()

    # -- reads --------------------------------------------------------------------------

    def _fetch(self, db: sqlite3.Connection, job_id: str) -> Job | None:
        row = db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return _from_row(row) if row is not None else None

    def get(self, job_id: str) -> Job | None:
        """The job with this id, or None."""
        return self._fetch(self._connection(), job_id)

    def find_idempotent(
        self, idempotency_key: str, kind: str = DEFAULT_KIND
    ) -> tuple[Job, str | None] | None:
        """The job of ``kind`` created with this idempotency key and its body hash, or None."""
        row = (
            self._connection()
            .execute(
                "SELECT * FROM jobs WHERE kind = ? AND idempotency_key = ?",
                (kind, idempotency_key),
            )
            .fetchone()
        )
        return (_from_row(row), row["body_hash"]) if row is not None else None

    def list(
        self,
        *,
        status: JobStatus | None = None,
        limit: int = 50,
        offset: int = 0,
        kind: str | None = None,
    ) -> tuple[list[Job], int]:
        """A page of jobs, newest first, and the total count (with the same filters)."""
        where, args = _where(status=None if status is None else str(status), kind=kind)
        db = self._connection()
        total = db.execute(f"SELECT COUNT(*) FROM jobs {where}", args).fetchone()[0]
        rows = db.execute(
            f"SELECT * FROM jobs {where} {_NEWEST} LIMIT ? OFFSET ?",
            (*args, max(0, limit), max(0, offset)),
        ).fetchall()
        return [_from_row(row) for row in rows], int(total)

    def cancel_requested(self, job_id: str) -> bool:
        """Whether the job was asked to stop (True for a job that no longer exists)."""
        row = (
            self._connection()
            .execute("SELECT cancel_requested FROM jobs WHERE id = ?", (job_id,))
            .fetchone()
        )
        return row is None or bool(row[0])

    def counts(self, kind: str | None = None) -> dict[JobStatus, int]:
        """How many jobs (of ``kind``, or all) are in each state (every state, zero too)."""
        result = dict.fromkeys(JobStatus, 0)
        where, args = _where(kind=kind)
        query = f"SELECT status, COUNT(*) FROM jobs {where} GROUP BY status"
        for row in self._connection().execute(query, args):
            result[JobStatus(row[0])] = int(row[1])
        return result

    def merge_totals(self) -> tuple[int, float, int]:
        """Over succeeded merge jobs: total bytes written, total seconds, number of jobs."""
        row = (
            self._connection()
            .execute(
                "SELECT COALESCE(SUM(bytes_written), 0), COALESCE(SUM(merge_seconds), 0.0), "
                "COUNT(*) FROM jobs WHERE status = ? AND kind = ?",
                (str(JobStatus.SUCCEEDED), DEFAULT_KIND),
            )
            .fetchone()
        )
        return int(row[0]), float(row[1]), int(row[2])

    def search_state(self, job_id: str) -> dict[str, Any] | None:
        """The search state a search job saved last (see ``JobStore.search_state``)."""
        row = (
            self._connection()
            .execute("SELECT search_state FROM jobs WHERE id = ?", (job_id,))
            .fetchone()
        )
        if row is None or row[0] is None:
            return None
        state = json.loads(row[0])
        return state if isinstance(state, dict) else None

    # -- writes -------------------------------------------------------------------------

    def save_search_state(self, job_id: str, state: dict[str, Any]) -> None:
        """Replace a search job's saved state (see ``JobStore.save_search_state``)."""
        text = json.dumps(state, separators=(",", ":"))
        with self._write() as db:
            found = db.execute(
                "UPDATE jobs SET search_state = ? WHERE id = ? AND status != ?",
                (text, job_id, str(JobStatus.CANCELLED)),
            ).rowcount
            if not found and self._fetch(db, job_id) is None:
                raise JobNotFoundError(job_id)

    def _save(self, db: sqlite3.Connection, job: Job, **changes: Any) -> Job:
        """Write ``job`` with ``changes`` applied (validated), bumping version and updated_at."""
        data = job.model_dump()
        data.update(changes)
        data["version"] = job.version + 1
        data["updated_at"] = utcnow()
        saved = Job.model_validate(data)
        row = _to_row(saved)
        assignments = ", ".join(f"{column} = :{column}" for column in row if column != "id")
        if saved.status is JobStatus.CANCELLED:  # a cancelled search is not resumed
            assignments += ", search_state = NULL"
        db.execute(f"UPDATE jobs SET {assignments} WHERE id = :id", row)
        return saved

    def create(
        self, job: Job, *, idempotency_key: str | None = None, body_hash: str | None = None
    ) -> tuple[Job, bool]:
        """Add a job, unless the idempotency key was used before (see ``JobStore.create``)."""
        with self._write() as db:
            if idempotency_key is not None:
                row = db.execute(
                    "SELECT * FROM jobs WHERE kind = ? AND idempotency_key = ?",
                    (job.kind, idempotency_key),
                ).fetchone()
                if row is not None:
                    if row["body_hash"] != body_hash:
                        raise IdempotencyConflictError(idempotency_key, row["id"])
                    return _from_row(row), False
            saved = job.model_copy(update={"version": 1, "updated_at": utcnow()})
            row_data = _to_row(saved)
            row_data.update(idempotency_key=idempotency_key, body_hash=body_hash)
            names = ", ".join(row_data)
            values = ", ".join(f":{name}" for name in row_data)
            db.execute(f"INSERT INTO jobs ({names}) VALUES ({values})", row_data)
        return saved, True

    def update(self, job_id: str, **fields: object) -> Job:
        """Change fields of a job atomically and return the new record (see ``JobStore``)."""
        unknown = set(fields) - set(_JOB_COLUMNS) | ({"id"} & set(fields))
        if unknown:
            raise TypeError(f"cannot update job fields {sorted(unknown)}")
        with self._write() as db:
            job = self._fetch(db, job_id)
            if job is None:
                raise JobNotFoundError(job_id)
            return self._save(db, job, **fields)

    def claim_next(self, kinds: Collection[str] | None = None) -> Job | None:
        """Move the oldest queued job (of ``kinds``, or any) to running, atomically (see
        ``JobStore.claim_next``)."""
        if kinds is not None and not kinds:
            return None
        where, args = _where(status=str(JobStatus.QUEUED), kinds=kinds)
        with self._write() as db:
            row = db.execute(f"SELECT * FROM jobs {where} {_FIFO} LIMIT 1", args).fetchone()
            if row is None:
                return None
            job = _from_row(row)
            return self._save(
                db,
                job,
                status=JobStatus.RUNNING,
                attempts=job.attempts + 1,
                started_at=utcnow(),
                finished_at=None,
                worker_pid=None,
                progress=JobProgress(phase="planning"),
            )

    def request_cancel(self, job_id: str) -> Job:
        """Cancel a queued or paused job at once, flag a running one, leave a finished one
        unchanged."""
        with self._write() as db:
            job = self._fetch(db, job_id)
            if job is None:
                raise JobNotFoundError(job_id)
            if job.status in (JobStatus.QUEUED, JobStatus.PAUSED):
                return self._save(
                    db,
                    job,
                    status=JobStatus.CANCELLED,
                    cancel_requested=True,
                    pause_requested=False,
                    finished_at=utcnow(),
                    progress=job.progress.model_copy(update={"phase": "cancelled"}),
                )
            if job.status is JobStatus.RUNNING and not job.cancel_requested:
                return self._save(db, job, cancel_requested=True)
            return job

    def request_pause(self, job_id: str) -> Job:
        """Pause a queued job at once, flag a running one (see ``JobStore.request_pause``)."""
        with self._write() as db:
            job = self._fetch(db, job_id)
            if job is None:
                raise JobNotFoundError(job_id)
            if job.status is JobStatus.QUEUED:
                return self._save(db, job, **paused_fields(job))
            if job.status is JobStatus.RUNNING and not job.cancel_requested:
                return self._save(db, job, pause_requested=True)
            return job

    def resume(self, job_id: str) -> Job:
        """Queue a paused job again, or withdraw a running one's pause request."""
        with self._write() as db:
            job = self._fetch(db, job_id)
            if job is None:
                raise JobNotFoundError(job_id)
            if job.status is JobStatus.PAUSED:
                return self._save(
                    db,
                    job,
                    status=JobStatus.QUEUED,
                    pause_requested=False,
                    progress=job.progress.model_copy(update={"phase": "queued"}),
                )
            if job.status is JobStatus.RUNNING and job.pause_requested:
                return self._save(db, job, pause_requested=False)
            return job

    def import_file(self, source: Path) -> int:
        """Copy every job of another job database file into this one, once.

        Jobs whose id is already here are skipped, so an interrupted import can be repeated.

        Returns:
            How many jobs were added.
        """
        other = SqliteJobStore(source)  # brings the file's columns up to date
        try:
            rows = other._connection().execute("SELECT * FROM jobs").fetchall()
        finally:
            other.close()
        columns = (*_JOB_COLUMNS, *_EXTRA_COLUMNS)
        insert = (
            f"INSERT OR IGNORE INTO jobs ({', '.join(columns)}) "
            f"VALUES ({', '.join('?' * len(columns))})"
        )
        added = 0
        with self._write() as db:
            for row in rows:
                added += db.execute(insert, [row[column] for column in columns]).rowcount
        return added

    def requeue_interrupted(self) -> builtins.list[str]:
        """Put every running job back in the queue, keeping its FIFO place."""
        with self._write() as db:
            rows = db.execute(
                f"SELECT * FROM jobs WHERE status = ? {_FIFO}", (str(JobStatus.RUNNING),)
            ).fetchall()
            requeued = []
            for row in rows:
                job = _from_row(row)
                if job.pause_requested:  # it was being paused: it is
                    self._save(db, job, **paused_fields(job))
                    continue
                self._save(
                    db,
                    job,
                    status=JobStatus.QUEUED,
                    worker_pid=None,
                    progress=JobProgress(phase="queued"),
                )
                requeued.append(job.id)
        return requeued


def open_store(location: str) -> JobStore:
    """Open the store a ``JobStore.location`` names (for SQLite: the database path).

    Args:
        location: the ``location`` of a store, as the API process passes it to a worker.

    Returns:
        A store reaching the same jobs.
    """
    return SqliteJobStore(Path(location))
