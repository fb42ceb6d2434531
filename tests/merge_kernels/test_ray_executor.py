"""The Ray executor on a real multi-node Ray cluster, compared byte for byte with local runs.

One cluster per module (``ray.cluster_utils.Cluster``: a head and worker nodes, each with
its own CPUs and memory resource, all on this machine); tiny checkpoints written in many
small shards, so that every merge is a dozen tasks.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import ray
import torch
from ray.cluster_utils import Cluster
from safetensors.torch import load_file, save_file

from merge_kernels.errors import MergeCancelledError
from merge_kernels.executors import ExecutorUnavailableError, executor_for
from merge_kernels.executors.ray_cluster import RayExecutor, ShardGroup, shard_memory
from merge_kernels.executors.ray_tasks import TaskReport
from merge_kernels.recipe import parse_recipe
from merge_kernels.registry import methods
from merge_kernels.runner import MergeOptions, Progress, close_inputs, plan_merge, run_merge
from merge_kernels.synthetic import LlamaShape, write_checkpoint
from tests.merge_kernels.methods.test_properties import VALID

SHAPE = LlamaShape(hidden_size=32, intermediate_size=64, num_hidden_layers=2, vocab_size=96)
SHARD_BYTES = 12_000  # a dozen shards of these models
NODE_MEMORY = 2 * 2**30
OBJECT_STORE = 80 * 2**20
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("models")
    write_checkpoint(root / "base", SHAPE, seed=0)
    for index in (1, 2, 3):
        write_checkpoint(root / f"ft{index}", SHAPE, seed=index, base_seed=0, delta_scale=0.05)
    # Fine-tunes whose task vectors take five values only: a model-wide trim's threshold
    # then falls among many tied entries, which exact_k keeps in the model's flat order.
    base = load_file(root / "base" / "model.safetensors")
    for index in (1, 2):
        generator = torch.Generator().manual_seed(index)
        folder = root / f"steps{index}"
        folder.mkdir()
        save_file(
            {
                name: tensor + torch.randint(-2, 3, tensor.shape, generator=generator) * 0.25
                for name, tensor in base.items()
            },
            folder / "model.safetensors",
        )
        (folder / "config.json").write_text((root / "base" / "config.json").read_text())
    return root


def method_recipe(name: str) -> dict[str, Any]:
    spec = next(spec for spec in methods() if spec.name == name)
    method_params, model_params = VALID[name]
    count = spec.max_models or 3
    document: dict[str, Any] = {
        "merge_method": name,
        "models": [{"model": f"ft{i}", "parameters": model_params} for i in range(1, count + 1)],
        "parameters": method_params,
        "seed": 11,
    }
    if spec.needs_base or spec.optional_base:
        document["base_model"] = "base"
    return document


TIES = method_recipe("ties")
MODEL_WIDE = {
    "merge_method": "ties",
    "base_model": "base",
    "parameters": {"density": 0.3, "trim_scope": "model", "trim_ties": "exact_k"},
    "models": [{"model": "steps1"}, {"model": "steps2"}],
}


def task_memory(models: Path) -> int:
    """The memory resource the largest task of a TIES merge of the models declares."""
    plan, inputs = plan_merge(
        parse_recipe(TIES), MergeOptions(base_dir=models, max_shard_bytes=SHARD_BYTES)
    )
    try:
        return max(shard_memory(plan, shard) for shard in plan.shards)
    finally:
        close_inputs(inputs)


@pytest.fixture(scope="module")
def cluster(models: Path) -> Iterator[Cluster]:
    # The head has four CPUs but memory for two TIES tasks only (and a resource of its own,
    # "roomy", to send tasks there); a worker node with one CPU joins it. A lost node is
    # declared dead after a second rather than the default half minute.
    started = Cluster(
        initialize_head=True,
        head_node_args={
            "num_cpus": 4,
            "memory": int(2.5 * task_memory(models)),
            "resources": {"roomy": 4},
            "object_store_memory": OBJECT_STORE,
            "include_dashboard": False,
            "_system_config": {
                "health_check_initial_delay_ms": 0,
                "health_check_period_ms": 250,
                "health_check_timeout_ms": 250,
                "health_check_failure_threshold": 4,
            },
        },
    )
    started.add_node(num_cpus=1, memory=NODE_MEMORY, object_store_memory=OBJECT_STORE)
    ray.init(address=started.address)
    started.wait_for_nodes()
    yield started
    ray.shutdown()
    started.shutdown()


def digests(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def merged(
    models: Path, document: dict[str, Any], out: Path, executor: object = "local", **options: Any
) -> Any:
    settings = MergeOptions(
        base_dir=models,
        max_shard_bytes=SHARD_BYTES,
        executor=executor,  # type: ignore[arg-type]
        **options,
    )
    return run_merge(parse_recipe(document), out, settings)


def assert_same_output(local: Path, distributed: Path) -> None:
    expected = digests(local)
    assert len([name for name in expected if name.endswith(".safetensors")]) > 5
    assert digests(distributed) == expected


def assert_every_shard_reported(executor: RayExecutor, out: Path) -> None:
    written = [filename for report in executor.reports for filename, _ in report.shards]
    assert sorted(written) == sorted(p.name for p in out.glob("*.safetensors"))


@pytest.mark.parametrize(
    "method", sorted(spec.name for spec in methods() if not spec.needs_evaluation)
)
def test_every_method_is_byte_identical_to_the_local_executor(
    cluster: Cluster, models: Path, tmp_path: Path, method: str
) -> None:
    document = method_recipe(method)
    merged(models, document, tmp_path / "local" / "merged")
    executor = RayExecutor(task_bytes=1)  # one task per shard
    result = merged(models, document, tmp_path / "ray" / "merged", executor)
    assert result.shards_resumed == 0
    assert_same_output(tmp_path / "local" / "merged", tmp_path / "ray" / "merged")
    assert_every_shard_reported(executor, tmp_path / "ray" / "merged")
    assert all(len(report.shards) == 1 for report in executor.reports)
    assert not list((tmp_path / "ray").glob(".*"))  # no staging folder or part left


def test_model_wide_trim_with_ties_and_row_chunks_is_byte_identical(
    cluster: Cluster, models: Path, tmp_path: Path
) -> None:
    options = {"chunk_elements": 700}
    merged(models, MODEL_WIDE, tmp_path / "local" / "merged", **options)
    executor = RayExecutor(task_bytes=1)
    merged(models, MODEL_WIDE, tmp_path / "ray" / "merged", executor, **options)
    assert_same_output(tmp_path / "local" / "merged", tmp_path / "ray" / "merged")


def test_small_shards_are_grouped_and_spread_over_the_nodes(
    cluster: Cluster, models: Path, tmp_path: Path
) -> None:
    merged(models, TIES, tmp_path / "local" / "merged")
    executor = RayExecutor(task_bytes=3 * SHARD_BYTES)
    merged(models, TIES, tmp_path / "ray" / "merged", executor)
    assert_same_output(tmp_path / "local" / "merged", tmp_path / "ray" / "merged")
    assert_every_shard_reported(executor, tmp_path / "ray" / "merged")
    assert max(len(report.shards) for report in executor.reports) > 1
    assert len({report.node_id for report in executor.reports}) == 2


def test_losing_a_node_mid_merge_still_ends_in_the_same_output(
    cluster: Cluster, models: Path, tmp_path: Path
) -> None:
    # The worker node (not the head): warm from the tests before, so it takes tasks at once.
    doomed = next(iter(cluster.worker_nodes))
    executor = RayExecutor(task_bytes=1, max_in_flight=6)
    removed_at: list[float] = []

    def remove_once_it_worked(progress: Progress) -> None:
        # Once the doomed node has finished a shard it has the next one queued or running:
        # the node goes, with whatever it was doing.
        if removed_at or not any(r.node_id == doomed.node_id for r in executor.reports):
            return
        cluster.remove_node(doomed, allow_graceful=False)
        removed_at.append(time.time())

    merged(models, TIES, tmp_path / "local" / "merged")
    out = tmp_path / "ray" / "merged"
    settings = MergeOptions(base_dir=models, max_shard_bytes=SHARD_BYTES, executor=executor)
    run_merge(parse_recipe(TIES), out, settings, progress=remove_once_it_worked)
    assert removed_at, "the doomed node never finished a shard"
    assert_same_output(tmp_path / "local" / "merged", out)
    assert_every_shard_reported(executor, out)
    # The shards the doomed node had not finished were merged again elsewhere.
    later = [report for report in executor.reports if report.finished > removed_at[0]]
    assert later and all(report.node_id != doomed.node_id for report in later)


_DRIVER = """
import os, signal, sys
from pathlib import Path
import ray
from merge_kernels.executors.ray_cluster import RayExecutor
from merge_kernels.recipe import parse_recipe
from merge_kernels.runner import MergeOptions, run_merge

