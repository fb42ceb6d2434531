"""The Ray executor with Hub inputs and outputs, against the Hub stand-in on loopback.

One two-node cluster for the module, each node with its own Hugging Face cache (as separate
machines have): a task fetches only the weight files its shards' tensors live in, into its
node's cache, and the output is byte-identical to a local merge's.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import ray
from ray.cluster_utils import Cluster

from merge_kernels.executors.ray_cluster import RayExecutor
from merge_kernels.recipe import parse_recipe
from merge_kernels.runner import MergeOptions, run_merge
from merge_kernels.synthetic import LlamaShape, write_checkpoint
from tests.hub_server.fake_hub import FakeHub, use_fake_hub

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

SHAPE = LlamaShape(hidden_size=32, intermediate_size=64, num_hidden_layers=3, vocab_size=96)
INPUT_SHARD_BYTES = 15_000  # several weight files per input...
OUTPUT_SHARD_BYTES = 12_000  # ...and a dozen output shards, each from a few of them
REPOS = ("tiny-org/base", "tiny-org/ft1", "tiny-org/ft2")
TOKEN = "hf_writer_token"
TIES = {
    "merge_method": "ties",
    "base_model": REPOS[0],
    "models": [
        {"model": repo, "parameters": {"weight": 1.0, "density": 0.4}} for repo in REPOS[1:]
    ],
    "dtype": "float32",
}


@pytest.fixture(scope="module")
def hub(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FakeHub]:
    root = tmp_path_factory.mktemp("hub-models")
    server = FakeHub({TOKEN: ["tiny-org", "alice"]}).start()
    for index, repo in enumerate(REPOS):
        folder = root / repo.split("/")[1]
        write_checkpoint(
            folder,
            SHAPE,
            seed=index,
            base_seed=None if index == 0 else 0,
            delta_scale=0.05,
            max_shard_bytes=INPUT_SHARD_BYTES,
        )
        server.commit_folder(repo, folder)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def cluster(hub: FakeHub, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Path]]:
    """Two nodes, each with a Hugging Face cache of its own; the driver's is a third one."""
    homes = {name: tmp_path_factory.mktemp(f"hf-{name}") for name in ("driver", "head", "worker")}
    with pytest.MonkeyPatch.context() as patch:
        use_fake_hub(hub, patch, homes["head"])
        patch.setenv("HF_TOKEN", TOKEN)  # the nodes' own token, as a cluster is set up
        started = Cluster(
            initialize_head=True,
            head_node_args={
                "num_cpus": 2,
                "object_store_memory": 80 * 2**20,
                "include_dashboard": False,
            },
        )
        for name in ("HF_HOME", "HF_HUB_CACHE"):  # the worker node starts with its own
            value = os.environ[name].replace(str(homes["head"]), str(homes["worker"]))
            patch.setenv(name, value)
        (homes["worker"] / "hub").mkdir()
        started.add_node(num_cpus=2, object_store_memory=80 * 2**20)
        use_fake_hub(hub, patch, homes["driver"])
        ray.init(address=started.address)
        started.wait_for_nodes()
        try:
            yield homes
        finally:
            ray.shutdown()
            started.shutdown()


