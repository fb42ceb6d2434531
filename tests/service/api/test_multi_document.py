"""Multi-document recipes (mergekit-multimerge) as one job of the real server.

A named merge is another's model; the job runs the stages in dependency order, keeps the
intermediates private and publishes the final merge only, bit for bit what ``tureen merge``
writes for the same file. Every local path of every document must lie under the allowed
roots; a failing stage fails the job naming the stage; cancelling leaves nothing; a restart
resumes the job, keeping the stages already done.
"""

from __future__ import annotations

import contextlib
import io
import os
import signal
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from merge_kernels.synthetic import write_checkpoint
from service.cli import main as cli_main
from tests.service.api.conftest import (
    TINY,
    LiveServer,
    make_settings,
    pause_mid_merge,
    read_events,
    wait_for,
)

YAML = {"Content-Type": "application/yaml"}
SHARD = 1_000_000


def _documents(root: Path) -> list[dict[str, Any]]:
    """A TIES merge named ``step-one``, then a linear merge of it with ``ft3`` (final)."""
    return [
        {
            "name": "step-one",
            "merge_method": "ties",
            "base_model": str(root / "base"),
            "models": [
                {"model": str(root / f"ft{i}"), "parameters": {"weight": 1.0, "density": 0.5}}
                for i in (1, 2)
            ],
            "parameters": {"lambda": 1.0},
        },
        {
            "merge_method": "linear",
            "models": [
                # density: unused by linear, so a warning of the final stage
                {"model": "step-one", "parameters": {"weight": 0.5, "density": 0.3}},
                {"model": str(root / "ft3"), "parameters": {"weight": 0.5}},
            ],
        },
    ]


def _yaml(documents: list[dict[str, Any]]) -> str:
    return yaml.safe_dump_all(documents, sort_keys=False)


def _cli_merge(recipe_text: str, folder: Path, *options: str) -> Path:
    """What ``tureen merge`` writes for the same multi-document file."""
    folder.mkdir(parents=True, exist_ok=True)
    recipe = folder / "recipe.yaml"
    recipe.write_text(recipe_text)
    out = folder / "out"
    argv = ["merge", str(recipe), str(out), "--quiet", "--intermediate-dir", str(folder / "mid")]
    argv += options
    with contextlib.redirect_stdout(io.StringIO()):
        assert cli_main(argv) == 0
    return out


def _assert_same_weights(served: Path, reference: Path) -> None:
    # README.md and tureen_recipe.yaml name the intermediate's folder, which differs.
    compared = sorted(
        path.name for path in reference.iterdir() if path.suffix in (".safetensors", ".json")
    )
    assert "config.json" in compared and any(name.endswith(".safetensors") for name in compared)
    for name in compared:
        assert (served / name).read_bytes() == (reference / name).read_bytes(), name


def _leftovers(server: LiveServer, name: str, expected: list[str]) -> list[str]:
    """Everything in the outputs folder that belongs to the output ``name``, once it is
    ``expected`` or a few seconds have passed (the worker tidies up after recording the
    job's outcome, so that a crash in between can still be recovered)."""
    outputs = server.settings.outputs_dir
    deadline = time.monotonic() + 5
    while True:
        found = sorted(p.name for p in outputs.iterdir() if p.name.lstrip(".").startswith(name))
        if found == expected or time.monotonic() > deadline:
            return found
        time.sleep(0.02)


def _jobs(http: httpx.Client) -> int:
    total = http.get("/v1/merges").json()["total"]
    assert isinstance(total, int)
    return total


