"""Taking over the training store of older versions, which kept trainings in a file of their own.

Older servers kept training jobs in ``data_dir/trainings.sqlite3`` beside the merges'
database. Every kind now shares one store, so at start that file's jobs are copied into the
store once (ids already there are skipped, so an interrupted copy is simply repeated), and
the file is renamed ``trainings.sqlite3.migrated``, kept for reference but never read again.
"""

from __future__ import annotations

import logging
from pathlib import Path

from service.jobs.sqlite_store import SqliteJobStore
from service.jobs.store import JobStore

log = logging.getLogger(__name__)

OLD_TRAINING_STORE = "trainings.sqlite3"
MIGRATED_SUFFIX = ".migrated"


def adopt_training_store(store: JobStore, data_dir: Path) -> int:
    """Copy the jobs of ``data_dir/trainings.sqlite3`` into ``store``, then rename the file.

    Does nothing when there is no such file, or when ``store`` is not a SQLite store (a
    server database is set up by other means).

    Returns:
        How many jobs were copied.
    """
    old = data_dir / OLD_TRAINING_STORE
    if not old.is_file() or not isinstance(store, SqliteJobStore) or old.resolve() == store.path:
        return 0
    added = store.import_file(old)
    old.rename(old.with_name(old.name + MIGRATED_SUFFIX))
    for suffix in ("-wal", "-shm"):  # checkpointed into the file when it was closed
        old.with_name(old.name + suffix).unlink(missing_ok=True)
    log.info("moved %d training job(s) from %s into the job store", added, old.name)
    return added
