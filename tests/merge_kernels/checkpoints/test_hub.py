"""Hub references resolved through a fake, layout-correct Hugging Face cache (no network)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any, ClassVar

import httpx2
import huggingface_hub
import pytest
import torch
from huggingface_hub import constants
from huggingface_hub import errors as hub_errors
from safetensors import safe_open

from merge_kernels.checkpoints import LocalCheckpoint, LoraCheckpoint, open_checkpoint
from merge_kernels.checkpoints.hub import choose_files, resolve_snapshot
from merge_kernels.checkpoints.reference import HubRef
from merge_kernels.errors import CheckpointNotFoundError, UnsafeCheckpointError
from tests.merge_kernels.checkpoints.tiny_models import (
    build_hub_cache,
    make_lora_adapter,
    save_tiny_llama,
)

pytestmark = [
    pytest.mark.filterwarnings("ignore::UserWarning"),
    pytest.mark.filterwarnings("ignore::FutureWarning"),
]

REPO = "tiny-org/tiny-llama"
ADAPTER_REPO = "tiny-org/tiny-lora"


@pytest.fixture(scope="module")
def sources(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("hub-sources")
    model = save_tiny_llama(root / "model", max_shard_size="40KB")
    merged = make_lora_adapter(
        model, root / "adapter", r=2, lora_alpha=4, target_modules=["q_proj", "down_proj"]
    )
    return {"root": root, "merged": merged}


@pytest.fixture
def offline_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    cache = tmp_path / "hf-home" / "hub"
    cache.mkdir(parents=True)
    # huggingface_hub reads its environment once at import; set both the variables and the
    # constants it derived from them.
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return cache


def test_offline_resolution_records_the_commit(
    sources: dict[str, Any], offline_cache: Path
) -> None:
    commit = build_hub_cache(offline_cache, REPO, sources["root"] / "model")
    with open_checkpoint(REPO) as ckpt:
        assert isinstance(ckpt, LocalCheckpoint)
        assert ckpt.revision == commit
        assert ckpt.folder == offline_cache / "models--tiny-org--tiny-llama" / "snapshots" / commit
        assert ckpt.display_name == REPO
        assert ckpt.config["model_type"] == "llama"
        assert len(ckpt.files()) > 1
        for path in ckpt.files():
            with safe_open(path, "pt") as f:
                for name in f.keys():  # noqa: SIM118 - safe_open has no __iter__
                    assert torch.equal(ckpt.read(name), f.get_tensor(name))


def test_offline_by_tag_and_by_commit(sources: dict[str, Any], offline_cache: Path) -> None:
    commit = build_hub_cache(offline_cache, REPO, sources["root"] / "model", revision="v1")
    with open_checkpoint(f"{REPO}@v1") as ckpt:
        assert ckpt.revision == commit
    with open_checkpoint(f"{REPO}@{commit}") as ckpt:
        assert ckpt.revision == commit
        assert ckpt.display_name == f"{REPO}@{commit}"


def test_offline_miss_says_what_to_do(offline_cache: Path) -> None:
    with pytest.raises(CheckpointNotFoundError, match="HF_HUB_OFFLINE") as info:
        open_checkpoint("tiny-org/never-downloaded@dev")
    assert info.value.details["reason"] == "offline_not_cached"
    assert "hf download tiny-org/never-downloaded --revision dev" in info.value.message


def test_offline_hub_lora(sources: dict[str, Any], offline_cache: Path) -> None:
    base_commit = build_hub_cache(offline_cache, REPO, sources["root"] / "model")
    adapter_commit = build_hub_cache(offline_cache, ADAPTER_REPO, sources["root"] / "adapter")
    with open_checkpoint(f"{REPO}+{ADAPTER_REPO}", allowed_roots=[Path("/nonexistent")]) as ckpt:
        assert isinstance(ckpt, LoraCheckpoint)
        assert ckpt.revision == base_commit
        assert ckpt.adapter_revision == adapter_commit
        expected = sources["merged"]
        for name in ckpt.adapted_tensors():
            got, want = ckpt.read(name), expected[name]
            assert (got - want).abs().max() <= 1e-6 * want.abs().max()


def test_offline_snapshot_with_only_pickle_is_refused(tmp_path: Path, offline_cache: Path) -> None:
    source = tmp_path / "pickle-src"
    source.mkdir()
    torch.save({"w": torch.ones(2, 2)}, source / "pytorch_model.bin")
    build_hub_cache(offline_cache, "tiny-org/pickled", source)
    with pytest.raises(UnsafeCheckpointError):
        open_checkpoint("tiny-org/pickled")
    with open_checkpoint("tiny-org/pickled", allow_pickle=True) as ckpt:
        assert torch.equal(ckpt.read("w"), torch.ones(2, 2))


@pytest.mark.parametrize(
    ("files", "kind", "allow_pickle", "expected"),
    [
        (
            [
                "config.json",
                "model.safetensors",
                "pytorch_model.bin",
                "README.md",
                "onnx/model.safetensors",
            ],
            "model",
            True,
            ["config.json", "model.safetensors"],
        ),
        (
            [
                "config.json",
                "tokenizer.json",
                "consolidated.safetensors",
                "model-00001-of-00002.safetensors",
                "model-00002-of-00002.safetensors",
                "model.safetensors.index.json",
                "pytorch_model.bin.index.json",
            ],
            "model",
            False,
            ["config.json", "tokenizer.json", "model.safetensors.index.json"],
        ),
        (["config.json", "pytorch_model.bin"], "model", True, ["config.json", "pytorch_model.bin"]),
        (
            ["adapter_config.json", "adapter_model.safetensors", "adapter_model.bin", "README.md"],
            "adapter",
            False,
            ["adapter_config.json", "adapter_model.safetensors"],
        ),
    ],
)
def test_choose_files(files: list[str], kind: Any, allow_pickle: bool, expected: list[str]) -> None:
    ref = HubRef(repo="org/x")
    assert choose_files(files, kind, allow_pickle=allow_pickle, ref=ref) == expected


def test_choose_files_refusals() -> None:
    ref = HubRef(repo="org/x")
    with pytest.raises(UnsafeCheckpointError):
        choose_files(["config.json", "pytorch_model.bin"], "model", allow_pickle=False, ref=ref)
    with pytest.raises(CheckpointNotFoundError, match="PEFT adapter"):
        choose_files(
            ["adapter_config.json", "adapter_model.safetensors"],
            "model",
            allow_pickle=False,
            ref=ref,
        )
    with pytest.raises(CheckpointNotFoundError, match="not a PEFT adapter"):
        choose_files(["config.json", "model.safetensors"], "adapter", allow_pickle=False, ref=ref)


class _FakeApi:
    files: ClassVar[list[str]] = []
    error: Exception | None = None

    def model_info(self, repo_id: str, revision: str | None = None) -> Any:
        if self.error is not None:
            raise self.error
        return SimpleNamespace(siblings=[SimpleNamespace(rfilename=f) for f in self.files])


def test_online_downloads_only_what_is_needed(
    sources: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = tmp_path / "cache"
    commit = build_hub_cache(cache, REPO, sources["root"] / "model")
    snapshot = cache / "models--tiny-org--tiny-llama" / "snapshots" / commit
    calls: list[dict[str, Any]] = []

    def fake_snapshot_download(repo_id: str, **kwargs: Any) -> str:
        calls.append({"repo_id": repo_id, **kwargs})
        return str(snapshot)

    _FakeApi.files = [*(p.name for p in snapshot.iterdir()), "pytorch_model.bin", "README.md"]
    _FakeApi.error = None
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub, "HfApi", _FakeApi)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    resolved = resolve_snapshot(HubRef(repo=REPO, revision="main"))
    assert resolved.commit == commit
    assert resolved.folder == snapshot
    first, second = calls
    assert first["repo_id"] == REPO
    assert first["revision"] == "main"
    assert "pytorch_model.bin" not in first["allow_patterns"]
    assert "README.md" not in first["allow_patterns"]
    assert "config.json" in first["allow_patterns"]
    assert "model.safetensors.index.json" in first["allow_patterns"]
    # The shards come second, exactly those the index names, pinned to the commit.
    assert second["revision"] == commit
    assert second["allow_patterns"] == sorted(p.name for p in snapshot.glob("model-*.safetensors"))


def _http_error(cls: type[Exception], status: int) -> Exception:
    response = httpx2.Response(
        status, request=httpx2.Request("GET", "https://huggingface.co/api/models/x")
    )
    return cls("hub says no", response=response)  # type: ignore[call-arg]


@pytest.mark.parametrize(
    ("error", "reason", "match"),
    [
        (_http_error(hub_errors.GatedRepoError, 403), "gated", "accept its terms"),
        (_http_error(hub_errors.RepositoryNotFoundError, 404), "repo_not_found", "HF_TOKEN"),
        (_http_error(hub_errors.RevisionNotFoundError, 404), "revision_not_found", "'nope'"),
        (_http_error(hub_errors.HfHubHTTPError, 401), "unauthorized", "HF_TOKEN"),
    ],
)
def test_online_errors_are_translated(
    monkeypatch: pytest.MonkeyPatch, error: Exception, reason: str, match: str
) -> None:
    _FakeApi.error = error
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub, "HfApi", _FakeApi)
    with pytest.raises(CheckpointNotFoundError, match=match) as info:
        resolve_snapshot(HubRef(repo="org/x", revision="nope"))
    assert info.value.details["reason"] == reason
    _FakeApi.error = None


def test_unreachable_hub_falls_back_to_cache(
    sources: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = tmp_path / "cache"
    commit = build_hub_cache(cache, REPO, sources["root"] / "model")
    _FakeApi.error = httpx2.ConnectError("no route to host")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub, "HfApi", _FakeApi)
    resolved = resolve_snapshot(HubRef(repo=REPO), cache_dir=cache)
    assert resolved.commit == commit
    with pytest.raises(CheckpointNotFoundError) as info:
        resolve_snapshot(HubRef(repo="tiny-org/absent"), cache_dir=cache)
    assert info.value.details["reason"] == "unreachable"
    _FakeApi.error = None
