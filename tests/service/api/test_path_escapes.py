"""Every path a request names, and every file read under it, stays inside the allowed roots.

The suite crosses each path-bearing field of a merge request (base model, models, both
sides of base + LoRA, tokenizer_source, evaluator data) and of a training request (base
model, data files) with each way out: absolute paths, ``..``, a linked folder, system
folders, and text no file system can hold. Then every file a checkpoint folder is read
through (config, weights, index, shards, tokenizer files, adapter files) is replaced by a
link that leads out. Each must be refused at submission with a 4xx that names no server
path, no job may be created, and nothing from outside may ever reach a response.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from safetensors.torch import save_file

from merge_kernels.synthetic import write_checkpoint
from tests.service.api.conftest import TINY, LiveServer, make_settings

MARKER = "OUTSIDE-SECRET-7d1e"
REFUSED = {"path_not_allowed", "not_found", "invalid_recipe", "invalid_text", "bad_checkpoint_file"}


def _write_adapter(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    rank = 2
    tensors = {}
    for layer in range(TINY.num_hidden_layers):
        prefix = f"base_model.model.model.layers.{layer}.self_attn.q_proj"
        tensors[f"{prefix}.lora_A.weight"] = torch.full((rank, TINY.hidden_size), 0.01)
        tensors[f"{prefix}.lora_B.weight"] = torch.full((TINY.hidden_size, rank), 0.01)
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    config = {
        "peft_type": "LORA",
        "r": rank,
        "lora_alpha": 4,
        "target_modules": ["q_proj"],
        "fan_in_fan_out": False,
    }
    (folder / "adapter_config.json").write_text(json.dumps(config))


@pytest.fixture(scope="module")
def outside(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Files that no request may read: a checkpoint, data, tokenizer and adapter files."""
    root = tmp_path_factory.mktemp("outside-roots")
    write_checkpoint(root / "model", TINY, seed=7, base_seed=0)
    tokenizer = {"secret": MARKER}
    (root / "model" / "tokenizer_config.json").write_text(json.dumps(tokenizer))
    (root / "model" / "tokenizer.json").write_text(json.dumps(tokenizer))
    (root / "data.jsonl").write_text(json.dumps({"text": MARKER}) + "\n")
    (root / "config.json").write_text(json.dumps({**TINY.config(torch.float32), "x": MARKER}))
    index = {"weight_map": {name: "model.safetensors" for name, _ in TINY.tensors()}}
    (root / "model.safetensors.index.json").write_text(json.dumps(index))
    _write_adapter(root / "adapter")
    return root


@pytest.fixture(scope="module")
def escapes_server(tmp_path_factory: pytest.TempPathFactory, outside: Path) -> Iterator[LiveServer]:
    """A server reading only its inputs folder, which holds a base, fine-tunes and adapter."""
    data_dir = tmp_path_factory.mktemp("escapes-data")
    inputs = data_dir / "inputs"
    write_checkpoint(inputs / "base", TINY, seed=0)
    for index in (1, 2):
        write_checkpoint(inputs / f"ft{index}", TINY, seed=index, base_seed=0)
    _write_adapter(inputs / "adapter")
    (inputs / "heldout.jsonl").write_text(json.dumps({"text": "hello"}) + "\n")
    (inputs / "train.jsonl").write_text(json.dumps({"prompt": "a", "completion": "b"}) + "\n")
    (inputs / "linked-model").symlink_to(outside / "model", target_is_directory=True)
    (inputs / "linked-adapter").symlink_to(outside / "adapter", target_is_directory=True)
    (inputs / "linked-data.jsonl").symlink_to(outside / "data.jsonl")
    live = LiveServer(make_settings(data_dir, [])).start()
    yield live
    live.stop()


@pytest.fixture
def http(escapes_server: LiveServer) -> Iterator[httpx.Client]:
    with escapes_server.client() as client:
        yield client


