"""open_checkpoint: base_dir, allowed roots, symlinks and '..' escapes."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from merge_kernels.checkpoints import LocalRef, LoraRef, open_checkpoint, resolve_local_path
from merge_kernels.errors import CheckpointNotFoundError
from tests.merge_kernels.checkpoints.tiny_models import make_lora_adapter, save_tiny_llama

pytestmark = [
    pytest.mark.filterwarnings("ignore::UserWarning"),
    pytest.mark.filterwarnings("ignore::FutureWarning"),
]


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("opening")
    allowed = root / "allowed"
    outside = root / "outside"
    model: Any = save_tiny_llama(allowed / "llama")
    save_tiny_llama(outside / "secret", seed=9)
    make_lora_adapter(model, allowed / "adapters" / "chat", r=2, target_modules=["q_proj"])
    make_lora_adapter(model, outside / "adapter", r=2, target_modules=["q_proj"])
    os.symlink(outside / "secret", allowed / "link-out")
    os.symlink(allowed / "llama", allowed / "link-in")
    return {"root": root, "allowed": allowed, "outside": outside}


def _outside(error: pytest.ExceptionInfo[CheckpointNotFoundError]) -> None:
    assert error.value.details["reason"] == "outside_allowed_roots"
    assert "outside the folders this service may read" in error.value.message


def test_inside_roots_opens(tree: dict[str, Path]) -> None:
    roots = [tree["allowed"]]
    with open_checkpoint(str(tree["allowed"] / "llama"), allowed_roots=roots) as ckpt:
        assert ckpt.folder == (tree["allowed"] / "llama").resolve()
    with open_checkpoint("llama", base_dir=tree["allowed"], allowed_roots=roots) as ckpt:
        assert ckpt.ref == LocalRef(path=Path("llama"))
    with open_checkpoint(tree["allowed"] / "link-in", allowed_roots=roots) as ckpt:
        assert ckpt.folder == (tree["allowed"] / "llama").resolve()


@pytest.mark.parametrize(
    "reference",
    [
        "{outside}/secret",
        "{allowed}/../outside/secret",
        "{allowed}/link-out",
        "{allowed}/../outside/does-not-exist",
    ],
)
def test_escapes_are_refused(tree: dict[str, Path], reference: str) -> None:
    path = Path(reference.format(allowed=tree["allowed"], outside=tree["outside"]))
    with pytest.raises(CheckpointNotFoundError) as error:
        open_checkpoint(LocalRef(path=path), allowed_roots=[tree["allowed"]])
    _outside(error)


def test_relative_escape_through_base_dir(tree: dict[str, Path]) -> None:
    with pytest.raises(CheckpointNotFoundError) as error:
        open_checkpoint(
            LocalRef(path=Path("../outside/secret")),
            base_dir=tree["allowed"],
            allowed_roots=[tree["allowed"]],
        )
    _outside(error)


def test_lora_sides_are_both_checked(tree: dict[str, Path]) -> None:
    allowed, outside = tree["allowed"], tree["outside"]
    ok = LoraRef(
        base=LocalRef(path=allowed / "llama"), adapter=LocalRef(path=allowed / "adapters" / "chat")
    )
    with open_checkpoint(ok, allowed_roots=[allowed]) as ckpt:
        assert ckpt.display_name == f"{allowed / 'llama'}+{allowed / 'adapters' / 'chat'}"
    bad = LoraRef(base=LocalRef(path=allowed / "llama"), adapter=LocalRef(path=outside / "adapter"))
    with pytest.raises(CheckpointNotFoundError) as error:
        open_checkpoint(bad, allowed_roots=[allowed])
    _outside(error)


def test_without_roots_anything_goes(tree: dict[str, Path]) -> None:
    with open_checkpoint(str(tree["allowed"] / "link-out")) as ckpt:
        assert ckpt.entries()


def test_resolve_local_path(tree: dict[str, Path], tmp_path: Path) -> None:
    assert resolve_local_path(Path("x"), base_dir=tmp_path) == tmp_path / "x"
    roots = [tree["root"], tree["allowed"]]
    assert (
        resolve_local_path(tree["allowed"] / "link-out", allowed_roots=roots)
        == (tree["outside"] / "secret").resolve()
    )


def test_strings_cannot_probe_outside_roots(tree: dict[str, Path]) -> None:
    existing = str(tree["outside"] / "secret")
    missing = str(tree["outside"] / "missing")
    roots = [tree["allowed"]]
    errors = []
    for text in (existing, missing):
        with pytest.raises(CheckpointNotFoundError) as error:
            open_checkpoint(text, allowed_roots=roots)
        errors.append(error.value.message.replace(text, "PATH"))
    assert errors[0] == errors[1]
