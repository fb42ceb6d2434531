"""Request and response models of the HTTP API.

The merge request body is documented as a union discriminated by ``merge_method``, built
from the method registry: one model per method whose ``parameters`` and
``models[].parameters`` list that method's own parameters, each value a scalar, a gradient
across the layers or a filtered list. These models document the API (``openapi.yaml``);
the body itself is validated by :func:`merge_kernels.recipe.parse_recipe`, which holds the
real semantics and names the offending field in its errors.
"""

from __future__ import annotations

import keyword
import types
from functools import cache
from typing import Annotated, Any, Literal, Union, get_args, get_origin

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, create_model
from pydantic.fields import FieldInfo

from merge_kernels.checkpoints.reference import HubRef, LocalRef, LoraRef
from merge_kernels.registry import MethodSpec, methods
from service.evaluation.config import EvaluatorConfig
from service.jobs.models import Job, OutputOptions

_FORBID = ConfigDict(extra="forbid")

DTypeName = Literal[
    "float32", "fp32", "f32", "float", "float16", "fp16", "f16", "half", "bfloat16", "bf16"
]

ModelReferenceDoc = Annotated[
    str | LocalRef | HubRef | LoraRef,
    Field(
        description="A checkpoint: a local folder inside the service's allowed roots, "
        "'org/name[@revision]' on the Hub, 'base+adapter' (LoRA), or an object form."
    ),
]


def _camel(name: str) -> str:
    return "".join(part[:1].upper() + part[1:] for part in name.replace("-", "_").split("_"))


def _python_name(alias: str) -> str:
    return f"{alias}_" if keyword.iskeyword(alias) or not alias.isidentifier() else alias


def _without_none(annotation: Any) -> Any:
    if get_origin(annotation) in (Union, types.UnionType):
        kept = tuple(arg for arg in get_args(annotation) if arg is not type(None))
        if len(kept) == 1:
            return kept[0]
        return Union[kept]  # noqa: UP007 - built from a runtime tuple
    return annotation


def _model(name: str, doc: str, fields: dict[str, Any]) -> type[BaseModel]:
    """A strict model built at run time (``fields``: name -> (type, default or Field))."""
    return create_model(name, __config__=_FORBID, __doc__=doc, **fields)


def _setting_type(prefix: str, alias: str, info: FieldInfo) -> Any:
    """The type of one parameter's value: scalar, gradient or filtered list."""
    value: Any = _without_none(info.annotation)
    if info.metadata:
        value = Annotated[(value, *info.metadata)]
    filtered = _model(
        f"{prefix}{_camel(alias)}Filtered",
        f"One entry of a filtered list for `{alias}`: the first entry whose filter is a "
        "substring of the tensor name (or is absent or `*`) gives the value.",
        {
            "filter": (str | None, Field(None, description="Substring of tensor names, or `*`.")),
            "value": (value | list[value], Field(description="A value or a gradient.")),
        },
    )
    return value | list[value] | list[filtered]  # type: ignore[valid-type]


def _parameters_model(
    name: str, doc: str, prefix: str, sources: tuple[type[BaseModel], ...]
) -> type[BaseModel]:
    fields: dict[str, Any] = {}
    for source in sources:
        for field_name, info in source.model_fields.items():
            alias = info.alias or field_name
            default = "required" if info.is_required() else f"default {info.default!r}"
            text = (info.description or alias).rstrip(".")
            fields[_python_name(alias)] = (
                _setting_type(prefix, alias, info) | None,
                Field(None, alias=alias, description=f"{text} ({default})."),
            )
    return _model(name, doc, fields)