def _post(http: httpx.Client, route: str, body: dict[str, Any]) -> httpx.Response:
    # json.dumps escapes a lone surrogate as \\ud800, as a client in another language would.
    return http.post(route, content=json.dumps(body), headers={"Content-Type": "application/json"})


def _jobs(http: httpx.Client) -> int:
    total = http.get("/v1/merges").json()["total"]
    assert isinstance(total, int)
    return total


def _escapes(outside: Path, inputs: Path, kind: str) -> list[str]:
    """Ways out of the roots for a field naming a ``kind`` (model, adapter or data)."""
    target = {"model": outside / "model", "adapter": outside / "adapter"}.get(
        kind, outside / "data.jsonl"
    )
    linked = {"model": "linked-model", "adapter": "linked-adapter"}.get(kind, "linked-data.jsonl")
    return [
        str(target),
        os.path.relpath(target, inputs),
        f"./../{inputs.parent.name}/../{target.parent.name}/{target.name}",
        linked,
        str(inputs / linked),
        "/proc/1",
        "/proc/self/root/etc",
        "/root",
        "/etc",
        "~",
        "model\x00/../../etc",
        "model\ud800",
    ]


def _merge_bodies(value: str) -> dict[str, dict[str, Any]]:
    """One request per path-bearing field of a merge recipe, with that field set to ``value``."""

    def ta(**changes: Any) -> dict[str, Any]:
        body: dict[str, Any] = {
            "merge_method": "task_arithmetic",
            "base_model": "base",
            "models": [{"model": "ft1"}, {"model": "ft2"}],
        }
        body.update(changes)
        return body

    return {
        "base_model": ta(base_model=value),
        "models[0].model": ta(models=[{"model": value}, {"model": "ft2"}]),
        "lora.base": ta(models=[{"model": f"{value}+adapter"}, {"model": "ft2"}]),
        "lora.adapter": ta(models=[{"model": f"base+{value}"}, {"model": "ft2"}]),
        "lora.object": ta(
            models=[{"model": {"base": {"path": "base"}, "adapter": {"path": value}}}]
        ),
        "path.object": ta(models=[{"model": {"path": value}}, {"model": "ft2"}]),
        "tokenizer_source": ta(tokenizer_source=value),
        "evaluator.data": {
            "merge_method": "linear",
            "models": [{"model": "ft1"}, {"model": "ft2"}],
            "evaluator": {"type": "held_out", "data": value},
        },
    }


def _check_refused(response: httpx.Response, server: LiveServer, label: str) -> None:
    assert response.status_code == 422, (label, response.status_code, response.text)
    error = response.json()["error"]
    assert error["code"] in REFUSED, (label, error)
    text = response.text
    assert MARKER not in text, label
    # Server paths are named relative to the inputs folder, never absolutely.
    assert str(server.settings.inputs_dir) not in text, (label, text)
    assert os.path.realpath(server.settings.inputs_dir) not in text, (label, text)


@pytest.mark.parametrize(
    "field",
    [
        "base_model",
        "models[0].model",
        "lora.base",
        "lora.adapter",
        "lora.object",
        "path.object",
        "tokenizer_source",
        "evaluator.data",
    ],
)
def test_every_merge_path_field_refuses_every_way_out(
    field: str, http: httpx.Client, escapes_server: LiveServer, outside: Path
) -> None:
    kind = {"lora.adapter": "adapter", "lora.object": "adapter", "evaluator.data": "data"}.get(
        field, "model"
    )
    before = _jobs(http)
    for value in _escapes(outside, escapes_server.settings.inputs_dir, kind):
        body = _merge_bodies(value)[field]
        for route in ("/v1/plans", "/v1/merges"):
            response = _post(http, route, body)
            _check_refused(response, escapes_server, f"{route} {field}={value!r}")
    assert _jobs(http) == before


def _folder_with_link(inputs: Path, name: str, relink: Callable[[Path], None]) -> str:
    folder = inputs / name
    if not folder.exists():
        write_checkpoint(folder, TINY, seed=3, base_seed=0)
        relink(folder)
    return name