def test_a_multi_document_recipe_is_one_job_that_matches_the_cli(
    server: LiveServer, client: httpx.Client, models_root: Path, tmp_path: Path
) -> None:
    documents = _documents(models_root)
    text = _yaml(documents)

    planned = client.post("/v1/plans", content=text, headers=YAML)
    assert planned.status_code == 200, planned.text
    plan = planned.json()
    assert [(s["index"], s["name"], s["final"]) for s in plan["stages"]] == [
        (0, "step-one", False),
        (1, None, True),
    ]
    assert plan["stages"][0]["plan"]["merge_method"] == "ties"
    assert plan["stages"][1]["plan"] is None  # reads step-one, which does not exist yet
    assert plan["stages"][1]["reads"] == ["step-one"]

    body = _yaml([documents[0], {**documents[1], "output": {"name": "multi-yaml"}}])
    response = client.post("/v1/merges", content=body, headers=YAML)
    assert response.status_code == 202, response.text
    queued = response.json()
    assert [stage["state"] for stage in queued["stages"]] == ["pending", "pending"]
    assert queued["warnings"] == [
        "merges[1]: models[0].parameters.density: linear does not use 'density'; it is "
        "ignored, as mergekit ignores it"
    ]
    # The record names the earlier merge, not a folder of the server.
    assert queued["recipe"]["merges"][1]["models"][0]["model"] == "step-one"
    assert str(server.settings.data_dir) not in response.text

    job = wait_for(client, queued["id"])
    assert job["status"] == "succeeded", job
    assert [(s["name"], s["state"]) for s in job["stages"]] == [
        ("step-one", "succeeded"),
        (None, "succeeded"),
    ]
    for stage in job["stages"]:
        assert stage["progress"]["phase"] == "done"
        assert stage["progress"]["tensors_done"] == stage["progress"]["tensors_total"] > 0
    # Only the final merge is visible: no intermediate, no staging folder.
    assert _leftovers(server, "multi-yaml", ["multi-yaml"]) == ["multi-yaml"]
    files = client.get(f"/v1/merges/{job['id']}/files").json()["files"]
    assert sorted(f["name"] for f in files) == sorted(job["files"])

    reference = _cli_merge(text, tmp_path / "cli")
    output = Path(job["output_dir"])
    assert sorted(job["files"]) == sorted(p.name for p in reference.iterdir())
    _assert_same_weights(output, reference)
    # The downloaded bytes are the published file's.
    download = client.get(f"/v1/merges/{job['id']}/files/model.safetensors")
    assert download.content == (reference / "model.safetensors").read_bytes()

    # The JSON form, final merge first and output beside the merges: the same result.
    json_body = {"merges": list(reversed(documents)), "output": {"name": "multi-json"}}
    job = wait_for(client, client.post("/v1/merges", json=json_body).json()["id"])
    assert job["status"] == "succeeded", job
    assert [s["index"] for s in job["stages"]] == [1, 0]  # dependency order
    _assert_same_weights(Path(job["output_dir"]), reference)


def _escapes(outside: Path) -> list[tuple[str, Any]]:
    """(field of the final document, value) pairs that leave the allowed roots."""
    secret = str(outside / "secret")
    return [
        ("models[1].model", secret),
        ("models[1].model", f"../../{outside.name}/secret"),
        ("models[1].model", "~"),
        ("models[1].model", "~root"),
        ("models[1].model", {"path": secret}),
        ("models[0].model", f"step-one+{secret}"),
        ("models[0].model", {"base": "step-one", "adapter": {"path": secret}}),
        ("tokenizer_source", secret),
    ]


@pytest.mark.parametrize("case", range(len(_escapes(Path("x")))))
def test_a_path_escape_in_a_later_document_is_refused_naming_its_field(
    case: int, client: httpx.Client, models_root: Path, outside_root: Path
) -> None:
    field, value = _escapes(outside_root)[case]
    documents = _documents(models_root)
    final = documents[1]
    if field == "tokenizer_source":
        final["tokenizer_source"] = value
    else:
        position = int(field[len("models[")])
        final["models"][position]["model"] = value
    before = _jobs(client)
    for route, send in (
        ("/v1/plans", lambda: client.post("/v1/plans", json={"merges": documents})),
        ("/v1/merges", lambda: client.post("/v1/merges", json={"merges": documents})),
        ("yaml", lambda: client.post("/v1/merges", content=_yaml(documents), headers=YAML)),
    ):
        response = send()
        assert response.status_code == 422, (route, value, response.text)
        error = response.json()["error"]
        assert error["code"] == "path_not_allowed", (route, value, error)
        assert error["details"]["field"] == f"merges[1].{field}", (route, value, error)
        assert error["message"].startswith(f"merges[1].{field}: "), error["message"]
    assert _jobs(client) == before


