"""Keys that mergekit 0.1.5 ignores where they are written: accepted with a warning.

mergekit's configuration (``mergekit/config.py``, ``mergekit/tokenizer/config.py``,
``mergekit/common.py``) is made of pydantic models with pydantic's default
``extra="ignore"``: a key outside a model's schema is dropped silently, wherever it stands.
Published configs rely on it: ``pad_to_multiple_of`` at the top level instead of under
``tokenizer:``, ``select_topk`` at the top level instead of under ``parameters:``,
``revision:`` beside a source's ``model``. tureen refuses keys it does not know (a typo
would change a merge silently), but a key it knows, written where mergekit ignores it, is
removed before validation with a warning that says where it was found, that it has no
effect (as in mergekit) and where it would act. It is never moved there: the merge is
mergekit's.

The one exception is ``revision:`` beside the ``model`` of a model entry or slice source
that names a Hub repository: whoever wrote it meant that revision, and mergekit's default
branch is a moving target that no later run reproduces anyway, so the revision is used
(the warning says so). It is refused when the name already carries another
``@revision``. Beside a local folder or a ``base+adapter`` reference it has no effect, as
in mergekit. mergekit's object form of a reference, ``{model: NAME | {path, revision},
lora: ...}``, is read as the string form ``path@revision+lora``; ``override_architecture``
in it is refused.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from merge_kernels.checkpoints.reference import HubRef, reference_from_value
from merge_kernels.errors import RecipeError, TureenError
from merge_kernels.parameter_names import known_parameter_names
from merge_kernels.registry import MethodSpec, get_method

#: mergekit's top-level keys that are not containers of other keys' places.
TOP_LEVEL_KEYS = frozenset(
    {"merge_method", "base_model", "dtype", "out_dtype", "tokenizer_source", "tokenizer",
     "chat_template"}
)  # fmt: skip
#: What each key of the ``tokenizer:`` block does there.
TOKENIZER_KEYS = {
    "pad_to_multiple_of": "to pad the vocabulary",
    "tokens": "to choose where those tokens' rows come from",
}


@dataclass(frozen=True)
class KeyLayout:
    """The keys each place of a recipe accepts (the recipe's own pydantic models)."""

    recipe: frozenset[str]
    model: frozenset[str]
    source: frozenset[str]
    slice: frozenset[str]
    module: frozenset[str]
    tokenizer: frozenset[str]

    def nested(self) -> frozenset[str]:
        """Every key of a place below the top level."""
        return self.model | self.source | self.slice | self.module | self.tokenizer


@dataclass
class _Walk:
    layout: KeyLayout
    spec: MethodSpec | None
    base_dir: Path | None
    allowed_roots: Sequence[Path] | None
    parameters: frozenset[str] = field(default_factory=lambda: frozenset(known_parameter_names()))
    found: list[tuple[str, str]] = field(default_factory=list)

    def note(self, path: str, place: str, remedy: str) -> None:
        self.found.append((path, f"{place} it has no effect (mergekit ignores it too); {remedy}"))


def remove_misplaced_keys(
    document: Mapping[str, Any], layout: KeyLayout, context: Mapping[str, Any]
) -> tuple[dict[str, Any], list[tuple[str, str]]]:
    """The document without the known keys that stand where mergekit ignores them.

    Args:
        document: the recipe as parsed from YAML or JSON (not changed).
        layout: the keys each place accepts.
        context: the validation context (``base_dir``, ``allowed_roots``), which decides
            whether a model beside a ``revision`` is a local folder or a Hub repository.

    Returns:
        The cleaned document (a ``revision`` honoured on a Hub model is folded into its
        reference) and ``(field, message)`` warnings, the top level's first.

    Raises:
        RecipeError: a ``revision`` that contradicts the ``@revision`` of its model's name,
            or that is not a valid branch, tag or commit name.
    """
    try:
        spec: MethodSpec | None = get_method(str(document.get("merge_method")))
    except RecipeError:
        spec = None  # the recipe's own validation names the unknown method
    base_dir = context.get("base_dir")
    roots = context.get("allowed_roots")
    walk = _Walk(
        layout,
        spec,
        Path(base_dir) if base_dir is not None else None,
        [Path(root) for root in roots] if roots is not None else None,
    )
    top = _top_level(dict(document), walk)
    return top, walk.found


def _top_level(document: dict[str, Any], walk: _Walk) -> dict[str, Any]:
    place = "at the top level"
    for key in [key for key in document if key not in walk.layout.recipe]:
        if key in walk.parameters:
            walk.note(key, place, _parameter_remedy(key, None, walk.spec))
        elif key in TOKENIZER_KEYS:
            walk.note(key, place, f"put it under `tokenizer:` {TOKENIZER_KEYS[key]}")
        elif key == "source":
            walk.note(key, place, "use `tokenizer_source:`, or put it under `tokenizer:`")
        elif key == "revision":
            walk.note(key, place, "write the revision with a model, as `org/name@revision`")
        else:
            continue  # unknown: the recipe's validation refuses it with a "did you mean"
        del document[key]
    if "base_model" in document:
        document["base_model"] = _mergekit_reference(document["base_model"], "base_model", walk)
    _parameters(document, "parameters", "parameters", walk)
    _entries(document, "models", "", "model", walk)
    _entries(document, "slices", "", "slice", walk)
    modules = document.get("modules")
    if isinstance(modules, Mapping):
        document["modules"] = {
            name: _container(module, f"modules.{name}", "module", walk)
            for name, module in modules.items()
        }
    if isinstance(document.get("tokenizer"), Mapping):
        document["tokenizer"] = _container(document["tokenizer"], "tokenizer", "tokenizer", walk)
    return document


def _entries(owner: dict[str, Any], key: str, prefix: str, kind: str, walk: _Walk) -> None:
    """Clean each mapping of the list ``owner[key]`` as a ``kind`` place."""
    entries = owner.get(key)
    if isinstance(entries, list):
        owner[key] = [
            _container(entry, f"{prefix}{key}[{i}]", kind, walk) for i, entry in enumerate(entries)
        ]


def _container(value: Any, path: str, kind: str, walk: _Walk) -> Any:
    """A model entry, slice source, slice, module or tokenizer block (``kind``), cleaned."""
    if not isinstance(value, Mapping):
        return value  # the recipe's validation says what the place needs
    allowed: frozenset[str] = getattr(walk.layout, kind)
    cleaned = dict(value)
    for key in ("model", "base_model"):
        if key in cleaned and key in allowed:
            cleaned[key] = _mergekit_reference(cleaned[key], f"{path}.{key}", walk)
    place = f"in {path}"
    for key in [key for key in cleaned if key not in allowed]:
        if key == "revision" and kind in ("model", "source"):
            _revision(cleaned, path, walk)
        elif key in walk.parameters:
            home = path if "parameters" in allowed else None
            walk.note(f"{path}.{key}", place, _parameter_remedy(key, home, walk.spec))
        elif key in TOKENIZER_KEYS:
            walk.note(f"{path}.{key}", place, f"put it under `tokenizer:` {TOKENIZER_KEYS[key]}")
        elif key in TOP_LEVEL_KEYS:
            walk.note(f"{path}.{key}", place, "put it at the top level of the recipe")
        elif key == "revision":
            walk.note(f"{path}.{key}", place, "write it with a model, as `org/name@revision`")
        else:
            continue
        del cleaned[key]
    _parameters(cleaned, "parameters", f"{path}.parameters", walk)
    if kind == "module":
        _entries(cleaned, "models", f"{path}.", "model", walk)
        _entries(cleaned, "slices", f"{path}.", "slice", walk)
    elif kind == "slice":
        _entries(cleaned, "sources", f"{path}.", "source", walk)
    return cleaned


def _parameters(owner: dict[str, Any], key: str, path: str, walk: _Walk) -> None:
    # Parameter names no method knows stay for the name check, which refuses them.
    params = owner.get(key)
    if not isinstance(params, Mapping):
        return
    cleaned = dict(params)
    for name in [name for name in cleaned if name not in walk.parameters]:
        if name in TOKENIZER_KEYS:
            remedy = f"put it under `tokenizer:` {TOKENIZER_KEYS[name]}"
        elif name in TOP_LEVEL_KEYS:
            remedy = "put it at the top level of the recipe"
        else:
            continue
        walk.note(f"{path}.{name}", f"in {path}", remedy)
        del cleaned[name]
    owner[key] = cleaned


def _parameter_remedy(name: str, home: str | None, spec: MethodSpec | None) -> str:
    """Where parameter ``name`` acts: ``home.parameters`` (a model's or slice's own), or
    the top-level ``parameters``."""
    if spec is None:
        return "put it under `parameters:` for it to act"
    if name in spec.model_param_names() and home is not None:
        where = f"{home}.parameters"
    elif name in spec.method_param_names() | spec.model_param_names():
        where = "parameters"
    else:
        return f"{spec.name} does not use it anywhere"
    return f"put it under `{where}:` for {spec.name} to use it"


def _mergekit_reference(value: Any, path: str, walk: _Walk) -> Any:
    """mergekit's object form of a reference, ``{model: ..., lora: ...}`` with each side a
    name or ``{path: ..., revision: ...}``, as the string form (other values unchanged)."""
    if not isinstance(value, Mapping) or "model" not in value:
        return value
    if "override_architecture" in value:
        raise RecipeError(
            f"{path}.override_architecture",
            "not supported: tureen reads each checkpoint's architecture from its config.json",
        )
    if set(value) - {"model", "lora", "revision"}:
        return value  # the recipe's validation names what is wrong
    sides = [_model_path(value["model"], f"{path}.model", walk)]
    if value.get("lora") is not None:
        sides.append(_model_path(value["lora"], f"{path}.lora", walk))
    if any(side is None for side in sides):
        return value
    entry: dict[str, Any] = {"model": "+".join(str(side) for side in sides)}
    if "revision" in value:  # beside `model`, where mergekit ignores it
        entry["revision"] = value["revision"]
        _revision(entry, path, walk)
    return entry["model"]


def _model_path(value: Any, path: str, walk: _Walk) -> str | None:
    # mergekit's ModelPath: a name, or {path, revision}, whose revision mergekit reads.
    if isinstance(value, str):
        return value
    if not isinstance(value, Mapping) or not isinstance(value.get("path"), str):
        return None
    if set(value) - {"path", "revision"}:
        return None
    entry: dict[str, Any] = {"model": value["path"], "revision": value.get("revision")}
    if entry["revision"] is not None:
        _revision(entry, path, walk, mergekit_reads=True)
    return str(entry["model"])


def _revision(
    entry: dict[str, Any], path: str, walk: _Walk, *, mergekit_reads: bool = False
) -> None:
    """Fold ``revision`` into the entry's Hub model, or note that it has no effect.

    ``mergekit_reads``: the revision stands where mergekit reads it too (no warning then).
    """
    field_path = f"{path}.revision"
    revision = entry["revision"]
    model = entry.get("model")
    if isinstance(revision, bool) or not isinstance(revision, str | int):
        raise RecipeError(field_path, "give a branch, tag or commit name")
    revision = str(revision)
    ref = None  # unreadable: opening the model reports what is wrong with its name
    if isinstance(model, str | Mapping):
        with contextlib.suppress(TureenError):
            ref = reference_from_value(
                model, base_dir=walk.base_dir, allowed_roots=walk.allowed_roots
            )
    if not isinstance(ref, HubRef):
        reason = (
            "a local folder has no revisions"
            if ref is not None and "+" not in str(ref)
            else f"{str(model)!r} is not one Hub repository; give a Hub side its revision "
            "as `org/name@revision`"
        )
        walk.note(field_path, f"beside {path}.model", reason)
        return
    if ref.revision is not None and ref.revision != revision:
        raise RecipeError(
            field_path,
            f"revision {revision!r} contradicts the revision {ref.revision!r} in the model "
            f"name {str(model)!r}; keep one of them (as `{ref.repo}@REVISION`)",
        )
    try:
        honoured = HubRef(repo=ref.repo, revision=revision)
    except ValueError:
        raise RecipeError(
            field_path, f"{revision!r} is not a valid branch, tag or commit name"
        ) from None
    # The string form, as the warning tells to write it: the same meaning and fingerprint.
    entry["model"] = str(honoured)
    if mergekit_reads:
        return
    key = "base_model" if path.endswith("base_model") else "model"
    walk.found.append(
        (
            field_path,
            f"mergekit ignores `revision` beside a model and reads the default branch; "
            f"tureen reads {ref.repo} at revision {revision!r}, as written, so the output "
            f"can differ from mergekit's (write `{key}: {honoured}`, mergekit's way to "
            "name a revision, to silence this)",
        )
    )
