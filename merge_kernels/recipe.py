"""The merge recipe: one document, YAML for the CLI and JSON for HTTP.

Its keys follow mergekit's configuration (``merge_method``, ``base_model``,
``models: [{model, parameters}]``, ``parameters``, ``dtype``, ``out_dtype``,
``tokenizer_source``, ``tokenizer``, ``chat_template``, layer stacking with ``slices`` and
multi-module models with ``modules``), so a mergekit config for a supported method is
accepted unchanged. tureen adds ``seed`` (DARE's masks), ``reference`` (whose defaults unset
options follow), ``compute_dtype`` (float32 math, or mergekit's in ``dtype``),
``allow_non_finite`` (write a merge whose tensors hold NaN or infinities
instead of failing), ``name`` (a document's name in a multi-document file, see
:mod:`merge_kernels.multi_merge`) and ``strict``. Every error names the field and says what
is allowed; parameter numbers must be finite. Where mergekit is lenient (a parameter the
method does not use, the base's own parameters, a missing ``density``) the recipe is
accepted with warnings (:meth:`Recipe.warnings`); ``strict: true`` makes each of them an
error. Misspelled keys and parameter names no method knows are always errors.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ModelWrapValidatorHandler,
    PrivateAttr,
    ValidationError,
    ValidationInfo,
    model_validator,
)

from merge_kernels.checkpoints.reference import HubRef, LocalRef, LoraRef
from merge_kernels.errors import RecipeError
from merge_kernels.methods.kernel import Reference
from merge_kernels.misplaced_keys import KeyLayout, remove_misplaced_keys
from merge_kernels.parameter_names import (
    RecipeWarnings,
    check_assumed_density,
    check_parameter_names,
)
from merge_kernels.parameter_settings import Parameters
from merge_kernels.registry import MethodSpec, get_method
from merge_kernels.suggestions import did_you_mean
from merge_kernels.tokenizer_settings import TokenizerSettings, check_tokenizer_fields

DType = Literal["float32", "float16", "bfloat16"]
_DTYPE_ALIASES = {
    "float32": "float32",
    "fp32": "float32",
    "f32": "float32",
    "float": "float32",
    "float16": "float16",
    "fp16": "float16",
    "f16": "float16",
    "half": "float16",
    "bfloat16": "bfloat16",
    "bf16": "bfloat16",
}

ModelReference = str | LocalRef | HubRef | LoraRef

_STRICT = ConfigDict(frozen=True, extra="forbid")


class ModelEntry(BaseModel):
    """One input model and its own parameters."""

    model_config = _STRICT

    model: ModelReference = Field(description="Local path, 'org/name[@rev]', 'base+adapter'.")
    parameters: Parameters | None = Field(None, description="This model's parameters.")


class SliceSource(BaseModel):
    """One source of a mergekit slice: layers ``[first, end)`` of one model."""

    model_config = _STRICT

    model: ModelReference
    layer_range: tuple[int, int]
    parameters: Parameters | None = None


class SliceDefinition(BaseModel):
    """A mergekit output slice."""

    model_config = _STRICT

    sources: list[SliceSource]
    base_model: ModelReference | None = None
    parameters: Parameters | None = None


class ModuleDefinition(BaseModel):
    """One module of a multi-module model (mergekit's ``modules``): its slices or models."""

    model_config = _STRICT

    slices: list[SliceDefinition] | None = None
    models: list[ModelEntry] | None = None
    parameters: Parameters | None = None

    @model_validator(mode="after")
    def _one_form(self) -> ModuleDefinition:
        if bool(self.slices) == bool(self.models):
            raise ValueError("give either `slices` or `models` for the module (one of them)")
        return self


class Recipe(BaseModel):
    """A merge recipe.

    After validation exactly one of ``models``, ``slices`` and ``modules`` is set. One slice
    whose sources share a layer range is turned into ``models`` (its slice-level parameters
    are kept in ``slice_parameters``, its range in ``layer_range``); the plan stacks it like
    any slice when that range is not every layer.
    """

    model_config = _STRICT

    merge_method: str = Field(description="A registered method name (GET /v1/methods).")
    base_model: ModelReference | None = Field(
        None, description="The model the others were fine-tuned from (task-vector methods)."
    )
    models: list[ModelEntry] | None = Field(None, description="The models to merge.")
    slices: list[SliceDefinition] | None = Field(
        None, description="mergekit's slices: output layers stacked from layer ranges of models."
    )
    modules: dict[str, ModuleDefinition] | None = Field(
        None, description="mergekit's modules: per module (e.g. text_decoder), slices or models."
    )
    parameters: Parameters | None = Field(None, description="Parameters for every model/tensor.")
    slice_parameters: Parameters | None = Field(
        None, description="Parameters of the single slice (filled from `slices`)."
    )
    layer_range: tuple[int, int] | None = Field(
        None, description="The slice's layer range (filled from `slices`), checked by the plan."
    )
    dtype: str | None = Field(
        None,
        description="The output's dtype when out_dtype is unset; with compute_dtype: dtype "
        "also the dtype inputs are converted to and merged in.",
    )
    out_dtype: str | None = Field(None, description="Dtype of the merged tensors.")
    tokenizer_source: ModelReference | None = Field(
        None,
        description="`base`, `union` or a model: build the output vocabulary from it and "
        "align every input's embedding rows (unset: the first input's tokenizer is copied).",
    )
    tokenizer: TokenizerSettings | None = Field(
        None, description="mergekit's tokenizer block: source, per-token overrides, padding."
    )
    chat_template: str | None = Field(
        None, description="A template name (chatml, llama3, ..., auto) or a Jinja template."
    )
    seed: int = Field(0, ge=0, description="Seed of DARE's random masks.")
    compute_dtype: Literal["float32", "dtype"] | None = Field(
        None,
        description="What the kernels compute in: `float32` (inputs widened, one rounding "
        "to the output dtype) or `dtype` (inputs converted to `dtype`, or kept in their "
        "stored dtype when it is unset, and each method computed in mergekit's precision and "
        "order). Unset: `dtype` with reference mergekit, else `float32`.",
    )
    reference: Reference = Field(
        "peft", description="Whose defaults unset options follow: peft, mergekit or paper."
    )
    allow_non_finite: bool = Field(
        False,
        description="Write the merge even if a merged tensor holds NaN or infinities "
        "(by default the merge fails naming the tensor, with code non_finite_output).",
    )
    evaluator: dict[str, Any] | None = Field(
        None,
        description="How candidates are scored (greedy_soup needs one; with another method "
        "the merge and each input are scored). Validated by the evaluator that runs it.",
    )
    name: str | None = Field(
        None,
        description="The merge's name (mergekit-multimerge): in a multi-document file, later "
        "documents may use it as a model reference. Ignored in a single recipe.",
    )
    strict: bool = Field(
        False,
        description="Refuse what is otherwise accepted with a warning: parameters the method "
        "does not use, the base's parameters, an assumed density, known keys where mergekit "
        "ignores them.",
    )
    _warnings: tuple[str, ...] = PrivateAttr(default=())
    _base_dir: str | None = PrivateAttr(default=None)

    @model_validator(mode="before")
    @classmethod
    def _from_single_slice(cls, data: Any) -> Any:
        if not isinstance(data, Mapping):
            return data
        given = [key for key in ("models", "slices", "modules") if data.get(key)]
        if len(given) > 1:
            both = " and ".join(given)
            raise RecipeError(
                given[1], f"give exactly one of models, slices or modules, not {both}"
            )
        if not data.get("slices"):
            return data
        from merge_kernels.slices import check_slice_documents

        slices = data["slices"]
        check_slice_documents("slices", slices)
        sources = slices[0]["sources"]
        ranges = {tuple(source["layer_range"]) for source in sources}
        if len(slices) != 1 or len(ranges) != 1:
            return data  # layer stacking: kept as slices
        slice_ = slices[0]
        converted = {key: value for key, value in data.items() if key != "slices"}
        converted["models"] = [
            {key: value for key, value in source.items() if key != "layer_range"}
            for source in sources
        ]
        converted["layer_range"] = ranges.pop()
        if slice_.get("parameters"):
            converted["slice_parameters"] = slice_["parameters"]
        if slice_.get("base_model") is not None:
            converted.setdefault("base_model", slice_["base_model"])
        return converted

    @model_validator(mode="after")
    def _check(self, info: ValidationInfo) -> Recipe:
        context = info.context if isinstance(info.context, Mapping) else {}
        if context.get("base_dir") is not None:
            self._base_dir = str(context["base_dir"])
        spec = get_method(self.merge_method)
        if not (self.models or self.slices or self.modules):
            raise RecipeError("models", "list at least one model to merge")
        for field in ("dtype", "out_dtype"):
            value = getattr(self, field)
            if value is not None and value not in _DTYPE_ALIASES:
                raise RecipeError(
                    field,
                    f"unknown dtype {value!r}; allowed: float32, float16, bfloat16 "
                    "(or fp32, fp16, bf16)",
                )
        check_tokenizer_fields(self)
        warnings = RecipeWarnings(self.strict)
        self._check_inputs(spec)
        self._check_parameter_names(spec, warnings)
        self._check_parameter_values()
        self._warnings = tuple(warnings.items)
        return self

    @model_validator(mode="wrap")
    @classmethod
    def _without_misplaced_keys(
        cls, data: Any, handler: ModelWrapValidatorHandler[Recipe], info: ValidationInfo
    ) -> Recipe:
        # Defined last, so it wraps every other validator: the keys mergekit ignores
        # where they stand are taken out (with a warning each) before anything is checked.
        if not isinstance(data, Mapping):
            return handler(data)
        context = info.context if isinstance(info.context, Mapping) else {}
        data, found = remove_misplaced_keys(data, _key_layout(), context)
        recipe = handler(data)
        if found:
            warnings = RecipeWarnings(recipe.strict)
            for field, message in found:
                warnings.add(field, message)
            recipe._warnings = (*warnings.items, *recipe._warnings)
        return recipe

    def warnings(self) -> list[str]:
        """What the recipe got away with (``field: message``), as mergekit would accept it.

        Not part of the fingerprint: they follow from the recipe, and change nothing merged.
        """
        return list(self._warnings)

    def _check_parameter_values(self) -> None:
        # Every written value is checked here; the plan resolves every real tensor again.
        from merge_kernels.tensor_parameters import check_parameter_values

        check_parameter_values(self)

    def _check_inputs(self, spec: MethodSpec) -> None:
        if self.slices or self.modules:
            from merge_kernels.slices import check_structure

            check_structure(self, spec)  # per slice, as mergekit checks each slice's inputs
            return
        if spec.needs_base and self.base_model is None:
            raise RecipeError(
                "base_model",
                f"{spec.name} merges task vectors (model − base), so it needs base_model: "
                "the checkpoint the models were fine-tuned from",
            )
        count = len(self.merged_models())
        if count == 0 and self.base_only():
            return  # the output is the base itself (a LoRA base: the adapter baked in)
        if spec.name == "slerp" and count != 1:
            raise RecipeError(
                "models",
                f"slerp interpolates exactly two models: base_model and one other; got "
                f"base_model and {count} others",
            )
        # Without a base role of its own, a given base_model is one of the counted inputs.
        counted = "models besides the base" if spec.takes_base else "models (base_model included)"
        if count < spec.min_models:
            raise RecipeError("models", f"{spec.name} needs at least {spec.min_models} {counted}")
        if spec.max_models is not None and count > spec.max_models:
            raise RecipeError("models", f"{spec.name} takes at most {spec.max_models} {counted}")

    def _check_parameter_names(self, spec: MethodSpec, warnings: RecipeWarnings) -> None:
        check_parameter_names(self, spec, warnings)
        check_assumed_density(self, spec, warnings)

    @property
    def method(self) -> MethodSpec:
        """The registered method this recipe uses."""
        return get_method(self.merge_method)

    def merged_models(self) -> list[tuple[int, ModelEntry]]:
        """The models merged besides the base, with their index in ``models``.

        For methods without a base the base (when given) is an input like any other, as in
        mergekit: it is used from ``models`` if listed there, else appended. For methods
        whose base is optional a given base is the base, never one of the merged models.
        """
        entries = list(enumerate(self.models or []))
        if self.method.takes_base:
            return [(i, e) for i, e in entries if not self.is_base(e.model)]
        listed = any(self.is_base(e.model) for _, e in entries)
        if self.base_model is not None and not listed:
            entries.append((len(entries), ModelEntry(model=self.base_model)))
        return entries

    def is_base(self, reference: ModelReference) -> bool:
        """Whether ``reference`` names ``base_model``, however spelled: string or object
        form, ``./base/`` for ``base``, a relative path for the absolute one (relative to
        the folder the recipe was validated with)."""
        if self.base_model is None:
            return False
        return _canonical(reference, self._base_dir) == _canonical(self.base_model, self._base_dir)

    def base_only(self) -> bool:
        """Whether the merge's only input is its base (listed in ``models``, nothing else).

        As in mergekit, a task-vector method (one with a base and no fixed number of
        models) then writes the base unchanged; for a ``base+adapter`` base, that is the
        adapter merged into its base model.
        """
        spec = self.method
        return (
            spec.needs_base
            and spec.max_models is None
            and spec.min_models <= 1
            and bool(self.models)
            and not self.merged_models()
        )

    def output_dtype(self) -> str | None:
        """``out_dtype``, else ``dtype``, canonical; None means the base's dtype."""
        value = self.out_dtype or self.dtype
        return _DTYPE_ALIASES[value] if value is not None else None

    def fingerprint(self) -> str:
        """A stable hash of the recipe's meaning (key order and formatting ignored)."""
        # `name` and `strict` change nothing merged; a renamed recipe is the same merge.
        meaning = self.model_dump(mode="json", exclude={"name", "strict"})
        canonical = json.dumps(meaning, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()

    def to_yaml(self) -> str:
        """The recipe as YAML, without unset keys."""
        return yaml.safe_dump(
            self.model_dump(mode="json", exclude_none=True, exclude_defaults=True, by_alias=True),
            sort_keys=False,
        )


def _key_layout() -> KeyLayout:
    def keys(model: type[BaseModel]) -> frozenset[str]:
        return frozenset(info.alias or name for name, info in model.model_fields.items())

    return KeyLayout(
        recipe=keys(Recipe),
        model=keys(ModelEntry),
        source=keys(SliceSource),
        slice=keys(SliceDefinition),
        module=keys(ModuleDefinition),
        tokenizer=keys(TokenizerSettings),
    )


def _canonical(reference: ModelReference, base_dir: str | None) -> str:
    # Each side of `base+adapter` as a normalized path. A Hub id is joined to base_dir as
    # well, on both sides alike, so it still equals itself (and equals the local folder
    # of that name, which is what a reference resolves to when that folder exists).
    sides = []
    for side in str(reference).split("+", 1):
        text = os.path.expanduser(side.strip())
        if base_dir is not None and text:
            text = os.path.join(base_dir, text)
        sides.append(os.path.normpath(text) if text else text)
    return "+".join(sides)


def parse_recipe(document: Mapping[str, Any], *, base_dir: Path | None = None) -> Recipe:
    """Validate a recipe document (already parsed from YAML or JSON).

    Args:
        document: the parsed document.
        base_dir: folder that relative local paths in object-form references are
            relative to (string references are resolved when the checkpoints are opened).

    Raises:
        RecipeError: the first problem, naming its field; ``details['errors']`` lists all.
    """
    try:
        context = {"base_dir": str(base_dir)} if base_dir is not None else None
        return Recipe.model_validate(document, context=context)
    except ValidationError as error:
        errors = error.errors()
        problems = [f"{_field_path(e['loc'])}: {e['msg']}" for e in errors]
        # A misspelled key also makes its field "required": name the misspelling first.
        first = min(errors, key=lambda e: e["type"] != "extra_forbidden")
        message = first["msg"]
        if first["type"] == "extra_forbidden":
            layout = _key_layout()
            keys = layout.recipe if len(first["loc"]) == 1 else layout.nested()
            message = f"unknown key; {did_you_mean(str(first['loc'][-1]), keys)}".rstrip("; ")
        raise RecipeError(
            _field_path(first["loc"]), message, details={"errors": problems}
        ) from None


def load_recipe(path: Path) -> Recipe:
    """Read and validate a YAML (or JSON) recipe file.

    Raises:
        RecipeError: unreadable file, invalid YAML, or an invalid recipe.
    """
    try:
        document = yaml.safe_load(path.read_text())
    except OSError as error:
        raise RecipeError("recipe", f"cannot read {path}: {error.strerror}") from None
    except yaml.YAMLError as error:
        raise RecipeError("recipe", f"{path} is not valid YAML: {error}") from None
    if not isinstance(document, Mapping):
        raise RecipeError("recipe", f"{path} must hold a mapping with merge_method, models, ...")
    return parse_recipe(document, base_dir=path.resolve().parent)


def _field_path(loc: tuple[int | str, ...]) -> str:
    path = ""
    for part in loc:
        if isinstance(part, int):
            path += f"[{part}]"
        elif part in ("str", "LocalRef", "HubRef", "LoraRef") or "[" in part:
            continue  # union branch names pydantic puts in the location
        else:
            path += f".{part}" if path else part
    return path or "recipe"