def test_a_link_out_inside_a_later_documents_folder_is_refused(
    client: httpx.Client, models_root: Path, outside_root: Path
) -> None:
    folder = models_root / "multi-linked-config"
    if not folder.exists():
        write_checkpoint(folder, TINY, seed=4, base_seed=0)
        (folder / "config.json").unlink()
        (folder / "config.json").symlink_to(outside_root / "secret" / "config.json")
    documents = _documents(models_root)
    documents[1]["models"][1]["model"] = str(folder)
    for route in ("/v1/plans", "/v1/merges"):
        response = client.post(route, json={"merges": documents})
        assert response.status_code == 422, (route, response.text)
        error = response.json()["error"]
        assert error["code"] == "path_not_allowed", error
        assert error["details"]["stage"] == "merges[1]", error


def test_errors_name_the_document_and_field(client: httpx.Client, models_root: Path) -> None:
    def refused(documents: list[Any], **extra: Any) -> dict[str, Any]:
        response = client.post("/v1/merges", json={"merges": documents, **extra})
        assert response.status_code == 422, response.text
        error: dict[str, Any] = response.json()["error"]
        return error

    documents = _documents(models_root)
    bad_parameter = [documents[0], {**documents[1], "parameters": {"normalize": "sometimes"}}]
    assert refused(bad_parameter)["details"]["field"].startswith("merges[1].parameters")

    typo = [documents[0], {**documents[1], "models": [{"model": "step-on"}, {"model": "x/y"}]}]
    error = refused(typo)
    assert error["details"]["field"] == "merges[1].models[0].model"
    assert "'step-one'" in error["message"]  # did you mean

    assert (
        refused([{**documents[0], "output": {"name": "x"}}, documents[1]])["details"]["field"]
        == "merges[0].output"
    )
    assert refused(documents, extra={"name": "x"})["details"]["field"] == "extra"
    assert refused(documents[:1])["details"]["field"] == "merges"
    other = {**documents[0], "name": "other", "base_model": "step-one"}
    cycle = [{**documents[0], "base_model": "other"}, other, documents[1]]
    error = refused(cycle)
    assert "cycle" in error["message"] and error["details"]["field"].startswith("merges[")

    # A stage planned at submission (it reads only checkpoints) that cannot merge.
    odd = [
        {
            **documents[0],
            "models": [{"model": str(models_root / name)} for name in ("ft1", "odd")],
            "merge_method": "linear",
            "parameters": None,
        },
        documents[1],
    ]
    error = refused(odd)
    assert error["details"]["stage"] == "step-one"
    assert error["message"].startswith("merges[0] ('step-one'): ")


def test_a_failing_stage_fails_the_job_naming_it_and_leaves_nothing(
    server: LiveServer, client: httpx.Client, models_root: Path, larger_root: Path
) -> None:
    documents = _documents(models_root)
    # The final merge reads step-one (tiny) with a larger model: planned only once step-one
    # exists, it cannot merge, and the job fails in its second stage.
    documents[1]["models"][1]["model"] = str(larger_root / "ft1")
    documents[1]["output"] = {"name": "multi-failing"}
    response = client.post("/v1/merges", json={"merges": documents})
    assert response.status_code == 202, response.text
    job = wait_for(client, response.json()["id"])
    assert job["status"] == "failed", job
    assert job["error"]["code"] == "incompatible_checkpoints"
    assert job["error"]["details"]["stage"] == "merges[1]"
    assert job["error"]["message"].startswith("merges[1]: ")
    assert [s["state"] for s in job["stages"]] == ["succeeded", "failed"]
    assert _leftovers(server, "multi-failing", []) == []


