"""The service with ``executor = "ray"``: a job merged on a real two-node Ray cluster."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path

import pytest
import ray
from ray.cluster_utils import Cluster

from merge_kernels.runner import run_merge
from service.jobs.manager import JobManager
from service.jobs.models import JobStatus, OutputOptions
from tests.service.jobs.conftest import SHARD_BYTES, ties_recipe, wait_finished

OBJECT_STORE = 80 * 2**20


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    started = Cluster(
        initialize_head=True,
        head_node_args={
            "num_cpus": 1,
            "object_store_memory": OBJECT_STORE,
            "include_dashboard": False,
        },
    )
    started.add_node(num_cpus=1, memory=2 * 2**30, object_store_memory=OBJECT_STORE)
    started.wait_for_nodes()
    yield started
    if ray.is_initialized():
        ray.shutdown()
    started.shutdown()


def test_a_job_runs_on_the_cluster_to_the_local_output(
    cluster: Cluster, make_manager: Callable[..., JobManager], large_models: Path, tmp_path: Path
) -> None:
    manager = make_manager(executor="ray", ray_address=cluster.address)
    manager.start()
    recipe = ties_recipe(large_models)
    output = OutputOptions(name="on-ray", shard_size=SHARD_BYTES)
    job, _ = manager.submit(recipe, output)
    done = wait_finished(manager, job.id, timeout=120)
    assert done.status is JobStatus.SUCCEEDED, done.error
    assert "on a Ray cluster of 2 nodes" in manager.log(job.id)

    local = replace(manager.engine_options(output), executor="local")
    reference = run_merge(recipe, tmp_path / "reference" / "on-ray", local)
    out = manager.settings.outputs_dir / "on-ray"
    assert len([f for f in reference.files if f.endswith(".safetensors")]) > 5
    assert sorted(done.files) == sorted(reference.files)
    for name in reference.files:
        assert (out / name).read_bytes() == (reference.out_dir / name).read_bytes(), name
