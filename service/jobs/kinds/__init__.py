"""Job kinds: what a merge, a training (and later a search) job needs beyond the common parts.

Every kind shares one store (one SQLite file, jobs told apart by ``Job.kind``), one
dispatcher (:mod:`service.jobs.dispatcher`: claiming, per-kind concurrency, crashes,
cancellation, the restart rule), one manager (:class:`service.jobs.system.JobSystem`: get,
list, cancel, watch, logs, output folders) and one set of routes
(:mod:`service.api.job_routes`: list, get, cancel, events, log, files). A kind adds only:

1. **its spec**: the request model and its validation into the document the job keeps in
   ``Job.recipe``;
2. **its submission**: a function that validates a request and queues a :class:`Job` with
   ``kind=<name>`` through :meth:`JobSystem.enqueue` (idempotency and output-name checks are
   done there);
3. **its worker entry point**: a module whose ``--standby`` mode runs
   :func:`service.jobs.standby.serve` with a function that runs one claimed job to its end
   and records the outcome (progress into ``Job.progress``, files, ``error``), polling
   ``store.cancel_requested``;
4. **its routes' schemas**: a router with the submit route and a
   :class:`service.api.job_routes.JobRoutes` for the shared ones (the API view of a job, its
   list model, the texts of the operations).

How to add a kind (``search``, say):

- write ``service/jobs/kinds/search.py`` with ``SEARCH = JobKind(name="search", ...)`` and
  ``register_kind(SEARCH)`` at import, the submission function, and the worker module;
- import it in :mod:`service.jobs.manager` beside the built-in kinds, so that the dispatcher
  knows it before it starts;
- write ``service/api/routes/searches.py``: ``router`` with the submit route, then
  ``add_job_routes(router, JobRoutes(kind="search", ...))``; include the router in
  :func:`service.app.create_app` and regenerate ``openapi.yaml``.

Nothing else changes: the dispatcher runs the kind's workers, at most ``concurrency`` at a
time, and a restart re-queues its interrupted jobs like every other kind's.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from service.jobs.models import Job
from service.jobs.store import JobStore
from service.settings import ServiceSettings

__all__ = [
    "JobKind",
    "UnknownKindError",
    "WorkerSetup",
    "get_kind",
    "register_kind",
    "registered_kinds",
    "unregister_kind",
]


@dataclass(frozen=True)
class WorkerSetup:
    """What a kind's worker command is built from.

    Attributes:
        store_location: the store's ``location`` (the worker opens the same store).
        settings: the service settings.
        log_dir: where the kind's job logs are kept.
    """

    store_location: str
    settings: ServiceSettings
    log_dir: Path


def _no_recovery(store: JobStore, job: Job, output: Path, settings: ServiceSettings) -> bool:
    return False


def _one(settings: ServiceSettings) -> int:
    return 1


def _none(settings: ServiceSettings) -> int:
    return 0


@dataclass(frozen=True)
class JobKind:
    """A kind of job, as the dispatcher and the shared routes see it.

    Attributes:
        name: the ``Job.kind`` of its jobs.
        noun: how messages name one job (``job`` for merges, ``training``).
        output_noun: how messages name its output folder (``output``, ``adapter``).
        log_folder: its logs' folder under ``data_dir/logs``.
        output_root: the folder its jobs' output folders are in.
        standby_command: the command line of a worker in standby mode (see
            :mod:`service.jobs.standby`), which reads its jobs from standard input.
        discard: removes a failed or cancelled job's partial output, given its folder.
        concurrency: how many of its jobs may run at once.
        spare: standby workers to keep started ahead of time (0: one process per job).
        cancel_grace_s: seconds a worker may ignore a cancellation before it is killed.
        recover: called when a worker ended without recording its running job's outcome;
            True if it found the job's work complete and recorded it (the merge kind: the
            output was published just before the worker died).
        metric_family: the Prometheus gauge counting its jobs per state.
    """

    name: str
    noun: str
    output_noun: str
    log_folder: str
    output_root: Callable[[ServiceSettings], Path]
    standby_command: Callable[[WorkerSetup], Sequence[str]]
    discard: Callable[[Path], None]
    concurrency: Callable[[ServiceSettings], int] = _one
    spare: Callable[[ServiceSettings], int] = _none
    cancel_grace_s: float = 5.0
    recover: Callable[[JobStore, Job, Path, ServiceSettings], bool] = _no_recovery
    metric_family: str | None = None


class UnknownKindError(LookupError):
    """No job kind of that name is registered."""


_KINDS: dict[str, JobKind] = {}


def register_kind(kind: JobKind) -> JobKind:
    """Make ``kind`` known to managers created from now on; returns it.

    Raises:
        ValueError: another kind of that name is registered.
    """
    known = _KINDS.get(kind.name)
    if known is not None and known is not kind:
        raise ValueError(f"a job kind named {kind.name!r} is already registered")
    _KINDS[kind.name] = kind
    return kind


def unregister_kind(name: str) -> None:
    """Forget the kind ``name`` (for tests that register kinds of their own)."""
    _KINDS.pop(name, None)


def get_kind(name: str) -> JobKind:
    """The registered kind ``name``.

    Raises:
        UnknownKindError: none is registered under that name.
    """
    try:
        return _KINDS[name]
    except KeyError:
        known = ", ".join(sorted(_KINDS))
        raise UnknownKindError(f"no job kind {name!r} is registered (known: {known})") from None


def registered_kinds() -> tuple[JobKind, ...]:
    """Every registered kind, in registration order."""
    return tuple(_KINDS.values())
