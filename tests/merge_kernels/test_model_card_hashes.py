"""The model card identifies each input by its own weight files' sha256."""

from __future__ import annotations

import contextlib
import hashlib
import os
import sqlite3
import time
from pathlib import Path

import pytest

from merge_kernels.input_hashes import file_sha256
from merge_kernels.io.safetensors_header import open_readonly
from service.cli import main


def test_each_input_is_listed_with_its_own_file_sha256(tmp_path: Path) -> None:
    assert main(["example", str(tmp_path), "--hidden", "32", "--layers", "1"]) == 0
    assert main(["merge", str(tmp_path / "recipe.yaml"), str(tmp_path / "out"), "--quiet"]) == 0
    card = (tmp_path / "out" / "README.md").read_text()
    digests = {
        name: hashlib.sha256((tmp_path / name / "model.safetensors").read_bytes()).hexdigest()
        for name in ("base", "finetune-1", "finetune-2", "finetune-3")
    }
    # Same layout, so the same safetensors header; the contents differ, and so must the hashes.
    assert len(set(digests.values())) == 4
    for name, digest in digests.items():
        row = next(line for line in card.splitlines() if f"`{name}`" in line)
        assert f"sha256 `{digest}`" in row


def test_a_hub_cache_blob_is_identified_by_its_name(tmp_path: Path) -> None:
    digest = "ab" * 32  # a cache blob's name is the Hub's sha256 of it; not read again
    blobs = tmp_path / "blobs"
    blobs.mkdir()
    (blobs / digest).write_bytes(b"weights")
    link = tmp_path / "snapshots" / "model.safetensors"
    link.parent.mkdir()
    os.symlink(blobs / digest, link)
    assert file_sha256(link, open_readonly) == digest
    plain = tmp_path / "plain.safetensors"
    plain.write_bytes(b"weights")
    assert file_sha256(plain, open_readonly) == hashlib.sha256(b"weights").hexdigest()


def test_digests_are_remembered_until_the_file_changes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(b"first")
    assert file_sha256(weights, open_readonly) == hashlib.sha256(b"first").hexdigest()
    cache = tmp_path / "cache" / "tureen" / "file-sha256.sqlite3"
    with contextlib.closing(sqlite3.connect(cache)) as db:
        assert db.execute("SELECT sha256 FROM digests").fetchall() == [
            (hashlib.sha256(b"first").hexdigest(),)
        ]
    # Rewritten with the same size: a new modification time, so a new key and digest.
    time.sleep(0.01)
    weights.write_bytes(b"other")
    os.utime(weights, ns=(time.time_ns(), time.time_ns() + 1_000_000))
    assert file_sha256(weights, open_readonly) == hashlib.sha256(b"other").hexdigest()