def _link(folder: Path, file_name: str, target: Path) -> None:
    path = folder / file_name
    if path.exists() or path.is_symlink():
        path.unlink()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.symlink_to(target)


def _sharded_through_linked_folder(folder: Path, outside: Path) -> None:
    (folder / "model.safetensors").unlink()
    (folder / "sub").symlink_to(outside / "model", target_is_directory=True)
    index = {"weight_map": {name: "sub/model.safetensors" for name, _ in TINY.tensors()}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))


def _index_link(folder: Path, outside: Path) -> None:
    (folder / "model.safetensors").rename(folder / "model-00001-of-00001.safetensors")
    _link(folder, "model.safetensors.index.json", outside / "model.safetensors.index.json")


def _index_naming(shard: str) -> Callable[[Path, Path], None]:
    def rewrite(folder: Path, outside: Path) -> None:
        (folder / "model.safetensors").unlink()
        index = {"weight_map": {name: shard.format(outside=outside) for name, _ in TINY.tensors()}}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index))

    return rewrite


FILE_LINKS: dict[str, Callable[[Path, Path], None]] = {
    "config.json": lambda f, o: _link(f, "config.json", o / "config.json"),
    "model.safetensors": lambda f, o: _link(f, "model.safetensors", o / "model/model.safetensors"),
    "index.json": _index_link,
    "shard-in-linked-folder": _sharded_through_linked_folder,
    "shard-dotdot": _index_naming("../../{outside.name}/model/model.safetensors"),
    "shard-absolute": _index_naming("{outside}/model/model.safetensors"),
    "tokenizer_config.json": lambda f, o: _link(
        f, "tokenizer_config.json", o / "model/tokenizer_config.json"
    ),
    "tokenizer.json": lambda f, o: _link(f, "tokenizer.json", o / "model/tokenizer.json"),
}


# Tokenizer files are read only from the tokenizer source (the base by default), so a model
# that is neither is not opened for them; a tokenizer source's config.json is not read.
LINK_CASES = [
    (case, role)
    for case in sorted(FILE_LINKS)
    for role in ("models[0].model", "base_model", "tokenizer_source")
    if not (case.startswith("tokenizer") and role == "models[0].model")
    and not (case == "config.json" and role == "tokenizer_source")
]


@pytest.mark.parametrize(("case", "role"), LINK_CASES)
def test_files_inside_an_allowed_folder_may_not_link_out(
    case: str, role: str, http: httpx.Client, escapes_server: LiveServer, outside: Path
) -> None:
    inputs = escapes_server.settings.inputs_dir
    name = _folder_with_link(inputs, f"link-{case}", lambda f: FILE_LINKS[case](f, outside))
    body = _merge_bodies(name)[role]
    before = _jobs(http)
    for route in ("/v1/plans", "/v1/merges"):
        _check_refused(_post(http, route, body), escapes_server, f"{route} {role} {case}")
    assert _jobs(http) == before


@pytest.mark.parametrize(
    ("file_name", "target"),
    [
        ("adapter_config.json", "adapter/adapter_config.json"),
        ("adapter_model.safetensors", "adapter/adapter_model.safetensors"),
    ],
)
def test_adapter_files_may_not_link_out(
    file_name: str, target: str, http: httpx.Client, escapes_server: LiveServer, outside: Path
) -> None:
    inputs = escapes_server.settings.inputs_dir
    folder = inputs / f"adapter-link-{file_name}"
    if not folder.exists():
        _write_adapter(folder)
        _link(folder, file_name, outside / target)
    body = _merge_bodies(folder.name)["lora.adapter"]
    for route in ("/v1/plans", "/v1/merges"):
        _check_refused(_post(http, route, body), escapes_server, f"{route} {file_name}")


