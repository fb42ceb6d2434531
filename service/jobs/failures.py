"""How a worker records why its job failed, in words a client may read."""

from __future__ import annotations

from pathlib import Path

from merge_kernels.errors import TureenError
from service.client_paths import ClientPaths
from service.jobs.models import JobError
from service.jobs.store import JobStore


def job_error(failure: BaseException, store: JobStore) -> JobError:
    """The error record of a failed job, with server paths shown as the client names them.

    Args:
        failure: what the job raised.
        store: the job's store; the data directory is the folder its database is in.

    Returns:
        ``TureenError``s keep their code and details; an output folder published by someone
        else first is ``output_exists``; anything else is ``internal_error``.
    """
    paths = ClientPaths.for_data_dir(Path(store.location).parent)
    if isinstance(failure, TureenError):
        message, details = paths.error(failure)
        return JobError(code=failure.code, message=message, details=details)
    if isinstance(failure, FileExistsError):
        # Another writer published the same output folder after this job was accepted.
        return JobError(code="output_exists", message=paths.text(str(failure)))
    return JobError(
        code="internal_error", message=paths.text(f"{type(failure).__name__}: {failure}")
    )
