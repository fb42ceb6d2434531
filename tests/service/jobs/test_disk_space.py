"""A disk too small for a merge: refused up front with the numbers, or failed clearly when
it fills during the merge; never an internal error, and no staging folder left behind."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import yaml

from merge_kernels.errors import InsufficientSpaceError
from merge_kernels.runner import MergeOptions, run_merge
from service.jobs.manager import JobManager
from service.jobs.models import Job, JobStatus, OutputOptions
from service.jobs.sqlite_store import SqliteJobStore, utcnow
from service.jobs.worker import worker_command
from tests.service.jobs.conftest import ties_recipe
from tests.service.tmpfs import small_tmpfs

pytestmark = pytest.mark.slow

Make = Callable[..., JobManager]


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """An 8 MiB tmpfs (needs the right to mount; skipped without it)."""
    with small_tmpfs(tmp_path / "disk", "8m") as folder:
        yield folder


def test_a_merge_larger_than_the_disk_is_refused_before_writing(
    small_disk: Path, large_models: Path
) -> None:
    recipe = ties_recipe(large_models, method="task_arithmetic")
    with pytest.raises(InsufficientSpaceError) as caught:
        run_merge(recipe, small_disk / "out", MergeOptions(space_reserve_bytes=0))
    details = caught.value.details
    assert caught.value.code == "insufficient_space"
    assert isinstance(details["needed_bytes"], int) and details["needed_bytes"] > 8 << 20
    assert isinstance(details["free_bytes"], int) and details["free_bytes"] <= 8 << 20
    assert "free some space" in caught.value.message
    assert list(small_disk.iterdir()) == []


def test_the_command_reports_the_space_and_leaves_no_staging(
    small_disk: Path, large_models: Path, tmp_path: Path
) -> None:
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        yaml.safe_dump(ties_recipe(large_models, method="task_arithmetic").model_dump(mode="json"))
    )
    command = [sys.executable, "-m", "service.cli", "merge", str(recipe), str(small_disk / "out")]
    done = subprocess.run([*command, "--quiet"], capture_output=True, text=True, check=False)
    assert done.returncode == 2, done.stderr
    assert "free" in done.stderr and "bytes" in done.stderr
    assert list(small_disk.iterdir()) == []


def _add_jobs(store: SqliteJobStore, count: int) -> None:
    recipe = {"merge_method": "linear", "models": [{"model": "x" * 4000}] * 50}
    for _ in range(count):
        job = Job(
            id=uuid.uuid4().hex,
            status=JobStatus.QUEUED,
            recipe=recipe,
            output=OutputOptions(),
            created_at=utcnow(),
        )
        store.create(job)


def test_the_command_keeps_finished_shards_it_can_resume_and_says_so(
    large_models: Path, tmp_path: Path
) -> None:
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        yaml.safe_dump(ties_recipe(large_models, method="task_arithmetic").model_dump(mode="json"))
    )
    out = tmp_path / "out"
    command = [sys.executable, "-m", "service.cli", "merge", str(recipe), str(out), "--quiet"]
    command += ["--shard-size", "1MB"]
    faults = str(Path(__file__).parent / "faults")
    path = os.pathsep.join(p for p in (faults, os.environ.get("PYTHONPATH")) if p)
    failing = dict(os.environ, PYTHONPATH=path, MERGE_FAULT_DISK_FULL_AT="after_shard:2")
    failed = subprocess.run(command, env=failing, capture_output=True, text=True, check=False)
    assert failed.returncode == 2, failed.stderr
    assert "No space left on device" in failed.stderr
    staging = tmp_path / ".out.tureen-partial"
    assert f"2 finished shard(s) are kept in {staging}" in failed.stderr
    assert staging.is_dir() and not out.exists()

    resumed = subprocess.run(command, capture_output=True, text=True, check=True)
    assert json.loads(resumed.stdout)["shards_resumed"] == 2
    assert not staging.exists()


def test_a_full_database_disk_is_insufficient_space(small_disk: Path) -> None:
    store = SqliteJobStore(small_disk / "jobs.sqlite3")
    try:
        with open(small_disk / "filler", "wb") as filler:
            try:
                while True:
                    filler.write(b"\0" * (1 << 16))
                    filler.flush()
            except OSError:
                pass
        with pytest.raises(InsufficientSpaceError, match="job database") as caught:
            _add_jobs(store, 100)
        assert caught.value.code == "insufficient_space"
    finally:
        store.close()


_LIMITED_WORKER = """
import resource, signal, sys
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the limit fail with EFBIG
resource.setrlimit(resource.RLIMIT_FSIZE, (4_000_000, 4_000_000))
from service.jobs.worker import main
sys.exit(main(sys.argv[1:]))
"""


def test_a_disk_that_fills_during_the_merge_fails_the_job_with_insufficient_space(
    make_manager: Make, large_models: Path
) -> None:
    manager = make_manager()  # not started: the job is claimed by hand, as a server would
    job, _ = manager.submit(ties_recipe(large_models, method="task_arithmetic"), OutputOptions())
    assert manager.store.claim_next() is not None
    command = worker_command(
        job.id,
        store_location=manager.store.location,
        output=manager.output_path(job),
        device="cpu",
        base_dir=manager.settings.inputs_dir,
        allowed_roots=manager.settings.input_roots,
    )
    assert command[1:3] == ["-m", "service.jobs.worker"]
    limited = [command[0], "-c", textwrap.dedent(_LIMITED_WORKER), *command[3:]]
    subprocess.run(limited, env=dict(os.environ), timeout=120, check=True)
    failed = manager.get(job.id)
    assert failed.status is JobStatus.FAILED
    assert failed.error is not None
    assert failed.error.code == "insufficient_space", failed.error
    assert "File too large" in failed.error.message
    assert json.dumps(failed.error.details)
    assert list(manager.settings.outputs_dir.iterdir()) == []
