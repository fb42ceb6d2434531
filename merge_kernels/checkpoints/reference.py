"""References to checkpoints: a local folder, a Hugging Face Hub repository, or base + LoRA.

Recipes name their inputs with mergekit's string forms::

    path/to/folder            a local folder
    org/name                  a local folder if one exists there, else a Hub repository
    org/name@revision         a Hub repository at a branch, tag or commit
    base+adapter              a base model with a PEFT LoRA adapter applied (either side
                              local or Hub, each side may carry its own @revision)

or, in JSON recipes and HTTP requests, with explicit objects::

    {"path": "/models/llama"}
    {"repo": "org/name", "revision": "main"}
    {"base": {"repo": "org/name"}, "adapter": {"path": "/adapters/chat"}}

Both forms validate into a ``CheckpointRef`` subclass: ``LocalRef``, ``HubRef`` or
``LoraRef``. ``str(ref)`` is a stable display form that parses back to an equal reference,
used in error messages and model cards.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    TypeAdapter,
    ValidationError,
    ValidationInfo,
    WrapValidator,
)
from pydantic_core.core_schema import ValidatorFunctionWrapHandler

from merge_kernels.checkpoints.confinement import (
    Confinement,
    check_path_text,
    outside_roots_error,
)
from merge_kernels.errors import CheckpointNotFoundError, RecipeError

# The Hub's repository-id grammar, as huggingface_hub validates it: an optional namespace and
# a name, each 1-96 ASCII word characters, '-' or '.', starting and ending on a word
# character; '--' and '..' are forbidden and the id may not end in '.git'.
_REPO_PART = r"[A-Za-z0-9_](?:[A-Za-z0-9_.\-]{0,94}[A-Za-z0-9_])?"
_REPO_ID = re.compile(rf"(?:{_REPO_PART}/)?{_REPO_PART}")
# Branch, tag or commit names: no whitespace, and none of the characters our string form uses.
_REVISION = re.compile(r"[^\s@+]+")

REPO_ID_PATTERN = _REPO_ID.pattern
REVISION_PATTERN = _REVISION.pattern


def is_hub_repo_id(text: str) -> bool:
    """Return whether ``text`` is a well-formed Hugging Face Hub repository id.

    Args:
        text: a candidate such as ``"meta-llama/Llama-3.1-8B"``.

    Returns:
        True when the Hub would accept it as a model repository id.
    """
    return (
        len(text) <= 96 * 2 + 1
        and _REPO_ID.fullmatch(text) is not None
        and "--" not in text
        and ".." not in text
        and not text.endswith(".git")
    )


_FROZEN = ConfigDict(frozen=True, extra="forbid")


class CheckpointRef(BaseModel):
    """A reference to a checkpoint; one of ``LocalRef``, ``HubRef`` or ``LoraRef``.

    Use ``parse_reference`` for strings and ``CheckpointRefField`` (or
    ``reference_from_value``) for fields that accept either form.
    """

    model_config = _FROZEN

    def __str__(self) -> str:
        raise NotImplementedError


class LocalRef(CheckpointRef):
    """A folder on the local disk holding a checkpoint.

    A relative path is resolved against the ``base_dir`` given to ``open_checkpoint``.
    """

    path: Path = Field(description="Folder holding config.json and the weight files.")

    def __str__(self) -> str:
        return str(self.path)


class HubRef(CheckpointRef):
    """A model repository on the Hugging Face Hub, optionally at a branch, tag or commit."""

    repo: str = Field(
        description="Repository id, 'org/name' (or a bare legacy 'name').",
        pattern=rf"^{REPO_ID_PATTERN}$",
        max_length=96 * 2 + 1,
    )
    revision: str | None = Field(
        default=None,
        description="Branch, tag or commit; the default branch when omitted.",
        pattern=rf"^{REVISION_PATTERN}$",
    )

    def __str__(self) -> str:
        return self.repo if self.revision is None else f"{self.repo}@{self.revision}"


def within_roots(path: Path, roots: Sequence[Path]) -> bool:
    """Whether ``path``, with symlinks and ``..`` resolved, lies inside one of ``roots``.

    Args:
        path: an absolute path (it need not exist).
        roots: folders, resolved the same way.

    Returns:
        True when some root contains the resolved path.
    """
    return Confinement.of(roots).contains(path)


@dataclass(frozen=True)
class _Lookup:
    """Where local paths in reference strings are looked up."""

    base_dir: Path | None = None
    allowed_roots: tuple[Path, ...] | None = None

    @classmethod
    def from_context(cls, info: ValidationInfo) -> _Lookup:
        context = info.context if isinstance(info.context, Mapping) else {}
        base_dir = context.get("base_dir")
        roots = context.get("allowed_roots")
        return cls(
            base_dir=Path(base_dir) if base_dir is not None else None,
            allowed_roots=tuple(Path(r) for r in roots) if roots is not None else None,
        )

    def candidate(self, text: str) -> Path:
        """The path ``text`` names: ``~`` expanded, relative ones joined to ``base_dir``."""
        candidate = Path(text).expanduser()
        if not candidate.is_absolute():
            candidate = (self.base_dir if self.base_dir is not None else Path.cwd()) / candidate
        return candidate

    def outside_roots(self, text: str) -> bool:
        """Whether ``text`` names a path outside the allowed roots (never, without roots)."""
        if self.allowed_roots is None:
            return False
        try:
            return not within_roots(self.candidate(text), self.allowed_roots)
        except (OSError, RuntimeError, ValueError):
            return True

    def is_link(self, text: str) -> bool:
        """Whether ``text`` names a symbolic link (which may lead outside the roots)."""
        try:
            return self.candidate(text).is_symlink()
        except (OSError, RuntimeError, ValueError):
            return False

    def exists(self, text: str) -> bool:
        # Outside the allowed roots nothing "exists", so a reference cannot probe the disk.
        try:
            candidate = self.candidate(text)
            if self.allowed_roots is not None and not within_roots(candidate, self.allowed_roots):
                return False
            return candidate.exists()
        except (OSError, RuntimeError, ValueError):
            return False


def _validate_side(
    value: Any, handler: ValidatorFunctionWrapHandler, info: ValidationInfo
) -> LocalRef | HubRef:
    if isinstance(value, LocalRef | HubRef):
        return value
    if isinstance(value, str):
        text = value.strip()
        return _parse_single(text, _Lookup.from_context(info), text)
    result = handler(value)
    assert isinstance(result, LocalRef | HubRef)
    return result


_SideField = Annotated[
    LocalRef | HubRef,
    WrapValidator(_validate_side, json_schema_input_type=LocalRef | HubRef | str),
    Field(description="A local path or Hub repository: 'path', 'org/name[@rev]' or an object."),
]


class LoraRef(CheckpointRef):
    """A base model with a PEFT LoRA adapter applied to it, tensor by tensor."""

    base: _SideField = Field(description="The model the adapter was trained on.")
    adapter: _SideField = Field(
        description="Folder or repository holding adapter_config.json and adapter weights."
    )

    def __str__(self) -> str:
        return f"{self.base}+{self.adapter}"


def _looks_like_path(text: str) -> bool:
    return (
        text.startswith(("/", "./", "../", "~", "\\"))
        or text in (".", "..")
        or (
            len(text) > 1 and text[1] == ":"  # a Windows drive letter
        )
    )


def _parse_single(text: str, lookup: _Lookup, whole: str) -> LocalRef | HubRef:
    if not text:
        raise RecipeError("model", f"empty checkpoint reference in {whole!r}")
    check_path_text(text, "model")
    if lookup.exists(text):
        return LocalRef(path=Path(text).expanduser())
    if (_looks_like_path(text) or lookup.is_link(text)) and lookup.outside_roots(text):
        # Said whether or not the path exists, so that the answer reveals nothing of it.
        raise outside_roots_error(text)
    name, sep, revision = text.partition("@")
    if not _looks_like_path(text) and is_hub_repo_id(name):
        if sep and not _REVISION.fullmatch(revision):
            raise RecipeError(
                "model",
                f"{whole!r}: revision {revision!r} is not a valid branch, tag or commit name",
            )
        return HubRef(repo=name, revision=revision if sep else None)
    # The folder relative paths resolve against is not named: on a server it is private.
    where = " (relative paths are relative to the recipe's folder)" if lookup.base_dir else ""
    raise CheckpointNotFoundError(
        f"checkpoint {text!r} is neither an existing local folder{where} nor a valid Hugging "
        "Face Hub repository id ('org/name' or 'org/name@revision'); check the spelling, or "
        "give an absolute path",
        details={"reference": whole},
    )


def parse_reference(
    text: str, *, base_dir: Path | None = None, allowed_roots: Sequence[Path] | None = None
) -> CheckpointRef:
    """Parse a mergekit-style checkpoint reference string.

    A string that names an existing file or folder (absolute, or relative to ``base_dir``,
    else to the working directory) is always a local path, even if it contains ``@`` or ``+``.
    Otherwise ``base+adapter`` splits on the first ``+``, and each side is a local path if
    it exists, else a Hub repository id with an optional ``@revision``.

    Args:
        text: the reference, e.g. ``"org/name@v1.0"`` or ``"org/base+./my-lora"``.
        base_dir: folder that relative local paths are relative to.
        allowed_roots: when given, paths outside these folders count as not existing (so a
            reference cannot probe the disk; ``open_checkpoint`` refuses them anyway).

    Returns:
        A ``LocalRef``, ``HubRef`` or ``LoraRef``. Relative local paths are kept relative,
        so ``open_checkpoint`` must be given the same ``base_dir``.

    Raises:
        CheckpointNotFoundError: a side is neither an existing path nor a valid repo id.
        RecipeError: the string is empty or malformed.
    """
    lookup = _Lookup(base_dir, tuple(allowed_roots) if allowed_roots is not None else None)
    text = text.strip()
    if not text:
        raise RecipeError("model", "empty checkpoint reference")
    check_path_text(text, "model")
    if lookup.exists(text):
        return LocalRef(path=Path(text).expanduser())
    if "+" in text:
        base_text, _, adapter_text = text.partition("+")
        if "+" in adapter_text and not lookup.exists(adapter_text):
            raise RecipeError(
                "model",
                f"{text!r}: only one adapter can be applied ('base+adapter'); merge stacked "
                "adapters into the base first",
            )
        return LoraRef(
            base=_parse_single(base_text.strip(), lookup, text),
            adapter=_parse_single(adapter_text.strip(), lookup, text),
        )
    return _parse_single(text, lookup, text)


def _validate_reference(
    value: Any, handler: ValidatorFunctionWrapHandler, info: ValidationInfo
) -> CheckpointRef:
    if isinstance(value, CheckpointRef):
        return value
    if isinstance(value, str):
        lookup = _Lookup.from_context(info)
        return parse_reference(value, base_dir=lookup.base_dir, allowed_roots=lookup.allowed_roots)
    result = handler(value)
    assert isinstance(result, CheckpointRef)
    return result


#: Field type for recipes and HTTP bodies: a reference string or one of the object forms.
#: String references are parsed with ``parse_reference``, using ``base_dir`` and
#: ``allowed_roots`` from the validation context when given
#: (``Model.model_validate(data, context={"base_dir": ..., "allowed_roots": [...]})``).
CheckpointRefField = Annotated[
    LocalRef | HubRef | LoraRef,
    WrapValidator(_validate_reference, json_schema_input_type=LocalRef | HubRef | LoraRef | str),
    Field(description="A checkpoint: 'path', 'org/name[@rev]', 'base+adapter', or an object."),
]


_OBJECT_ADAPTER: TypeAdapter[LocalRef | HubRef | LoraRef] = TypeAdapter(LocalRef | HubRef | LoraRef)


def reference_from_value(
    value: str | Mapping[str, object] | CheckpointRef,
    *,
    base_dir: Path | None = None,
    allowed_roots: Sequence[Path] | None = None,
) -> CheckpointRef:
    """Turn a reference string, object form or existing reference into a ``CheckpointRef``.

    Args:
        value: a string (see ``parse_reference``), a mapping with ``path``, ``repo`` (and
            ``revision``) or ``base`` and ``adapter`` keys, or a reference.
        base_dir: folder that relative local path strings are relative to.
        allowed_roots: see ``parse_reference``.

    Returns:
        The reference.

    Raises:
        CheckpointNotFoundError: a string names neither an existing path nor a repo id.
        RecipeError: the value is malformed; ``details['field']`` is ``"model"``.
    """
    if isinstance(value, CheckpointRef):
        return value
    if isinstance(value, str):
        return parse_reference(value, base_dir=base_dir, allowed_roots=allowed_roots)
    try:
        return _OBJECT_ADAPTER.validate_python(
            dict(value), context={"base_dir": base_dir, "allowed_roots": allowed_roots}
        )
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(part) for part in error['loc'])}: {error['msg']}"
            for error in exc.errors(include_url=False)
        )
        raise RecipeError(
            "model",
            "a checkpoint object needs exactly one of the forms {'path': ...}, "
            "{'repo': ..., 'revision': ...} or {'base': ..., 'adapter': ...} "
            f"({problems})",
        ) from None
