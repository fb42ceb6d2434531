"""Checkpoint references: string and object forms, display form, JSON Schema."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import BaseModel, ValidationError

from merge_kernels.checkpoints.reference import (
    CheckpointRef,
    CheckpointRefField,
    HubRef,
    LocalRef,
    LoraRef,
    is_hub_repo_id,
    parse_reference,
    reference_from_value,
)
from merge_kernels.errors import CheckpointNotFoundError, RecipeError


@pytest.fixture
def base_dir(tmp_path: Path) -> Path:
    for folder in ("models/llama", "adapters/chat", "weird+name@x", "local-only"):
        (tmp_path / folder).mkdir(parents=True)
    return tmp_path


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("org/name", HubRef(repo="org/name")),
        ("org/name@v1.0", HubRef(repo="org/name", revision="v1.0")),
        ("org/name@refs/pr/3", HubRef(repo="org/name", revision="refs/pr/3")),
        ("gpt2", HubRef(repo="gpt2")),
        ("  org/name  ", HubRef(repo="org/name")),
        ("models/llama", LocalRef(path=Path("models/llama"))),
        ("local-only", LocalRef(path=Path("local-only"))),
        ("weird+name@x", LocalRef(path=Path("weird+name@x"))),
        (
            "org/base+org/lora@abc123",
            LoraRef(
                base=HubRef(repo="org/base"), adapter=HubRef(repo="org/lora", revision="abc123")
            ),
        ),
        (
            "models/llama+adapters/chat",
            LoraRef(
                base=LocalRef(path=Path("models/llama")),
                adapter=LocalRef(path=Path("adapters/chat")),
            ),
        ),
        (
            "org/base@main+adapters/chat",
            LoraRef(
                base=HubRef(repo="org/base", revision="main"),
                adapter=LocalRef(path=Path("adapters/chat")),
            ),
        ),
    ],
)
def test_parse_strings(base_dir: Path, text: str, expected: CheckpointRef) -> None:
    ref = parse_reference(text, base_dir=base_dir)
    assert ref == expected
    assert parse_reference(str(ref), base_dir=base_dir) == ref


def test_existing_absolute_path_is_local(base_dir: Path) -> None:
    path = base_dir / "models" / "llama"
    assert parse_reference(str(path)) == LocalRef(path=path)


@pytest.mark.parametrize(
    "text",
    ["a/b/c", "/definitely/not/here", "./missing", "org/na--me", "org/name.git", "-org/name"],
)
def test_neither_path_nor_repo(base_dir: Path, text: str) -> None:
    with pytest.raises(CheckpointNotFoundError, match="neither an existing local folder"):
        parse_reference(text, base_dir=base_dir)


@pytest.mark.parametrize("text", ["", "   ", "org/name@", "a+b+c", "+org/lora", "org/a@x y"])
def test_malformed(text: str) -> None:
    with pytest.raises((RecipeError, CheckpointNotFoundError)):
        parse_reference(text)


def test_display_forms() -> None:
    assert str(HubRef(repo="org/name")) == "org/name"
    assert str(HubRef(repo="org/name", revision="v2")) == "org/name@v2"
    assert str(LocalRef(path=Path("/m/x"))) == "/m/x"
    lora = LoraRef(base=HubRef(repo="org/b"), adapter=LocalRef(path=Path("/a")))
    assert str(lora) == "org/b+/a"


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ({"path": "/models/x"}, LocalRef(path=Path("/models/x"))),
        ({"repo": "org/name"}, HubRef(repo="org/name")),
        ({"repo": "org/name", "revision": "dev"}, HubRef(repo="org/name", revision="dev")),
        (
            {"base": {"repo": "org/b"}, "adapter": {"path": "/a"}},
            LoraRef(base=HubRef(repo="org/b"), adapter=LocalRef(path=Path("/a"))),
        ),
        (
            {"base": "org/b@v1", "adapter": "org/lora"},
            LoraRef(base=HubRef(repo="org/b", revision="v1"), adapter=HubRef(repo="org/lora")),
        ),
        ("org/name", HubRef(repo="org/name")),
    ],
)
def test_object_forms(value: object, expected: CheckpointRef) -> None:
    assert reference_from_value(value) == expected  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "value",
    [
        {"repo": "org/name", "path": "/x"},
        {"repo": "bad repo"},
        {"revision": "main"},
        {"base": {"repo": "a/b"}},
        {"base": {"base": {"repo": "a/b"}, "adapter": {"repo": "c/d"}}, "adapter": {"repo": "e/f"}},
    ],
)
def test_bad_objects(value: dict[str, object]) -> None:
    with pytest.raises(RecipeError, match="checkpoint object"):
        reference_from_value(value)


class _Recipe(BaseModel):
    model: CheckpointRefField


def test_field_accepts_both_forms_and_uses_context(base_dir: Path) -> None:
    assert _Recipe.model_validate({"model": "org/x@v1"}).model == HubRef(
        repo="org/x", revision="v1"
    )
    assert _Recipe.model_validate({"model": {"path": "/m"}}).model == LocalRef(path=Path("/m"))
    local = _Recipe.model_validate({"model": "models/llama"}, context={"base_dir": base_dir})
    assert local.model == LocalRef(path=Path("models/llama"))
    with pytest.raises(ValidationError):
        _Recipe.model_validate({"model": {"repo": "org/x", "extra": 1}})
    dumped = _Recipe(model=HubRef(repo="org/x")).model_dump(mode="json")
    assert _Recipe.model_validate(dumped).model == HubRef(repo="org/x")


def test_json_schema_lists_every_form() -> None:
    schema = _Recipe.model_json_schema()
    options = schema["properties"]["model"]["anyOf"]
    refs = {option.get("$ref", option.get("type")) for option in options}
    assert refs == {"#/$defs/LocalRef", "#/$defs/HubRef", "#/$defs/LoraRef", "string"}
    hub = schema["$defs"]["HubRef"]
    assert hub["required"] == ["repo"]
    assert hub["additionalProperties"] is False
    assert "pattern" in hub["properties"]["repo"]


def test_references_are_frozen() -> None:
    ref = HubRef(repo="org/x")
    with pytest.raises(ValidationError):
        ref.repo = "org/y"
    assert hash(ref) == hash(HubRef(repo="org/x"))


@pytest.mark.parametrize(
    ("text", "valid"),
    [
        ("org/name", True),
        ("name", True),
        ("Org-1/na.me_2", True),
        ("a/b/c", False),
        ("org/.name", False),
        ("org/name-", False),
        ("org/a--b", False),
        ("org/a..b", False),
        ("org/name.git", False),
        ("org/" + "x" * 97, False),
        ("café/x", False),
    ],
)
def test_repo_id_grammar(text: str, valid: bool) -> None:
    assert is_hub_repo_id(text) is valid