def _recipe_model(spec: MethodSpec) -> type[BaseModel]:
    prefix = _camel(spec.name)
    whole = _parameters_model(
        f"{prefix}Parameters",
        f"Parameters of {spec.name} for every model and tensor: the whole-merge parameters "
        "and defaults of the per-model ones.",
        prefix,
        (spec.params, spec.model_params),
    )
    per_model = _parameters_model(
        f"{prefix}ModelParameters",
        f"Per-model parameters of {spec.name}.",
        prefix,
        (spec.model_params,),
    )
    entry = _model(
        f"{prefix}ModelEntry",
        "One input model and its own parameters.",
        {"model": (ModelReferenceDoc, ...), "parameters": (per_model | None, None)},
    )
    source = _model(
        f"{prefix}SliceSource",
        "One source of a mergekit slice: layers [first, end) of one model.",
        {
            "model": (ModelReferenceDoc, ...),
            "layer_range": (tuple[int, int], ...),
            "parameters": (per_model | None, None),
        },
    )
    slice_model = _model(
        f"{prefix}Slice",
        "mergekit's slice: output layers merged from equally long layer ranges of models.",
        {
            "sources": (list[source], ...),  # type: ignore[valid-type]
            "base_model": (ModelReferenceDoc | None, None),
            "parameters": (whole | None, None),
        },
    )
    module_model = _model(
        f"{prefix}Module",
        "One module of a multi-module model (mergekit's modules): its slices or its models.",
        {
            "slices": (list[slice_model] | None, None),  # type: ignore[valid-type]
            "models": (list[entry] | None, None),  # type: ignore[valid-type]
            "parameters": (whole | None, None),
        },
    )
    base_note = "required" if spec.needs_base else "optional; merged like any other model"
    if spec.optional_base:
        base_note = "optional; when given, the models are merged relative to it"
    fields: dict[str, Any] = {
        "merge_method": (Literal[spec.name], Field(description=spec.title)),
        "base_model": (
            ModelReferenceDoc | None,
            Field(None, description=f"The model the others were fine-tuned from ({base_note})."),
        ),
        "models": (list[entry] | None, Field(None, description="The models to merge.")),  # type: ignore[valid-type]
        "slices": (list[slice_model] | None, Field(None, description="Instead of `models`.")),  # type: ignore[valid-type]
        "modules": (
            dict[str, module_model] | None,  # type: ignore[valid-type]
            Field(None, description="Instead of `models` or `slices`: per module."),
        ),
        "parameters": (whole | None, None),
        "dtype": (
            DTypeName | None,
            Field(None, description="The output's dtype if out_dtype is unset; see compute_dtype."),
        ),
        "out_dtype": (DTypeName | None, Field(None, description="Dtype of the merged tensors.")),
        "tokenizer_source": (
            ModelReferenceDoc | None,
            Field(None, description="`base` (default) or a model whose tokenizer is copied."),
        ),
        "seed": (int, Field(0, ge=0, description="Seed of DARE's random masks.")),
        "compute_dtype": (
            Literal["float32", "dtype"] | None,
            Field(
                None,
                description="`float32` (default) or `dtype`: merge in `dtype` as mergekit "
                "does (the default with reference mergekit).",
            ),
        ),
        "reference": (
            Literal["peft", "mergekit", "paper"],
            Field("peft", description="Whose defaults unset options follow."),
        ),
        "allow_non_finite": (
            bool,
            Field(
                False,
                description="Write the merge even if a merged tensor holds NaN or infinities "
                "(by default the job fails with code non_finite_output, naming the tensor).",
            ),
        ),
        "evaluator": (
            EvaluatorConfig | None,
            Field(
                None,
                description="How candidates are scored: required by greedy_soup; with another "
                "method the merge and each input are scored and compared.",
            ),
        ),
        "output": (
            OutputOptions | None,
            Field(None, description="Where and how to write the result (not for plans)."),
        ),
        "name": (
            str | None,
            Field(
                None,
                description="In a multi-document recipe, the merge's name (letters, digits, "
                "`_`, `-` and `.`, up to 128, not starting with `-` or `.`): other recipes "
                "may use it as a model. The final merge has none. Ignored in a single recipe.",
            ),
        ),
    }
    return _model(f"{prefix}Recipe", f"A {spec.title} recipe ({spec.paper}).", fields)


