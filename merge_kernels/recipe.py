"""The merge recipe: one document, YAML for the CLI and JSON for HTTP.

Its keys follow mergekit's configuration (``merge_method``, ``base_model``,
``models: [{model, parameters}]``, ``parameters``, ``dtype``, ``out_dtype``,
``tokenizer_source``, and the single-slice form of ``slices``), so a mergekit config for a
supported method is accepted unchanged. tureen adds ``seed`` (DARE's masks),
``reference`` (whose defaults unset options follow), ``compute_dtype`` (float32 math, or
mergekit's in ``dtype``) and ``allow_non_finite`` (write a merge
whose tensors hold NaN or infinities instead of failing). Validation is strict: every error
names the field and says what is allowed; parameter numbers must be finite.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from merge_kernels.checkpoints.reference import HubRef, LocalRef, LoraRef
from merge_kernels.errors import RecipeError
from merge_kernels.methods.kernel import Reference
from merge_kernels.parameter_settings import Parameters
from merge_kernels.registry import MethodSpec, get_method
from merge_kernels.suggestions import did_you_mean

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
    """One source of a mergekit slice (only whole-model slices are supported)."""

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


class Recipe(BaseModel):
    """A merge recipe.

    After validation ``models`` is always set (a single whole-model slice is turned into
    ``models``; its slice-level parameters are kept in ``slice_parameters``).
    """

    model_config = _STRICT

    merge_method: str = Field(description="A registered method name (GET /v1/methods).")
    base_model: ModelReference | None = Field(
        None, description="The model the others were fine-tuned from (task-vector methods)."
    )
    models: list[ModelEntry] | None = Field(None, description="The models to merge.")
    slices: list[SliceDefinition] | None = Field(
        None, description="mergekit's slice form; one slice covering every layer is accepted."
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
        None, description="`base` (default) or a model reference whose tokenizer is copied."
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

    @model_validator(mode="before")
    @classmethod
    def _from_single_slice(cls, data: Any) -> Any:
        if not isinstance(data, Mapping) or not data.get("slices"):
            return data
        if data.get("models"):
            raise RecipeError("slices", "give either `models` or `slices`, not both")
        slices = data["slices"]
        if not isinstance(slices, list) or len(slices) != 1:
            raise RecipeError(
                "slices",
                "only one slice covering every layer is supported (layer stacking is not); "
                "list the inputs under `models` instead",
            )
        (slice_,) = slices
        if not isinstance(slice_, Mapping) or not isinstance(slice_.get("sources"), list):
            raise RecipeError("slices[0].sources", "a slice needs a list of sources")
        unknown = set(slice_) - {"sources", "parameters", "base_model"}
        if unknown:
            raise RecipeError("slices[0]", f"unsupported keys {sorted(unknown)}")
        sources = slice_["sources"]
        for index, source in enumerate(sources):
            if not isinstance(source, Mapping) or "model" not in source:
                raise RecipeError(
                    f"slices[0].sources[{index}]",
                    "a source is a mapping with model and layer_range",
                )
            layer_range = source.get("layer_range")
            if not (
                isinstance(layer_range, list | tuple)
                and len(layer_range) == 2
                and all(isinstance(v, int) and not isinstance(v, bool) for v in layer_range)
            ):
                raise RecipeError(
                    f"slices[0].sources[{index}].layer_range", "give [first_layer, end_layer]"
                )
        ranges = {tuple(source["layer_range"]) for source in sources}
        if len(ranges) != 1:
            raise RecipeError(
                "slices[0].sources",
                "every source must cover the same layer_range (the whole model)",
            )
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
    def _check(self) -> Recipe:
        spec = get_method(self.merge_method)
        if not self.models:
            raise RecipeError("models", "list at least one model to merge")
        for field in ("dtype", "out_dtype"):
            value = getattr(self, field)
            if value is not None and value not in _DTYPE_ALIASES:
                raise RecipeError(
                    field,
                    f"unknown dtype {value!r}; allowed: float32, float16, bfloat16 "
                    "(or fp32, fp16, bf16)",
                )
        if self.tokenizer_source == "union":
            raise RecipeError(
                "tokenizer_source",
                "'union' (merging vocabularies) is not supported; use 'base' or a model",
            )
        self._check_inputs(spec)
        self._check_parameter_names(spec)
        self._check_parameter_values()
        return self

    def _check_parameter_values(self) -> None:
        # Every written value is checked here; the plan resolves every real tensor again.
        from merge_kernels.tensor_parameters import check_parameter_values

        check_parameter_values(self)

    def _check_inputs(self, spec: MethodSpec) -> None:
        if spec.needs_base and self.base_model is None:
            raise RecipeError(
                "base_model",
                f"{spec.name} merges task vectors (model − base), so it needs base_model: "
                "the checkpoint the models were fine-tuned from",
            )
        count = len(self.merged_models())
        if spec.name == "slerp" and count != 1:
            raise RecipeError(
                "models",
                f"slerp interpolates exactly two models: base_model and one other; got "
                f"base_model and {count} others",
            )
        if count < spec.min_models:
            raise RecipeError(
                "models", f"{spec.name} needs at least {spec.min_models} models besides the base"
            )
        if spec.max_models is not None and count > spec.max_models:
            raise RecipeError(
                "models", f"{spec.name} takes at most {spec.max_models} models besides the base"
            )

    def _check_parameter_names(self, spec: MethodSpec) -> None:
        method_names = spec.method_param_names()
        model_names = spec.model_param_names()
        allowed = ", ".join(sorted(method_names | model_names)) or "none"
        for field, params in (
            ("parameters", self.parameters),
            ("slices[0].parameters", self.slice_parameters),
        ):
            for name in params or {}:
                if name not in method_names | model_names:
                    raise RecipeError(
                        f"{field}.{name}",
                        f"unknown parameter for {spec.name}; "
                        f"{did_you_mean(name, method_names | model_names)}allowed: {allowed}",
                    )
        for index, entry in enumerate(self.models or []):
            for name in entry.parameters or {}:
                field = f"models[{index}].parameters.{name}"
                if name in method_names:
                    raise RecipeError(
                        field,
                        f"{name} applies to the whole merge; move it to the top-level parameters",
                    )
                if name not in model_names:
                    per_model = ", ".join(sorted(model_names)) or "none"
                    raise RecipeError(
                        field,
                        f"unknown per-model parameter for {spec.name}; "
                        f"{did_you_mean(name, model_names)}allowed: {per_model}",
                    )

    @property
    def method(self) -> MethodSpec:
        """The registered method this recipe uses."""
        return get_method(self.merge_method)

    def merged_models(self) -> list[tuple[int, ModelEntry]]:
        """The models merged besides the base, with their index in ``models``.

        For methods without a base the base (when given) is an input like any other, as in
        mergekit: it is used from ``models`` if listed there, else appended.
        """
        entries = list(enumerate(self.models or []))
        if self.method.needs_base:
            return [(i, e) for i, e in entries if not _same(e.model, self.base_model)]
        listed = any(_same(e.model, self.base_model) for _, e in entries)
        if self.base_model is not None and not listed:
            entries.append((len(entries), ModelEntry(model=self.base_model)))
        return entries

    def output_dtype(self) -> str | None:
        """``out_dtype``, else ``dtype``, canonical; None means the base's dtype."""
        value = self.out_dtype or self.dtype
        return _DTYPE_ALIASES[value] if value is not None else None

    def fingerprint(self) -> str:
        """A stable hash of the recipe's meaning (key order and formatting ignored)."""
        canonical = json.dumps(self.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()

    def to_yaml(self) -> str:
        """The recipe as YAML, without unset keys."""
        return yaml.safe_dump(
            self.model_dump(mode="json", exclude_none=True, exclude_defaults=True, by_alias=True),
            sort_keys=False,
        )


def _same(a: ModelReference, b: ModelReference | None) -> bool:
    return b is not None and str(a) == str(b)


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
        if first["type"] == "extra_forbidden" and len(first["loc"]) == 1:
            keys = [info.alias or name for name, info in Recipe.model_fields.items()]
            message = f"unknown key; {did_you_mean(str(first['loc'][0]), keys)}".rstrip("; ")
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
