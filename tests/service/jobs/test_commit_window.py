"""A worker killed between publishing its output and recording the success.

The output folder is complete, but the store still says ``running``: the job must end
``succeeded`` with that output, whether the service sees the worker die or only a restart
finds the job, and must never be run again into an ``output_exists`` failure.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from merge_kernels.recipe import Recipe
from merge_kernels.runner import run_merge
from service.jobs.manager import JobManager
from service.jobs.models import Job, JobStatus, OutputOptions
from service.jobs.worker import worker_command
from tests.service.jobs.conftest import SHARD_BYTES, ties_recipe, wait_finished

pytestmark = pytest.mark.slow

Make = Callable[..., JobManager]
FAULTS = Path(__file__).parent / "faults"


def inject_fault(monkeypatch: pytest.MonkeyPatch, point: str) -> dict[str, str]:
    """Make worker processes started from now on die at ``point`` (see faults/)."""
    path = os.pathsep.join(p for p in (str(FAULTS), os.environ.get("PYTHONPATH")) if p)
    monkeypatch.setenv("PYTHONPATH", path)
    monkeypatch.setenv("MERGE_FAULT_KILL_AT", point)
    return {**os.environ}


def assert_published_like_a_clean_run(
    manager: JobManager, done: Job, recipe: Recipe, tmp_path: Path
) -> None:
    assert done.status is JobStatus.SUCCEEDED, done.error
    out = manager.settings.outputs_dir / "merged"
    assert done.output_dir == str(out)
    reference = run_merge(
        recipe,
        tmp_path / "reference" / "merged",
        manager.engine_options(done.output),
    )
    assert sorted(done.files) == sorted(reference.files)
    assert sorted(p.name for p in out.iterdir()) == sorted(reference.files)
    for name in reference.files:
        assert (out / name).read_bytes() == (reference.out_dir / name).read_bytes(), name
    assert done.bytes_written == reference.bytes_written
    leftovers = {p.name for p in manager.settings.outputs_dir.iterdir()} - {"merged"}
    assert leftovers == set(), "no staging folder and no commit record remain"


def test_worker_killed_after_publishing_while_the_service_runs(
    make_manager: Make, large_models: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    inject_fault(monkeypatch, "after_commit")
    recipe = ties_recipe(large_models, method="task_arithmetic")
    manager = make_manager()
    manager.start()
    output = OutputOptions(name="merged", shard_size=SHARD_BYTES)
    job, _ = manager.submit(recipe, output)
    done = wait_finished(manager, job.id)
    assert done.attempts == 1
    assert_published_like_a_clean_run(manager, done, recipe, tmp_path)


def test_worker_killed_after_publishing_while_the_service_is_down(
    make_manager: Make, large_models: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    recipe = ties_recipe(large_models, method="task_arithmetic")
    first = make_manager()  # not started: the job is claimed by hand, as a server would
    output = OutputOptions(name="merged", shard_size=SHARD_BYTES)
    job, _ = first.submit(recipe, output)
    claimed = first.store.claim_next()
    assert claimed is not None and claimed.id == job.id
    command = worker_command(
        job.id,
        store_location=first.store.location,
        output=first.output_path(job),
        device="cpu",
        base_dir=first.settings.inputs_dir,
        allowed_roots=first.settings.input_roots,
    )
    environment = inject_fault(monkeypatch, "after_commit")
    died = subprocess.run(command, env=environment, timeout=120, check=False)
    assert died.returncode == -9
    assert (first.settings.outputs_dir / "merged" / "model.safetensors.index.json").exists()
    assert first.get(job.id).status is JobStatus.RUNNING

    monkeypatch.delenv("MERGE_FAULT_KILL_AT")
    second = make_manager()  # the next server start
    second.start()
    done = wait_finished(second, job.id)
    assert done.attempts == 2
    shards = [name for name in done.files if name.endswith(".safetensors")]
    assert done.resumed_shards == len(shards) > 1  # nothing was merged again
    assert_published_like_a_clean_run(second, done, recipe, tmp_path)
