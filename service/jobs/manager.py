"""The job manager of the service: one job system for every kind of job.

:class:`JobManager` keeps merges, trainings (and any kind registered in
:mod:`service.jobs.kinds`) in one store and runs them through one dispatcher (see
:mod:`service.jobs.system` and :mod:`service.jobs.dispatcher`). Its merge methods
(``submit``, ``submit_stages``, ``validate``, ``plan``...) come from
:class:`~service.jobs.kinds.merge.MergeJobs`; other kinds submit through functions of their
kind module that take the manager (:func:`service.jobs.kinds.training.submit_training`).

Importing this module registers the built-in kinds, so that a manager knows them.
"""

from __future__ import annotations

from service.jobs.kinds import search as _search  # noqa: F401  (registers the kind)
from service.jobs.kinds import training as _training  # noqa: F401  (registers the kind)
from service.jobs.kinds.merge import MergeJobs, OverMemoryBudgetError
from service.jobs.store import IdempotencyConflictError, JobNotFoundError
from service.jobs.system import OutputExistsError

__all__ = [
    "IdempotencyConflictError",
    "JobManager",
    "JobNotFoundError",
    "OutputExistsError",
    "OverMemoryBudgetError",
]


class JobManager(MergeJobs):
    """Runs the jobs of every registered kind from one store in worker processes.

    Thread-safe: ``submit``, ``cancel``, ``get``, ``list``, ``wait_for_update``, ``watch``
    and ``metrics`` may be called from any thread while the dispatcher thread runs.

    Args:
        store: where jobs are kept.
        settings: the service settings (data dir, allowed roots, workers, budget, device).
    """