def test_links_that_stay_inside_the_roots_are_followed(
    http: httpx.Client, escapes_server: LiveServer
) -> None:
    inputs = escapes_server.settings.inputs_dir
    folder = inputs / "assembled"
    if not folder.exists():
        folder.mkdir()
        for name in ("config.json", "model.safetensors"):
            (folder / name).symlink_to(inputs / "ft1" / name)
    body = _merge_bodies("assembled")["models[0].model"]
    response = _post(http, "/v1/plans", body)
    assert response.status_code == 200, response.text
    assert response.json()["ok"] is True


def test_the_inputs_folder_itself_is_not_listed(
    http: httpx.Client, escapes_server: LiveServer
) -> None:
    for value in (".", "./", "ft1/..", str(escapes_server.settings.inputs_dir)):
        response = _post(http, "/v1/plans", _merge_bodies(value)["models[0].model"])
        _check_refused(response, escapes_server, value)
        message = response.json()["error"]["message"]
        for neighbour in ("ft1", "ft2", "adapter", "heldout"):
            assert neighbour not in message, (value, message)


def test_outside_paths_say_how_to_allow_them(
    http: httpx.Client, escapes_server: LiveServer, outside: Path
) -> None:
    for value in (str(outside / "model"), str(outside / "no-such-model")):
        response = _post(http, "/v1/plans", _merge_bodies(value)["models[0].model"])
        error = response.json()["error"]
        assert error["code"] == "path_not_allowed"
        assert "--allow-root" in error["message"]
        # Whether the path exists is not revealed: both answers are the same but for it.
        assert value in error["message"]


def test_tokenizer_source_inside_the_roots_is_read_from_there(
    http: httpx.Client, escapes_server: LiveServer
) -> None:
    # A model named as tokenizer_source builds the output vocabulary from its tokenizer
    # (mergekit's rule). This one is inside the roots, so it is opened and read: the refusal
    # is that it (and the base) hold no tokenizer.json, not that the path is outside.
    inputs = escapes_server.settings.inputs_dir
    source = inputs / "tokenizer-source"
    if not source.exists():
        write_checkpoint(source, TINY, seed=4, base_seed=0)
        (source / "tokenizer_config.json").write_text(json.dumps({"from": "tokenizer-source"}))
    body = _merge_bodies("tokenizer-source")["tokenizer_source"]
    body["output"] = {"name": "tokenizer-source-merge"}
    response = _post(http, "/v1/merges", body)
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["code"] == "invalid_recipe"
    assert error["details"]["field"] == "tokenizer_source"
    assert "tokenizer.json" in error["message"]


TRAINING_FIELDS = ("base_model", "data.train", "data.eval")


@pytest.mark.parametrize("field", TRAINING_FIELDS)
def test_training_paths_refuse_every_way_out(
    field: str, http: httpx.Client, escapes_server: LiveServer, outside: Path
) -> None:
    kind = "model" if field == "base_model" else "data"
    for value in _escapes(outside, escapes_server.settings.inputs_dir, kind):
        body: dict[str, Any] = {
            "kind": "lora",
            "base_model": "base",
            "data": {"train": "train.jsonl", "eval": "train.jsonl"},
        }
        if field == "base_model":
            body["base_model"] = value
        else:
            body["data"][field.split(".")[1]] = value
        response = _post(http, "/v1/trainings", body)
        label = f"training {field}={value!r}"
        assert response.status_code == 422, (label, response.text)
        assert MARKER not in response.text, label
        assert str(escapes_server.settings.inputs_dir) not in response.text, label


def test_training_base_folder_files_may_not_link_out(
    http: httpx.Client, escapes_server: LiveServer, outside: Path
) -> None:
    inputs = escapes_server.settings.inputs_dir
    folder = inputs / "training-base-link"
    if not folder.exists():
        write_checkpoint(folder, TINY, seed=0)
        _link(folder, "tokenizer.json", outside / "model/tokenizer.json")
    body = {"kind": "lora", "base_model": folder.name, "data": {"train": "train.jsonl"}}
    response = _post(http, "/v1/trainings", body)
    assert response.status_code == 422, response.text
    assert "tokenizer.json" in response.json()["error"]["message"]
    assert MARKER not in response.text
