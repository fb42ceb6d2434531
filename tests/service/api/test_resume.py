"""A merge interrupted by a server stop finishes after a restart, bit-identical."""

from __future__ import annotations

from pathlib import Path

from merge_kernels.recipe import parse_recipe
from merge_kernels.runner import MergeOptions, run_merge
from tests.service.api.conftest import (
    LiveServer,
    dare_recipe,
    make_settings,
    pause_mid_merge,
    read_events,
)

SHARD = 1_000_000


def test_restart_resumes_an_interrupted_merge(tmp_path: Path, larger_root: Path) -> None:
    data_dir = tmp_path / "data"
    body = dare_recipe(larger_root) | {"output": {"shard_size": SHARD, "name": "resumed"}}

    staging = data_dir / "outputs" / ".resumed.tureen-partial"
    first = LiveServer(make_settings(data_dir, [larger_root])).start()
    try:
        with first.client() as http:
            job = http.post("/v1/merges", json=body).json()
            # Freeze the worker once a shard is done, so the stop surely lands mid-merge;
            # the server's shutdown then ends it, as it would a running one.
            pause_mid_merge(http, job["id"], staging)
    finally:
        first.stop()
    assert staging.is_dir(), "the interrupted merge kept its finished shards"
    assert not (data_dir / "outputs" / "resumed").exists()

    second = LiveServer(make_settings(data_dir, [larger_root])).start()
    try:
        with second.client() as http:
            events = read_events(http, job["id"])
    finally:
        second.stop()
    final = events[-1][1]
    assert events[-1][0] == "status" and final["status"] == "succeeded", final
    assert final["attempts"] == 2
    assert final["resumed_shards"] >= 1
    assert not staging.exists()

    reference = run_merge(
        parse_recipe(dare_recipe(larger_root)),
        tmp_path / "reference",
        MergeOptions(max_shard_bytes=SHARD),
    )
    out_dir = Path(final["output_dir"])
    compared = [name for name in reference.files if name.endswith((".safetensors", ".json"))]
    assert len(compared) > 3
    assert sorted(final["files"]) == sorted(reference.files)
    for name in compared:
        assert (out_dir / name).read_bytes() == (reference.out_dir / name).read_bytes(), name
