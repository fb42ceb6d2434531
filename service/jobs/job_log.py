"""Each job's log: what its worker logged while running it, kept in a bounded text file.

A worker process writes its log lines to its standard error (which goes to the server's),
and, while it runs a job, also to ``data_dir/logs/<kind>/<job id>.log``, which
``GET /v1/merges/{id}/log`` and ``GET /v1/trainings/{id}/log`` serve. A job's log holds at
most :data:`MAX_LOG_BYTES`; what comes after is dropped, with one line saying so. The
service adds its own lines about the job (a worker that died) to the same file.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

MAX_LOG_BYTES = 1 << 20  # 1 MiB per job: enough for a merge's story, never a disk filler
LOG_FORMAT = "%(asctime)s %(levelname)s %(message)s"
_TRUNCATED = "... the rest of this job's log was dropped: it exceeded {limit} bytes\n"


def logs_dir(data_dir: Path, kind: str) -> Path:
    """The folder of the logs of jobs of ``kind`` (``merges``, ``trainings``)."""
    return Path(data_dir) / "logs" / kind


def log_path(folder: Path, job_id: str) -> Path:
    """The log file of ``job_id`` in ``folder``.

    Raises:
        ValueError: ``job_id`` is not a plain file name.
    """
    if Path(job_id).name != job_id or job_id in ("", ".", ".."):
        raise ValueError(f"{job_id!r} is not a job id")
    return Path(folder) / f"{job_id}.log"


class BoundedFileHandler(logging.Handler):
    """Appends records to a file until it holds ``limit`` bytes, then notes the cut once."""

    def __init__(self, path: Path, limit: int = MAX_LOG_BYTES) -> None:
        super().__init__()
        self.path = path
        self.limit = limit
        path.parent.mkdir(parents=True, exist_ok=True)
        self._stream = open(path, "ab")  # noqa: SIM115 -- closed by close()
        self._size = self._stream.tell()
        self._cut = self._size >= limit

    def emit(self, record: logging.LogRecord) -> None:
        """Write one formatted record, or nothing once the file is full."""
        try:  # ``handle`` holds the handler's lock around this call
            self._write((self.format(record) + "\n").encode("utf-8", "replace"))
        except Exception:
            self.handleError(record)

    def _write(self, line: bytes) -> None:
        if self._cut:
            return
        if self._size + len(line) > self.limit:
            self._cut = True
            line = _TRUNCATED.format(limit=self.limit).encode()
        self._stream.write(line)
        self._stream.flush()
        self._size += len(line)

    def close(self) -> None:
        """Close the file."""
        self._stream.close()
        super().close()


@contextmanager
def capturing(folder: Path | None, job_id: str) -> Iterator[None]:
    """Copy this process's log records into the job's log for the ``with`` block.

    With ``folder`` None, nothing is captured. A log that cannot be opened is reported and
    skipped: the job runs all the same.
    """
    if folder is None:
        yield
        return
    try:
        handler = BoundedFileHandler(log_path(folder, job_id))
    except (OSError, ValueError):
        logging.getLogger(__name__).warning("cannot open the log of job %s", job_id, exc_info=True)
        yield
        return
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        yield
    finally:
        root.removeHandler(handler)
        handler.close()


def append(folder: Path, job_id: str, level: int, message: str) -> None:
    """Add one line of the service's own to a job's log (best effort)."""
    try:
        handler = BoundedFileHandler(log_path(folder, job_id))
    except (OSError, ValueError):
        return
    try:
        handler.setFormatter(logging.Formatter(LOG_FORMAT))
        handler.handle(logging.LogRecord("tureen", level, "", 0, message, None, None))
    finally:
        handler.close()


def read(folder: Path, job_id: str) -> str:
    """The job's log so far ("" before its worker wrote anything)."""
    try:
        data = log_path(folder, job_id).read_bytes()
    except FileNotFoundError:
        return ""
    return data[: MAX_LOG_BYTES + 256].decode("utf-8", "replace")
