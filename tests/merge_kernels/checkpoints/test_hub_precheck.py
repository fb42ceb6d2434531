"""Hub inputs through the real huggingface_hub client and a Hub-compatible server on loopback.

Incompatible inputs fail from metadata (config and safetensors headers read by HTTP range)
before any weights are downloaded; compatible ones download only what the merge needs into
the standard cache, pinned to the resolved commit, which the output's card records.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from merge_kernels.errors import CheckpointNotFoundError, IncompatibleCheckpointsError
from merge_kernels.recipe import parse_recipe
from merge_kernels.runner import MergeOptions, close_inputs, plan_merge, run_merge
from merge_kernels.synthetic import LlamaShape, write_checkpoint
from tests.hub_server.fake_hub import FakeHub, use_fake_hub
from tests.merge_kernels.checkpoints.tiny_models import build_hub_cache

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

SHAPE = LlamaShape(hidden_size=32, intermediate_size=64, num_hidden_layers=2, vocab_size=96)
TOKEN = "hf_reader_token"


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("precheck-models")
    write_checkpoint(root / "base", SHAPE, seed=0)
    write_checkpoint(root / "ft1", SHAPE, seed=1, base_seed=0, max_shard_bytes=20_000)
    write_checkpoint(root / "odd", replace(SHAPE, vocab_size=80), seed=2)
    (root / "ft1" / "README.md").write_text("# not needed by a merge\n")
    (root / "ft1" / "pytorch_model.bin").write_bytes(b"not needed either")
    return root


@pytest.fixture(scope="module")
def hub(models: Path) -> Iterator[FakeHub]:
    server = FakeHub({TOKEN: ["tiny-org"]}).start()
    server.commit_folder("tiny-org/ft1", models / "ft1")
    server.commit_folder("tiny-org/odd", models / "odd")
    server.create_repo("tiny-org/secret", private=True)
    server.commit_folder("tiny-org/secret", models / "ft1")
    yield server
    server.stop()


@pytest.fixture
def cache(hub: FakeHub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    hub.requests.clear()
    return use_fake_hub(hub, monkeypatch, tmp_path / "hf-home")


def _recipe(models: Path, second: str) -> object:
    return parse_recipe(
        {
            "merge_method": "task_arithmetic",
            "base_model": str(models / "base"),
            "models": [{"model": second, "parameters": {"weight": 0.5}}],
        }
    )


def _weights_downloaded(hub: FakeHub) -> list[str]:
    """Paths of weight files fetched whole (not a header range)."""
    return [
        r.path
        for r in hub.requests
        if r.method == "GET" and r.path.endswith(".safetensors") and r.range is None
    ]


def test_incompatible_hub_input_fails_from_metadata_before_downloading(
    hub: FakeHub, cache: Path, models: Path
) -> None:
    with pytest.raises(IncompatibleCheckpointsError) as info:
        plan_merge(_recipe(models, "tiny-org/odd"), MergeOptions())  # type: ignore[arg-type]
    problems = info.value.problems
    assert any("vocab_size=80" in p and "tiny-org/odd" in p for p in problems), problems
    assert any("model.embed_tokens.weight" in p and "[80, 32]" in p for p in problems)
    # The headers were read with range requests; no weights were fetched or cached.
    assert any(r.range is not None for r in hub.requests if r.path.endswith(".safetensors"))
    assert _weights_downloaded(hub) == []
    assert not [p for p in cache.rglob("*.safetensors")]


def test_compatible_hub_input_downloads_only_what_the_merge_needs(
    hub: FakeHub, cache: Path, models: Path, tmp_path: Path
) -> None:
    commit = hub.files_at("tiny-org/ft1", "main")
    head = hub.repos["tiny-org/ft1"].branches["main"]
    result = run_merge(_recipe(models, "tiny-org/ft1@main"), tmp_path / "from-hub")  # type: ignore[arg-type]
    local = run_merge(_recipe(models, str(models / "ft1")), tmp_path / "local")  # type: ignore[arg-type]
    got = load_file(result.out_dir / "model.safetensors")
    expected = load_file(local.out_dir / "model.safetensors")
    assert got.keys() == expected.keys()
    assert all(torch.equal(got[name], expected[name]) for name in expected)
    # Only the merge's files, in the standard cache layout, pinned to the resolved commit.
    snapshot = cache / "models--tiny-org--ft1" / "snapshots" / head
    shards = sorted(name for name in commit if name.startswith("model-"))
    assert len(shards) > 1
    assert sorted(p.name for p in snapshot.iterdir()) == sorted(
        ["config.json", "model.safetensors.index.json", *shards]
    )
    assert (cache / "models--tiny-org--ft1" / "refs" / "main").read_text() == head
    # The provenance pins the commit, and the card lists the repository as a base model.
    hub_input = next(p for p in result.provenance if p["reference"] == "tiny-org/ft1@main")
    assert hub_input["revision"] == head
    card = (result.out_dir / "README.md").read_text()
    assert head in card
    assert "- tiny-org/ft1\n" in card.split("---")[1]


def test_missing_revision_and_private_repository_fail_fast(
    hub: FakeHub, cache: Path, models: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with pytest.raises(CheckpointNotFoundError) as info:
        plan_merge(_recipe(models, "tiny-org/ft1@no-such-branch"), MergeOptions())  # type: ignore[arg-type]
    assert info.value.details["reason"] == "revision_not_found"
    with pytest.raises(CheckpointNotFoundError) as info:
        plan_merge(_recipe(models, "tiny-org/secret"), MergeOptions())  # type: ignore[arg-type]
    assert info.value.details["reason"] == "repo_not_found"
    assert "HF_TOKEN" in info.value.message
    # With a token of the namespace, the private repository resolves.
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    plan, inputs = plan_merge(_recipe(models, "tiny-org/secret"), MergeOptions())  # type: ignore[arg-type]
    close_inputs(inputs)
    assert plan.problems == []
    assert all(r.authorization == f"Bearer {TOKEN}" for r in hub.requests[-3:])


def test_offline_cache_is_used_without_contacting_the_hub(
    hub: FakeHub, cache: Path, models: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from huggingface_hub import constants

    commit = build_hub_cache(cache, "tiny-org/cached-only", models / "odd", revision="v1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    hub.requests.clear()
    # Offline, the cached snapshot is planned as usual (its problems found from its headers).
    plan, inputs = plan_merge(_recipe(models, "tiny-org/cached-only@v1"), MergeOptions())  # type: ignore[arg-type]
    close_inputs(inputs)
    assert any("vocab_size=80" in problem for problem in plan.problems)
    recipe = parse_recipe(
        {
            "merge_method": "linear",
            "models": [{"model": "tiny-org/cached-only@v1"}, {"model": str(models / "odd")}],
        }
    )
    plan, inputs = plan_merge(recipe, MergeOptions())
    try:
        assert plan.problems == []
        assert inputs[0].checkpoint.revision == commit
    finally:
        close_inputs(inputs)
    assert hub.requests == []
