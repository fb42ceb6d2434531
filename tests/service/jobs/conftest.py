"""Fixtures for the job tests: real checkpoints, settings in a temporary data dir, managers."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from merge_kernels.recipe import Recipe, parse_recipe
from merge_kernels.synthetic import LlamaShape, write_checkpoint
from service.jobs.manager import JobManager
from service.jobs.models import Job
from service.jobs.sqlite_store import SqliteJobStore
from service.settings import ServiceSettings, load_settings

SMALL = LlamaShape(hidden_size=32, intermediate_size=64, num_hidden_layers=2, vocab_size=96)
# About 15 MB in float32: with 1 MB shards a TIES merge of two fine-tunes takes seconds and
# writes a dozen shards, long enough to cancel, kill or interrupt it part-way.
LARGE = LlamaShape(
    hidden_size=256,
    intermediate_size=768,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=4096,
)
SHARD_BYTES = 1_000_000


def _write_models(root: Path, shape: LlamaShape, fine_tunes: int) -> Path:
    write_checkpoint(root / "base", shape, seed=0)
    for index in range(1, fine_tunes + 1):
        write_checkpoint(root / f"ft{index}", shape, seed=index, base_seed=0, delta_scale=0.05)
    return root


@pytest.fixture(scope="session")
def small_models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small base and three fine-tunes of it."""
    return _write_models(tmp_path_factory.mktemp("small"), SMALL, 3)


@pytest.fixture(scope="session")
def large_models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A base of about 15 MB and two fine-tunes of it."""
    return _write_models(tmp_path_factory.mktemp("large"), LARGE, 2)


def ties_recipe(models: Path, fine_tunes: int = 2, *, method: str = "ties") -> Recipe:
    """A TIES (or other task-vector method) recipe over ``ft1..ftN`` of ``models``."""
    return parse_recipe(
        {
            "merge_method": method,
            "base_model": str(models / "base"),
            "parameters": {"density": 0.3} if method == "ties" else {"lambda": 0.8},
            "models": [{"model": str(models / f"ft{i}")} for i in range(1, fine_tunes + 1)],
        }
    )


def wait_for(condition: Callable[[], Any], timeout: float = 30.0, interval: float = 0.05) -> Any:
    """Poll ``condition`` until it returns something truthy; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout} s")
        time.sleep(interval)


def wait_finished(manager: JobManager, job_id: str, timeout: float = 60.0) -> Job:
    """Wait until the job reaches a final state and return it."""
    job: Job = wait_for(
        lambda: (job := manager.get(job_id)).status.finished and job, timeout=timeout
    )
    return job


@pytest.fixture
def make_settings(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, small_models: Path
) -> Callable[..., ServiceSettings]:
    """Settings with a data dir in ``tmp_path``; the test checkpoints' folders are allowed."""
    for name in [
        "TUREEN_CONFIG",
        "TUREEN_API_TOKENS",
        "TUREEN_ALLOW_ROOTS",
        "TUREEN_WORKERS",
        "TUREEN_DATA_DIR",
        "TUREEN_MEMORY_BUDGET_BYTES",
        "TUREEN_DEVICE",
    ]:
        monkeypatch.delenv(name, raising=False)

    def make(**overrides: Any) -> ServiceSettings:
        overrides.setdefault("data_dir", tmp_path / "data")
        overrides.setdefault("allow_roots", [small_models.parent])
        return load_settings(None, **overrides)

    return make


@pytest.fixture
def make_manager(
    make_settings: Callable[..., ServiceSettings],
) -> Iterator[Callable[..., JobManager]]:
    """Builds managers (not started) on the settings' database; stops them all afterwards."""
    managers: list[JobManager] = []

    def make(**overrides: Any) -> JobManager:
        settings = make_settings(**overrides)
        manager = JobManager(SqliteJobStore(settings.database_path), settings)
        managers.append(manager)
        return manager

    yield make
    for manager in managers:
        manager.stop(timeout=5.0)
        manager.store.close()