@cache
def merge_request_adapter() -> TypeAdapter[Any]:
    """A type adapter of the request body union, one branch per registered method."""
    branches: tuple[Any, ...] = tuple(_recipe_model(spec) for spec in methods())
    union: Any = Annotated[Union[branches], Field(discriminator="merge_method")]  # noqa: UP007
    return TypeAdapter(union)


_NOT_NULL = {"not": {"type": "null"}}
#: The recipe validator's input rules: at least one model, listed under ``models``, in
#: ``slices`` (mergekit's layer stacking) or in ``modules``.
_INPUTS_RULE: dict[str, Any] = {
    "anyOf": [
        {"required": ["models"], "properties": {"models": {"type": "array", "minItems": 1}}},
        {
            "required": ["slices"],
            "properties": {
                "slices": {
                    "type": "array",
                    "minItems": 1,
                    "items": {"properties": {"sources": {"minItems": 1}}},
                }
            },
        },
        {
            "required": ["modules"],
            "properties": {"modules": {"type": "object", "minProperties": 1}},
        },
    ]
}
#: ...and a base model, for the methods that need one, given at the top or in the slice.
_BASE_RULE: dict[str, Any] = {
    "anyOf": [
        {"required": ["base_model"], "properties": {"base_model": _NOT_NULL}},
        {
            "required": ["slices"],
            "properties": {
                "slices": {
                    "type": "array",
                    "items": {"required": ["base_model"], "properties": {"base_model": _NOT_NULL}},
                }
            },
        },
    ]
}