def digests(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def weight_downloads(hub: FakeHub) -> Counter[tuple[str, str]]:
    """``(repository, file)`` of each weight file served whole (not a header's range)."""
    found: Counter[tuple[str, str]] = Counter()
    for request in hub.requests:
        if request.method == "GET" and request.range is None and "/resolve/" in request.path:
            repo, rest = request.path.strip("/").split("/resolve/")
            if rest.endswith(".safetensors"):
                found[(repo, rest.split("/", 1)[1])] += 1
    return found


def input_index(hub: FakeHub, repo: str) -> dict[str, str]:
    index = hub.file_bytes(repo, "main", "model.safetensors.index.json")
    weight_map: dict[str, str] = json.loads(index)["weight_map"]
    return weight_map


def merge(out: Path, executor: Any = "local") -> None:
    options = MergeOptions(max_shard_bytes=OUTPUT_SHARD_BYTES, executor=executor)
    run_merge(parse_recipe(TIES), out, options)


def test_tasks_fetch_only_the_files_their_shards_read(
    hub: FakeHub, cluster: dict[str, Path], tmp_path: Path
) -> None:
    merge(
        tmp_path / "local" / "merged"
    )  # the driver's cache now holds the inputs: it fetches none below
    hub.requests.clear()
    executor = RayExecutor(task_bytes=1)
    merge(tmp_path / "ray" / "merged", executor)
    assert digests(tmp_path / "ray" / "merged") == digests(tmp_path / "local" / "merged")
    assert len(list((tmp_path / "ray" / "merged").glob("*.safetensors"))) > 5

    # Every weight file served whole went to a task that reported it, once per node.
    fetched = [(r.node_id, repo, name) for r in executor.reports for repo, name, _ in r.fetched]
    assert Counter((repo, name) for _, repo, name in fetched) == weight_downloads(hub)
    assert len(set(fetched)) == len(fetched)
    # A task fetched only files holding tensors of its shards.
    output = json.loads((tmp_path / "ray" / "merged" / "model.safetensors.index.json").read_text())
    indexes = {repo: input_index(hub, repo) for repo in REPOS}
    for report in executor.reports:
        shards = {filename for filename, _ in report.shards}
        names = [n for n, shard in output["weight_map"].items() if shard in shards]
        needed = {(repo, indexes[repo][name]) for repo in REPOS for name in names}
        assert {(repo, name) for repo, name, _ in report.fetched} <= needed
    # Nodes fetched into their own caches, and neither fetched whole models.
    every = {(repo, name) for repo in REPOS for name in set(indexes[repo].values())}
    nodes = {node for node, _, _ in fetched}
    assert len(nodes) == 2
    for node in nodes:
        assert {(repo, name) for n, repo, name in fetched if n == node} < every
    sizes = {(repo, name): size for r in executor.reports for repo, name, size in r.fetched}
    for repo, name in sizes:
        assert sizes[(repo, name)] == len(hub.file_bytes(repo, "main", name))


def test_nodes_upload_the_shards_and_the_driver_makes_one_commit(
    hub: FakeHub, cluster: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from merge_kernels.executors.hub_upload import ShardUpload, load_uploads
    from service.hub import publish_folder
    from service.jobs.models import PublishOptions

    repo = "alice/merged-on-ray"
    out = tmp_path / "merged"
    monkeypatch.setenv("HF_TOKEN", TOKEN)  # the driver's; the nodes have their own
    hub.requests.clear()
    executor = RayExecutor(task_bytes=3 * OUTPUT_SHARD_BYTES, upload=ShardUpload(repo))
    merge(out, executor)
    shards = sorted(p.name for p in out.glob("*.safetensors"))
    uploaded = sorted(u.path_in_repo for r in executor.reports for u in r.uploads)
    assert uploaded == shards and len(shards) > 5
    assert len({r.node_id for r in executor.reports if r.uploads}) == 2
    assert sorted(load_uploads(out)) == shards
    puts = [r.path for r in hub.requests if r.method == "PUT" and r.path.startswith("/_lfs/")]
    assert len(puts) == len(shards)  # each shard once, from its node

    hub.requests.clear()
    commits_before = len(hub.repos[repo].commits)
    commit = publish_folder(out, PublishOptions(repo_id=repo), token=TOKEN)
    assert not [r for r in hub.requests if r.method == "PUT"]  # no bytes of any shard
    assert [r.method for r in hub.requests if "/commit/" in r.path] == ["POST"]
    assert len(hub.repos[repo].commits) == commits_before + 1
    published = hub.files_at(repo, commit.commit_sha)
    for path in out.iterdir():
        if not path.name.startswith("."):
            assert hub.file_bytes(repo, commit.commit_sha, path.name) == path.read_bytes()
    assert not any(name.startswith(".") for name in published if name != ".gitattributes")