models, out, address, shard_bytes = sys.argv[1:5]
ray.init(address=address)
# One task at a time, on the head alone: one worker process to start for this driver.
executor = RayExecutor(task_bytes=1, max_in_flight=1, resources={"roomy": 0.01})

def die_half_way(progress):
    if progress.phase == "merging" and len(executor.reports) >= 4:
        os.kill(os.getpid(), signal.SIGKILL)  # the driver dies, as a lost machine would

document = {document}
options = MergeOptions(base_dir=Path(models), max_shard_bytes=int(shard_bytes), executor=executor)
run_merge(parse_recipe(document), Path(out), options, progress=die_half_way)
"""


def test_a_run_after_the_driver_was_killed_resumes(
    cluster: Cluster, models: Path, tmp_path: Path
) -> None:
    out = tmp_path / "ray" / "merged"
    script = tmp_path / "driver.py"
    script.write_text(textwrap.dedent(_DRIVER).replace("{document}", repr(TIES)))
    environment = {**os.environ, "PYTHONPATH": str(REPO)}
    arguments = [str(models), str(out), cluster.address, str(SHARD_BYTES)]
    driver = subprocess.run(
        [sys.executable, str(script), *arguments], env=environment, capture_output=True, timeout=120
    )
    assert driver.returncode == -9, driver.stderr.decode()[-2000:]
    assert not out.exists()
    manifest = json.loads(
        (out.parent / ".merged.tureen-partial" / "tureen-manifest.json").read_text()
    )
    recorded = len(manifest["shards"])
    assert recorded >= 4

    executor = RayExecutor(task_bytes=1)
    result = merged(models, TIES, out, executor)
    merged(models, TIES, tmp_path / "local" / "merged")
    assert result.shards_resumed == recorded
    assert len(executor.reports) == len(list(out.glob("*.safetensors"))) - recorded
    assert_same_output(tmp_path / "local" / "merged", out)


def test_cancelling_stops_the_tasks_and_leaves_nothing(
    cluster: Cluster, models: Path, tmp_path: Path
) -> None:
    executor = RayExecutor(task_bytes=1, max_in_flight=2)
    out = tmp_path / "cancelled"
    settings = MergeOptions(base_dir=models, max_shard_bytes=SHARD_BYTES, executor=executor)
    with pytest.raises(MergeCancelledError):
        run_merge(parse_recipe(TIES), out, settings, should_cancel=lambda: bool(executor.reports))
    assert 1 <= len(executor.reports) < 12
    assert not out.exists()
    assert not list(tmp_path.glob(".*"))


def _most_at_once(reports: list[TaskReport]) -> int:
    events = sorted(
        [(report.started, 1) for report in reports] + [(report.finished, -1) for report in reports]
    )
    running = most = 0
    for _, change in events:
        running += change
        most = max(most, running)
    return most


def test_memory_resources_bound_the_tasks_a_node_runs_at_once(
    cluster: Cluster, models: Path, tmp_path: Path
) -> None:
    # The head offers four CPUs but declares memory for two tasks at a time.
    executor = RayExecutor(task_bytes=1, max_in_flight=12, resources={"roomy": 0.01})
    merged(models, TIES, tmp_path / "local" / "merged")
    merged(models, TIES, tmp_path / "ray" / "merged", executor)
    assert_same_output(tmp_path / "local" / "merged", tmp_path / "ray" / "merged")
    assert len({report.node_id for report in executor.reports}) == 1
    assert 1 <= _most_at_once(executor.reports) <= 2


def test_a_task_no_node_has_memory_for_is_refused(cluster: Cluster) -> None:
    # Ray would keep such a task waiting for ever: it is refused before it is submitted.
    largest = int(max(node["Resources"]["memory"] for node in ray.nodes() if node["Alive"]))
    executor = RayExecutor()
    executor._check_memory([ShardGroup(("model.safetensors",), 1, largest)])
    with pytest.raises(ExecutorUnavailableError, match=r"model\.safetensors needs about"):
        executor._check_memory([ShardGroup(("model.safetensors",), 1, largest + 2**30)])


def test_executor_names() -> None:
    assert executor_for(MergeOptions()).name == "local"
    assert executor_for(MergeOptions(executor="ray", ray_address="auto")).name == "ray"
    from merge_kernels.errors import RecipeError

    with pytest.raises(RecipeError, match="did you mean 'ray'"):
        executor_for(MergeOptions(executor="rey"))


def test_asking_for_ray_without_the_package_says_how_to_install_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)  # as if it were not installed
    with pytest.raises(ExecutorUnavailableError, match=r"pip install 'tureen\[ray\]'"):
        executor_for(MergeOptions(executor="ray"))