def merge_request_schema(ref_template: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """The request body's JSON schema and its definitions, refs built by ``ref_template``.

    Each method's branch also states the rules the recipe validator applies across fields
    (inputs given, base given when needed), so that every body the schema allows can pass
    validation as far as its shape goes.
    """
    schema = merge_request_adapter().json_schema(ref_template=ref_template, by_alias=True)
    definitions = schema.pop("$defs", {})
    needs_base = {spec.name: spec.needs_base for spec in methods()}
    for definition in definitions.values():
        method = definition.get("properties", {}).get("merge_method", {}).get("const")
        if method in needs_base:
            rules = [_INPUTS_RULE, _BASE_RULE] if needs_base[method] else [_INPUTS_RULE]
            definition["allOf"] = [dict(rule) for rule in rules]
    definitions[MULTI_MERGE_REQUEST_SCHEMA_NAME] = _multi_merge_request_schema(
        ref_template.format(model=MERGE_REQUEST_SCHEMA_NAME),
        ref_template.format(model=OutputOptions.__name__),
    )
    return schema, definitions


def _multi_merge_request_schema(recipe_ref: str, output_ref: str) -> dict[str, Any]:
    return {
        "title": MULTI_MERGE_REQUEST_SCHEMA_NAME,
        "description": "Several merges as one job (mergekit-multimerge), the JSON form of a "
        "multi-document YAML recipe. A recipe with a `name` may be another's model "
        "(`model: name`, `name+adapter`); the one without a name (or, if all have one, the "
        "one no other reads) is the final merge, whose output is the job's. The others are "
        "intermediates, private to the job. `output` may instead be given in the final recipe.",
        "type": "object",
        "properties": {
            "merges": {
                "type": "array",
                "minItems": 2,
                "items": {"$ref": recipe_ref},
                "description": "The recipes, in any order: they run in dependency order.",
            },
            "output": {"$ref": output_ref},
        },
        "required": ["merges"],
        "additionalProperties": False,
    }


class JobList(BaseModel):
    """One page of jobs, newest first."""

    items: list[Job]
    total: int = Field(description="Jobs matching the filter, on every page.")
    limit: int
    offset: int


class OutputFile(BaseModel):
    """One file of a merge's output."""

    name: str = Field(description="Path relative to the output folder.")
    bytes: int
    sha256: str | None = Field(None, description="Hex digest, when asked for (`?sha256=true`).")


class FileList(BaseModel):
    """The files of a succeeded merge."""

    job_id: str
    files: list[OutputFile]


class MethodInfo(BaseModel):
    """One registered merge method and the JSON Schema of its parameters."""

    name: str
    title: str
    paper: str
    description: str
    needs_base: bool
    needs_evaluation: bool = Field(
        description="Chooses its inputs by scoring candidates (needs an evaluator)."
    )
    min_models: int
    max_models: int | None
    parameters: dict[str, Any] = Field(description="JSON Schema of the whole-merge parameters.")
    model_parameters: dict[str, Any] = Field(description="JSON Schema of per-model parameters.")
    references: dict[str, dict[str, Any]] = Field(
        description="Per reference implementation, the defaults that reproduce it."
    )


class PlanInput(BaseModel):
    """One input checkpoint of a plan."""

    role: str = Field(description="base or model")
    recipe_index: int | None
    reference: str
    revision: str | None
    tensors: int
    bytes: int


class PlanShard(BaseModel):
    """One planned output shard."""

    filename: str
    tensors: int
    bytes: int


class PlanOutput(BaseModel):
    """What the merge would write."""

    tensors: int
    bytes: int
    tie_word_embeddings: bool
    chunked_tensors: int
    shards: list[PlanShard]


class PlanReport(BaseModel):
    """A merge planned from configs and headers alone."""

    model_config = ConfigDict(extra="allow")

    merge_method: str
    ok: bool
    problems: list[str]
    notes: list[str]
    warnings: list[str] = Field(
        default_factory=list,
        description="What the recipe gets away with, as mergekit accepts it (`field: "
        "message`): parameters the method does not use, an assumed density. `strict: true` "
        "in the recipe makes each an error.",
    )
    inputs: list[PlanInput]
    output: PlanOutput
    peak_memory_bytes_estimate: int


class StagePlan(BaseModel):
    """The plan of one stage of a multi-document recipe."""

    index: int = Field(description="The recipe's position in the request (`merges[i]`).")
    name: str | None = Field(None, description="The recipe's `name`; none for the final one.")
    final: bool = Field(description="Whether this merge writes the job's output.")
    reads: list[str] = Field(description="Names of the stages whose outputs it reads.")
    plan: PlanReport | None = Field(
        description="Its plan; null for a stage that reads another's output, planned only "
        "when the job runs it (its inputs do not exist before)."
    )


class MultiPlanReport(BaseModel):
    """The plans of a multi-document recipe's stages, in the order they would run."""

    ok: bool
    stages: list[StagePlan]
    warnings: list[str] = Field(
        default_factory=list,
        description="Every stage's recipe warnings, each prefixed with the stage's name.",
    )


class Health(BaseModel):
    """Liveness."""

    status: Literal["ok"] = "ok"


class Readiness(BaseModel):
    """Readiness: every check must pass."""

    status: Literal["ready", "not_ready"]
    checks: dict[str, bool] = Field(description="database, data_dir, dispatcher")


class ProgressEvent(BaseModel):
    """Data of an SSE `progress` event (a `status` event carries the whole Job)."""

    id: str
    status: str
    progress: dict[str, Any]


MERGE_REQUEST_SCHEMA_NAME = "MergeRequest"
MULTI_MERGE_REQUEST_SCHEMA_NAME = "MultiMergeRequest"


def recipe_body_openapi(description: str) -> dict[str, Any]:
    """``openapi_extra`` documenting a recipe body, as JSON or YAML: one recipe, or several
    (a multi-document recipe)."""
    schema = {
        "oneOf": [
            {"$ref": f"#/components/schemas/{MERGE_REQUEST_SCHEMA_NAME}"},
            {"$ref": f"#/components/schemas/{MULTI_MERGE_REQUEST_SCHEMA_NAME}"},
        ]
    }
    return {
        "requestBody": {
            "required": True,
            "description": description,
            "content": {
                "application/json": {"schema": schema},
                "application/yaml": {"schema": schema},
            },
        }
    }
