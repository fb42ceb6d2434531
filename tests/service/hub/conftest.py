"""Fixtures for publishing tests: a Hub-compatible server on loopback and small merges."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from merge_kernels.recipe import parse_recipe
from merge_kernels.runner import run_merge
from merge_kernels.synthetic import LlamaShape, write_checkpoint
from tests.hub_server.fake_hub import FakeHub, use_fake_hub

SHAPE = LlamaShape(hidden_size=32, intermediate_size=64, num_hidden_layers=2, vocab_size=96)
WRITE_TOKEN = "hf_write_token_7d1e0c93a5b24f68"  # may write to the namespace "alice"
OTHER_TOKEN = "hf_other_token_0b6f2d4e8c1a3957"  # may write to "bob" only


@pytest.fixture(scope="session")
def source_models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny base and two fine-tunes of it."""
    root = tmp_path_factory.mktemp("publish-models")
    write_checkpoint(root / "base", SHAPE, seed=0)
    for index in (1, 2):
        write_checkpoint(root / f"ft{index}", SHAPE, seed=index, base_seed=0, delta_scale=0.05)
    return root


def ties_document(root: Path) -> dict[str, object]:
    """A TIES recipe over ``root``'s base and fine-tunes, absolute paths."""
    return {
        "merge_method": "ties",
        "base_model": str(root / "base"),
        "models": [
            {"model": str(root / f"ft{i}"), "parameters": {"weight": 1.0, "density": 0.5}}
            for i in (1, 2)
        ],
    }


@pytest.fixture(scope="session")
def merged(source_models: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The output folder of a TIES merge, sharded, as the engine writes it."""
    out = tmp_path_factory.mktemp("merged") / "tiny-ties"
    run_merge(parse_recipe(ties_document(source_models)), out)
    return out


@pytest.fixture(scope="session")
def hub_server() -> Iterator[FakeHub]:
    """The Hub stand-in, for the whole session."""
    server = FakeHub({WRITE_TOKEN: ["alice"], OTHER_TOKEN: ["bob"]}).start()
    yield server
    server.stop()


@pytest.fixture
def hub(hub_server: FakeHub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> FakeHub:
    """The Hub stand-in, with huggingface_hub pointed at it and an empty cache."""
    hub_server.requests.clear()
    hub_server.fail_commits = 0
    use_fake_hub(hub_server, monkeypatch, tmp_path / "hf-home")
    return hub_server