def _larger_documents(root: Path) -> list[dict[str, Any]]:
    """step-one: a TIES merge of the larger models; final: DARE-TIES of it, in 1 MB shards."""
    return [
        {
            "name": "step-one",
            "merge_method": "ties",
            "base_model": str(root / "base"),
            "models": [
                {"model": str(root / f"ft{i}"), "parameters": {"weight": 1.0, "density": 0.5}}
                for i in (1, 2)
            ],
        },
        {
            "merge_method": "dare_ties",
            "base_model": str(root / "base"),
            "models": [
                {"model": "step-one", "parameters": {"weight": 0.5, "density": 0.4}},
                {"model": str(root / "ft2"), "parameters": {"weight": 0.5, "density": 0.4}},
            ],
            "seed": 7,
        },
    ]


def test_cancel_stops_the_job_and_leaves_nothing(
    server: LiveServer, client: httpx.Client, larger_root: Path
) -> None:
    body = {"merges": _larger_documents(larger_root), "output": {"name": "multi-cancelled"}}
    body["output"]["shard_size"] = SHARD
    job_id = client.post("/v1/merges", json=body).json()["id"]
    running = wait_for(client, job_id, ("running",))
    while running["worker_pid"] is None:
        running = client.get(f"/v1/merges/{job_id}").json()
    # The worker is frozen while the cancel is recorded, so the merge cannot end first on a
    # fast machine; it sees the request as soon as it runs again.
    os.kill(running["worker_pid"], signal.SIGSTOP)
    try:
        cancelled = client.delete(f"/v1/merges/{job_id}")
    finally:
        os.kill(running["worker_pid"], signal.SIGCONT)
    assert cancelled.status_code == 202
    job = wait_for(client, job_id)
    assert job["status"] == "cancelled", job
    assert "failed" not in [s["state"] for s in job["stages"]]
    assert job["stages"][-1]["state"] in ("pending", "cancelled")
    assert _leftovers(server, "multi-cancelled", []) == []


def test_a_restart_resumes_the_job_keeping_finished_stages(
    tmp_path: Path, larger_root: Path
) -> None:
    documents = _larger_documents(larger_root)
    body = {"merges": documents, "output": {"name": "multi-resumed", "shard_size": SHARD}}
    data_dir = tmp_path / "data"
    outputs = data_dir / "outputs"
    staging = outputs / ".multi-resumed.tureen-partial"  # the final stage's
    first = LiveServer(make_settings(data_dir, [larger_root])).start()
    try:
        with first.client() as http:
            job = http.post("/v1/merges", json=body).json()
            pause_mid_merge(http, job["id"], staging)  # in the final stage
    finally:
        first.stop()
    assert (outputs / ".multi-resumed.tureen-stages" / "step-one").is_dir()
    assert not (outputs / "multi-resumed").exists()

    second = LiveServer(make_settings(data_dir, [larger_root])).start()
    try:
        with second.client() as http:
            events = read_events(http, job["id"])
    finally:
        second.stop()
    final = events[-1][1]
    assert final["status"] == "succeeded", final
    assert final["attempts"] == 2
    assert [s["state"] for s in final["stages"]] == ["reused", "succeeded"]
    assert final["resumed_shards"] >= 1
    assert sorted(p.name for p in outputs.iterdir()) == ["multi-resumed"]

    reference = _cli_merge(_yaml(documents), tmp_path / "cli", "--shard-size", "1MB")
    output = Path(final["output_dir"])
    assert sorted(final["files"]) == sorted(p.name for p in reference.iterdir())
    _assert_same_weights(output, reference)
    assert len(list(output.glob("*.safetensors"))) > 3
