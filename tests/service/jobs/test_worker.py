"""The worker's logic run in-process: outcomes recorded, progress throttled, cancel polled."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from merge_kernels.runner import Progress
from service.jobs.manager import JobManager
from service.jobs.models import Job, JobStatus, OutputOptions
from service.jobs.sqlite_store import utcnow
from service.jobs.worker import (
    CancelPoll,
    ProgressWriter,
    describe_exit,
    run_job,
    worker_environment,
)
from tests.service.jobs.conftest import SMALL, ties_recipe


@pytest.fixture
def manager(make_manager: Callable[..., JobManager]) -> JobManager:
    """A manager that is never started: jobs are claimed and run in this process."""
    return make_manager()


def claimed(manager: JobManager, recipe: dict[str, object], **output: object) -> Job:
    job = Job(
        id=f"job{len(manager.list()[0])}",
        status=JobStatus.QUEUED,
        recipe=recipe,
        output=OutputOptions.model_validate(output),
        created_at=utcnow(),
    )
    manager.store.create(job)
    running = manager.store.claim_next()
    assert running is not None
    return running


def leftovers(manager: JobManager) -> list[Path]:
    """Whatever is in the outputs folder (staging folders included)."""
    folder = manager.settings.outputs_dir
    return list(folder.iterdir()) if folder.exists() else []


def run(manager: JobManager, job: Job) -> Job:
    status = run_job(
        manager.store, job.id, manager.output_path(job), manager.engine_options(job.output)
    )
    final = manager.get(job.id)
    assert final.status is status
    return final


def test_success_records_files_progress_and_totals(manager: JobManager, small_models: Path) -> None:
    recipe = ties_recipe(small_models).model_dump(mode="json")
    job = run(manager, claimed(manager, recipe, dtype="bfloat16"))
    assert job.status is JobStatus.SUCCEEDED
    assert job.error is None
    assert job.output_dir == str(manager.output_path(job))
    assert "model.safetensors" in job.files
    assert job.progress.phase == "done"
    assert job.progress.tensors_done == job.progress.tensors_total == len(SMALL.tensors())
    assert job.progress.bytes_done == job.progress.bytes_total > 0
    assert job.bytes_written is not None
    assert job.bytes_written > job.progress.bytes_total  # plus config, card, recipe
    assert job.merge_seconds is not None
    assert job.finished_at is not None


def test_engine_error_is_recorded_with_its_code(manager: JobManager, small_models: Path) -> None:
    recipe = ties_recipe(small_models).model_dump(mode="json")
    recipe["models"] = [{"model": str(small_models / "vanished")}, *recipe["models"]]
    job = run(manager, claimed(manager, recipe))
    assert job.status is JobStatus.FAILED
    assert job.error is not None
    assert job.error.code == "not_found"
    assert "vanished" in job.error.message
    assert leftovers(manager) == []


def test_unexpected_error_is_internal(manager: JobManager, small_models: Path) -> None:
    recipe = ties_recipe(small_models).model_dump(mode="json")
    job = claimed(manager, recipe)
    status = run_job(
        manager.store,
        job.id,
        manager.output_path(job),
        manager.engine_options().__class__(device="no-such-device"),
    )
    assert status is JobStatus.FAILED
    error = manager.get(job.id).error
    assert error is not None
    assert error.code == "internal_error"
    assert "no-such-device" in error.message
    assert leftovers(manager) == []  # staging removed


def test_cancelled_before_the_first_tensor_leaves_nothing(
    manager: JobManager, small_models: Path
) -> None:
    job = claimed(manager, ties_recipe(small_models).model_dump(mode="json"))
    manager.store.request_cancel(job.id)
    final = run(manager, job)
    assert final.status is JobStatus.CANCELLED
    assert final.error is None
    assert leftovers(manager) == []


def test_a_job_that_is_not_running_is_left_alone(manager: JobManager, small_models: Path) -> None:
    job = claimed(manager, ties_recipe(small_models).model_dump(mode="json"))
    manager.store.update(job.id, status=JobStatus.SUCCEEDED)
    assert run(manager, job).status is JobStatus.SUCCEEDED
    assert not manager.output_path(job).exists()


class _CountingStore:
    """Just enough of a store for the throttles, counting its calls."""

    def __init__(self) -> None:
        self.updates: list[dict[str, object]] = []
        self.flag_reads = 0
        self.flag = False

    def update(self, job_id: str, **fields: object) -> None:
        self.updates.append(fields)

    def cancel_requested(self, job_id: str) -> bool:
        self.flag_reads += 1
        return self.flag


def test_progress_is_throttled_but_phase_changes_always_written(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    clock = [100.0]
    monkeypatch.setattr("service.jobs.worker.time.monotonic", lambda: clock[0])
    store = _CountingStore()
    writer = ProgressWriter(store, "j", interval=0.25)  # type: ignore[arg-type]
    writer(Progress(0, 10, 0, 1000, None, "trim thresholds"))
    for step in range(1, 9):  # 8 reports within 0.16 s: only the phase change is written
        clock[0] += 0.02
        writer(Progress(step, 10, step * 100, 1000, f"t{step}"))
    assert [u["progress"].phase for u in store.updates] == ["trim thresholds", "merging"]  # type: ignore[attr-defined]
    clock[0] += 1.0  # 800 bytes in 1.14 s since the first tensor was reported
    writer(Progress(9, 10, 900, 1000, "t9"))
    last = store.updates[-1]["progress"]
    assert last.eta_seconds == pytest.approx(100 * 1.14 / 800)  # type: ignore[attr-defined]
    writer(Progress(10, 10, 1000, 1000, None, "done"))
    assert store.updates[-1]["progress"].eta_seconds == 0.0  # type: ignore[attr-defined]
    assert len(store.updates) == 4


def test_cancel_flag_is_read_at_most_every_interval(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = [0.0]
    monkeypatch.setattr("service.jobs.worker.time.monotonic", lambda: clock[0])
    store = _CountingStore()
    poll = CancelPoll(store, "j", interval=0.5)  # type: ignore[arg-type]
    assert not any(poll() for _ in range(100))
    assert store.flag_reads == 1
    store.flag = True
    clock[0] += 0.6
    assert poll()
    assert poll()
    assert store.flag_reads == 2


def test_exit_descriptions() -> None:
    assert describe_exit(-9) == (
        "was killed by SIGKILL (the system may have run out of memory)",
        {"exit_code": None, "signal": "SIGKILL"},
    )
    assert describe_exit(-15)[1] == {"exit_code": None, "signal": "SIGTERM"}
    assert describe_exit(3) == ("exited with status 3", {"exit_code": 3, "signal": None})


def test_workers_get_no_service_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TUREEN_API_TOKENS", "s3cret")
    monkeypatch.setenv("HF_HOME", "/cache")
    environment = worker_environment()
    assert "TUREEN_API_TOKENS" not in environment
    assert environment["HF_HOME"] == "/cache"


def test_discarding_a_job_removes_its_staging_and_candidates(tmp_path: Path) -> None:
    from merge_kernels.evaluated_merge import scratch_folder
    from merge_kernels.io.staging import StagingDir
    from service.jobs.worker import discard_staging

    output = tmp_path / "out"
    staging = StagingDir(output, "fingerprint")
    staging.prepare()
    candidates = scratch_folder(output) / "candidate-0001"
    candidates.mkdir(parents=True)
    (candidates / "model.safetensors").write_bytes(b"partial")
    discard_staging(output)
    assert list(tmp_path.iterdir()) == []
