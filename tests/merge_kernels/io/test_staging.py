"""StagingDir publishes output atomically and resumes only verified work of the same job."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from merge_kernels.io.checksum import file_checksum
from merge_kernels.io.shard_plan import OutputTensor, ShardSpec, index_json, plan_shards
from merge_kernels.io.shard_writer import ShardWriter
from merge_kernels.io.staging import (
    MANIFEST_NAME,
    StagingDir,
    write_bytes_atomic,
    write_json_atomic,
)

TENSORS = {f"layer{i}.weight": torch.full((4, 4), float(i)) for i in range(4)}  # 64 bytes each


def _plan() -> list[ShardSpec]:
    specs = [OutputTensor(n, "F32", tuple(t.shape)) for n, t in TENSORS.items()]
    return plan_shards(specs, 64)


def _write_shard(staging: StagingDir, spec: ShardSpec) -> str:
    with ShardWriter(staging.path, spec) as writer:
        for t in spec.tensors:
            writer.write(t.name, TENSORS[t.name])
        digest = writer.finish()
    staging.mark_shard_done(spec.filename, digest)
    return digest


def _run(out: Path, fingerprint: str = "fp1", *, crash_after: int | None = None) -> Path:
    """A miniature merge job; ``crash_after`` raises after that many shards."""
    specs = _plan()
    staging = StagingDir(out, fingerprint)
    done = staging.prepare()
    for i, spec in enumerate(specs):
        if crash_after is not None and i == crash_after:
            # Die in the middle of a shard, as a kill or a full disk would.
            writer = ShardWriter(staging.path, spec)
            writer.write(spec.tensors[0].name, TENSORS[spec.tensors[0].name])
            raise RuntimeError("simulated crash")
        if spec.filename not in done:
            _write_shard(staging, spec)
    write_json_atomic(staging.path / "model.safetensors.index.json", index_json(specs))
    return staging.commit()


def _load_all(out: Path) -> dict[str, torch.Tensor]:
    loaded: dict[str, torch.Tensor] = {}
    for path in sorted(out.glob("*.safetensors")):
        loaded.update(load_file(path))
    return loaded


def _manifest(staging: StagingDir) -> dict[str, object]:
    data = json.loads((staging.path / MANIFEST_NAME).read_text())
    assert isinstance(data, dict)
    return data


def test_staging_folder_is_a_hidden_sibling(tmp_path: Path) -> None:
    staging = StagingDir(tmp_path / "out", "fp")
    assert staging.path == tmp_path / ".out.tureen-partial"
    with pytest.raises(ValueError, match="needs a name"):
        StagingDir(Path("/"), "fp")
    with pytest.raises(ValueError, match="fingerprint"):
        StagingDir(tmp_path / "out", "")


def test_commit_publishes_and_leaves_no_staging(tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert _run(out) == out
    assert sorted(p.name for p in out.iterdir()) == [
        "model-00001-of-00004.safetensors",
        "model-00002-of-00004.safetensors",
        "model-00003-of-00004.safetensors",
        "model-00004-of-00004.safetensors",
        "model.safetensors.index.json",
    ]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    loaded = _load_all(out)
    assert all(torch.equal(loaded[n], t) for n, t in TENSORS.items())
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert index["metadata"] == {"total_size": 256}


def test_commit_refuses_existing_output_by_default(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("old")
    staging = StagingDir(out, "fp")
    staging.prepare()
    digest = _write_shard(staging, _plan()[0])
    with pytest.raises(FileExistsError, match="already exists"):
        staging.commit()
    assert (out / "keep.txt").read_text() == "old"
    # The finished work survives the refusal.
    assert StagingDir(out, "fp").prepare() == {_plan()[0].filename}
    assert _manifest(staging)["shards"] == {_plan()[0].filename: digest}


def test_commit_with_overwrite_replaces_output(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "stale.txt").write_text("old")
    staging = StagingDir(out, "fp")
    staging.prepare()
    spec = _plan()[0]
    _write_shard(staging, spec)
    assert staging.commit(overwrite=True) == out
    assert sorted(p.name for p in out.iterdir()) == [spec.filename]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_crash_midway_leaves_no_output_and_resume_finishes(tmp_path: Path) -> None:
    out = tmp_path / "out"
    with pytest.raises(RuntimeError, match="simulated crash"):
        _run(out, crash_after=2)
    assert not out.exists()
    specs = _plan()
    staging = StagingDir(out, "fp1")
    # The shard being written at the crash is present but unrecorded.
    assert (staging.path / specs[2].filename).exists()
    assert staging.prepare() == {specs[0].filename, specs[1].filename}
    assert not (staging.path / specs[2].filename).exists()
    assert set(staging.completed()) == {specs[0].filename, specs[1].filename}

    _run(out)
    loaded = _load_all(out)
    assert all(torch.equal(loaded[n], t) for n, t in TENSORS.items())
    assert not staging.path.exists()


def test_prepare_keeps_verified_shards_and_drops_corrupted(tmp_path: Path) -> None:
    out = tmp_path / "out"
    specs = _plan()
    staging = StagingDir(out, "fp")
    assert staging.prepare() == set()
    digests = {spec.filename: _write_shard(staging, spec) for spec in specs[:3]}
    assert staging.completed() == digests
    (staging.path / "leftover.tmp").write_bytes(b"partial")
    (staging.path / "subdir").mkdir()
    corrupted = staging.path / specs[1].filename
    data = bytearray(corrupted.read_bytes())
    data[-1] ^= 0xFF
    corrupted.write_bytes(bytes(data))
    (staging.path / specs[2].filename).unlink()

    resumed = StagingDir(out, "fp")
    assert resumed.prepare() == {specs[0].filename}
    assert sorted(p.name for p in staging.path.iterdir()) == sorted(
        [MANIFEST_NAME, specs[0].filename]
    )
    assert resumed.completed() == {specs[0].filename: digests[specs[0].filename]}
    assert _manifest(resumed) == {
        "version": 3,
        "fingerprint": "fp",
        "shards": {specs[0].filename: digests[specs[0].filename]},
    }


def test_different_fingerprint_wipes(tmp_path: Path) -> None:
    out = tmp_path / "out"
    first = StagingDir(out, "fp-a")
    first.prepare()
    _write_shard(first, _plan()[0])
    second = StagingDir(out, "fp-b")
    assert second.prepare() == set()
    assert [p.name for p in second.path.iterdir()] == [MANIFEST_NAME]
    assert _manifest(second)["fingerprint"] == "fp-b"


def test_unreadable_manifest_wipes(tmp_path: Path) -> None:
    out = tmp_path / "out"
    staging = StagingDir(out, "fp")
    staging.prepare()
    _write_shard(staging, _plan()[0])
    (staging.path / MANIFEST_NAME).write_text("{not json")
    assert StagingDir(out, "fp").prepare() == set()
    assert [p.name for p in staging.path.iterdir()] == [MANIFEST_NAME]


def test_recovers_from_crash_between_overwrite_renames(tmp_path: Path) -> None:
    out = tmp_path / "out"
    aside = tmp_path / ".out.tureen-old"
    aside.mkdir()
    (aside / "model.safetensors").write_text("previous result")
    # The crash happened after OUT was moved aside but before the new one arrived.
    StagingDir(out, "fp").prepare()
    assert (out / "model.safetensors").read_text() == "previous result"
    assert not aside.exists()
    # ... and after the new OUT arrived: the aside copy is just garbage.
    aside.mkdir()
    staging = StagingDir(out, "fp")
    staging.prepare()
    assert not aside.exists()
    assert out.exists()


def test_mark_shard_done_validates(tmp_path: Path) -> None:
    staging = StagingDir(tmp_path / "out", "fp")
    staging.prepare()
    with pytest.raises(ValueError, match="not a file name"):
        staging.mark_shard_done("../evil", "0" * 64)
    with pytest.raises(ValueError, match="not a file name"):
        staging.mark_shard_done(MANIFEST_NAME, "0" * 64)
    with pytest.raises(FileNotFoundError, match="write it first"):
        staging.mark_shard_done("model.safetensors", "0" * 64)


def test_commit_without_staging_folder(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nothing to commit"):
        StagingDir(tmp_path / "out", "fp").commit()


def test_discard_removes_everything(tmp_path: Path) -> None:
    staging = StagingDir(tmp_path / "out", "fp")
    staging.prepare()
    _write_shard(staging, _plan()[0])
    staging.discard()
    staging.discard()
    assert list(tmp_path.iterdir()) == []
    assert staging.completed() == {}


def test_write_json_atomic(tmp_path: Path) -> None:
    path = tmp_path / "config.json"
    write_json_atomic(path, {"b": 1, "a": ["ü"]}, sort_keys=True)
    assert path.read_text(encoding="utf-8") == '{\n  "a": [\n    "ü"\n  ],\n  "b": 1\n}\n'
    write_bytes_atomic(path, b"new")
    assert path.read_bytes() == b"new"
    assert [p.name for p in tmp_path.iterdir()] == ["config.json"]


def test_failed_atomic_write_leaves_old_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "index.json"
    path.write_bytes(b"old")

    def broken_replace(src: object, dst: object) -> None:
        raise OSError("disk gone")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk gone"):
        write_bytes_atomic(path, b"new")
    assert path.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["index.json"]


def test_manifest_hash_matches_file(tmp_path: Path) -> None:
    staging = StagingDir(tmp_path / "out", "fp")
    staging.prepare()
    spec = _plan()[0]
    digest = _write_shard(staging, spec)
    on_disk = file_checksum(staging.path / spec.filename)
    assert digest == on_disk
    assert _manifest(staging)["shards"] == {spec.filename: on_disk}
    assert set(os.listdir(staging.path)) == {MANIFEST_NAME, spec.filename}


def test_a_commit_record_vouches_for_the_published_folder_until_forgotten(tmp_path: Path) -> None:
    out = tmp_path / "out"
    staging = StagingDir(out, "fp1")
    staging.prepare()
    for spec in _plan():
        _write_shard(staging, spec)
    (staging.path / "config.json").write_text("{}")
    assert staging.committed() is None  # nothing published yet
    staging.commit(keep_record=True)
    files = sorted(p.name for p in out.iterdir())
    assert StagingDir(out, "fp1").committed() == files
    assert StagingDir(out, "another job").committed() is None
    (out / "config.json").write_text('{"changed": 1}')
    assert StagingDir(out, "fp1").committed() is None
    (out / "config.json").write_text("{}")
    (out / "extra.txt").write_text("not published by the commit")
    assert StagingDir(out, "fp1").committed() is None
    (out / "extra.txt").unlink()
    assert StagingDir(out, "fp1").committed() == files
    StagingDir(out, "fp1").forget_commit()
    assert StagingDir(out, "fp1").committed() is None
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
