"""Planning a merge from configs and safetensors headers alone, before any tensor data is read.

The plan checks the inputs against each other (missing tensors, shapes, vocabulary sizes),
resolves every tensor's parameters, decides the output dtype, row chunks and shards, and
estimates peak memory. Every incompatibility is reported here, one by one.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from merge_kernels.checkpoints.base import Checkpoint
from merge_kernels.errors import IncompatibleCheckpointsError
from merge_kernels.io.dtypes import itemsize
from merge_kernels.io.safetensors_header import TensorEntry
from merge_kernels.io.shard_plan import OutputTensor, ShardSpec, index_json, plan_shards
from merge_kernels.layer_map import LayerMap
from merge_kernels.methods.compute_dtype import result_dtype
from merge_kernels.parameter_settings import layer_position
from merge_kernels.recipe import Recipe
from merge_kernels.registry import MethodSpec
from merge_kernels.tensor_parameters import TensorParameters, resolve_parameters

if TYPE_CHECKING:
    from merge_kernels.embedding_rows import RowMap
    from merge_kernels.vocabulary_plan import VocabularyPlan

DEFAULT_SHARD_BYTES = 5 * 1000**3
DEFAULT_CHUNK_ELEMENTS = 4 * 1024 * 1024
DEFAULT_WHOLE_TRIM_ELEMENTS = 64 * 1024 * 1024
PROCESS_BASELINE_BYTES = 400 * 1024**2  # an idle Python + torch process, measured
_FLOAT_CODES = {"F32", "F16", "BF16", "F64"}
_DTYPE_CODES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16"}
_EMBEDDING_NAMES = ("model.embed_tokens.weight", "transformer.wte.weight", "embed_tokens.weight")
_LM_HEAD = "lm_head.weight"
TrimSource = Literal["none", "kernel", "tensor_prepass", "model_prepass"]


@dataclass(frozen=True)
class PlannedInput:
    """One input checkpoint as the plan sees it.

    Attributes:
        role: ``base`` or ``model``.
        recipe_index: position in the recipe's ``models`` list (None for a base not listed).
        checkpoint: the opened checkpoint (headers read, no data).
    """

    role: str
    recipe_index: int | None
    checkpoint: Checkpoint


@dataclass(frozen=True)
class TensorPlan:
    """How one output tensor is produced.

    Attributes:
        name: output tensor name.
        shape: output shape.
        dtype: output safetensors dtype code.
        sources: per input (base first when the method has one, then models in recipe
            order), the input tensor name read for this output (differs for tied embeddings).
        params: the resolved parameters, or None for a tensor copied from the base
            (non-float buffers).
        rows_per_chunk: rows of dim 0 per chunk, or None to merge the tensor whole.
        trim: where a magnitude trim's threshold comes from: ``none`` (no trim),
            ``kernel`` (the kernel trims the whole tensor itself), ``tensor_prepass`` (a
            streaming select over the tensor's row chunks first) or ``model_prepass`` (one
            threshold per model over every tensor, the TIES paper's scope).
        row_map: for an embedding or LM head aligned to a built vocabulary, where each
            input's rows go (applied after reading, see :mod:`merge_kernels.embedding_rows`).
        inputs: positions in ``MergePlan.inputs`` this tensor reads, aligned with
            ``sources`` (a stacked layer reads only its slice's models).
        has_base: whether the first of ``inputs`` is the base the method subtracts.
        model_indices: per merged model (``inputs`` after the base), the index its random
            masks are keyed by (DARE).
    """

    name: str
    shape: tuple[int, ...]
    dtype: str
    sources: tuple[str, ...]
    params: TensorParameters | None
    rows_per_chunk: int | None
    trim: TrimSource = "none"
    row_map: RowMap | None = None
    inputs: tuple[int, ...] = ()
    has_base: bool = False
    model_indices: tuple[int, ...] = ()

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass
class MergePlan:
    """The whole merge, decided from headers.

    Attributes:
        recipe: the validated recipe.
        inputs: base first (when the method has one), then the merged models.
        tensors: output tensors in output order.
        shards: the output shards, in order.
        problems: incompatibilities; a plan with problems cannot run.
        notes: things worth knowing that do not stop the merge.
        tie_word_embeddings: whether the output ties its LM head to the embeddings.
        vocabulary: the built output vocabulary, when the recipe builds one.
        layer_map: for stacked layers, where each output layer comes from.
        config_updates: dotted config paths the output's ``config.json`` changes
            (``num_hidden_layers`` of a stacked model).
    """

    recipe: Recipe
    inputs: list[PlannedInput]
    tensors: list[TensorPlan] = field(default_factory=list)
    shards: list[ShardSpec] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    tie_word_embeddings: bool = False
    vocabulary: VocabularyPlan | None = None
    layer_map: LayerMap | None = None
    config_updates: dict[str, object] = field(default_factory=dict)

    @property
    def has_base(self) -> bool:
        return bool(self.inputs) and self.inputs[0].role == "base"

    @property
    def output_bytes(self) -> int:
        return sum(shard.size for shard in self.shards)

    def raise_for_problems(self) -> None:
        """Raises IncompatibleCheckpointsError listing every problem, if there are any."""
        if self.problems:
            raise IncompatibleCheckpointsError(self.problems)

    def peak_memory_estimate(self) -> int:
        """Bytes of peak resident memory the merge is expected to need."""
        worst = 0
        for tensor in self.tensors:
            inputs = len(tensor.inputs) or len(self.inputs)
            rows = tensor.rows_per_chunk
            elements = tensor.numel
            if rows is not None and tensor.shape:
                elements = rows * (tensor.numel // max(1, tensor.shape[0]))
            # raw reads + float32 copies of every input, the method's working set, the output
            working = elements * (inputs * (2 + 4) + (inputs + 3) * 4 + itemsize(tensor.dtype))
            declared = self.recipe.method.working_memory
            if declared is not None and tensor.params is not None:
                # SVDs and optimisers hold far more than a few tensors: the method's own count
                # replaces the elementwise working set (reads and output stay).
                shape = tensor.shape
                if rows is not None and shape:
                    shape = (rows, *shape[1:])  # a chunked tensor holds one chunk at a time
                own = declared(tensor.params.method, shape, inputs)
                working = elements * (inputs * (2 + 4) + itemsize(tensor.dtype)) + own
            worst = max(worst, working)
        return PROCESS_BASELINE_BYTES + 2 * worst  # reads of the next tensor overlap this one

    def report(self) -> dict[str, Any]:
        """The plan as JSON-able data, for ``tureen plan`` and ``POST /v1/plans``."""
        return {
            "merge_method": self.recipe.merge_method,
            "ok": not self.problems,
            "problems": self.problems,
            "notes": self.notes,
            "warnings": self.recipe.warnings(),
            "inputs": [
                {
                    "role": item.role,
                    "recipe_index": item.recipe_index,
                    "reference": item.checkpoint.display_name,
                    "revision": item.checkpoint.revision,
                    "tensors": len(item.checkpoint.entries()),
                    "bytes": sum(e.nbytes for e in item.checkpoint.entries().values()),
                }
                for item in self.inputs
            ],
            "output": {
                "tensors": len(self.tensors),
                "bytes": self.output_bytes,
                "tie_word_embeddings": self.tie_word_embeddings,
                "chunked_tensors": sum(1 for t in self.tensors if t.rows_per_chunk is not None),
                "shards": [
                    {"filename": s.filename, "tensors": len(s.tensors), "bytes": s.size}
                    for s in self.shards
                ],
            },
            "peak_memory_bytes_estimate": self.peak_memory_estimate(),
            **({"layer_map": self.layer_map.report(self)} if self.layer_map else {}),
        }

    def index(self) -> dict[str, object]:
        """The ``model.safetensors.index.json`` content for the planned shards."""
        return index_json(self.shards)


def _embedding_name(entries: Mapping[str, TensorEntry]) -> str | None:
    return next((name for name in _EMBEDDING_NAMES if name in entries), None)


def embedding_name(entries: Mapping[str, TensorEntry]) -> str | None:
    """The input embedding's tensor name among ``entries``, if it has one."""
    return _embedding_name(entries)


def _written_dtype(recipe: Recipe, notes: list[str]) -> str | None:
    """The dtype the floating tensors are written in (None: each input tensor's own)."""
    float32 = result_dtype(recipe)
    if float32 is not None:
        notes.append(
            f"{recipe.merge_method} computed in the recipe's dtype gives float32 tensors, "
            "written as float32 as mergekit does; set out_dtype to write another dtype"
        )
        return float32
    return recipe.output_dtype() or None


def _is_tied(config: Mapping[str, object]) -> bool:
    # transformers' default is tied unless the config says otherwise
    return bool(config.get("tie_word_embeddings", True))


def _num_layers(config: Mapping[str, object], names: Sequence[str]) -> int:
    value = config.get("num_hidden_layers")
    if isinstance(value, int) and value > 0:
        return value
    from merge_kernels.parameter_settings import layer_index

    indices = [i for i in (layer_index(n) for n in names) if i is not None]
    return max(indices) + 1 if indices else 1


def _source_for(name: str, item: PlannedInput, problems: list[str]) -> str | None:
    entries = item.checkpoint.entries()
    if name in entries:
        return name
    if name == _LM_HEAD and _is_tied(item.checkpoint.config):
        embedding = _embedding_name(entries)
        if embedding is not None:
            return embedding
    problems.append(f"{item.checkpoint.display_name} has no tensor {name!r}")
    return None


def _mixed_kinds(
    name: str, inputs: Sequence[PlannedInput], sources: Sequence[str | None]
) -> str | None:
    """A problem when ``name`` is floating point in some inputs and integer or boolean in
    others: merging it would cast the integers to floats, and copying one would drop the
    others' values, so it is refused rather than guessed."""
    dtypes = {
        item.checkpoint.display_name: item.checkpoint.entries()[source].dtype
        for item, source in zip(inputs, sources, strict=True)
        if source is not None
    }
    if len({dtype in _FLOAT_CODES for dtype in dtypes.values()}) < 2:
        return None
    listed = ", ".join(f"{ref} {dtype}" for ref, dtype in dtypes.items())
    return (
        f"tensor {name!r} is floating point in some inputs and integer or boolean in others "
        f"({listed}): an integer tensor is never cast to float for a merge; use checkpoints "
        "that store it alike"
    )


_MATCHING_KEYS = ("vocab_size", "hidden_size", "num_hidden_layers", "model_type")


def check_configs(plan: MergePlan, keys: Sequence[str] = _MATCHING_KEYS) -> None:
    """A problem for every input whose config disagrees with the first input's on ``keys``
    (``vocab_size`` is not compared when the merge builds its own vocabulary)."""
    reference = plan.inputs[0].checkpoint
    for key in keys:
        if key == "vocab_size" and plan.vocabulary is not None:
            continue  # inputs' vocabularies are aligned to the built one
        expected = reference.config.get(key)
        for item in plan.inputs[1:]:
            value = item.checkpoint.config.get(key)
            if expected is not None and value is not None and value != expected:
                plan.problems.append(
                    f"{item.checkpoint.display_name} has {key}={value} but "
                    f"{reference.display_name} has {key}={expected}"
                )


def build_plan(
    recipe: Recipe,
    inputs: list[PlannedInput],
    *,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
    chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
    whole_trim_elements: int = DEFAULT_WHOLE_TRIM_ELEMENTS,
    out_dtype: str | None = None,
    vocabulary: VocabularyPlan | None = None,
) -> MergePlan:
    """Plan a merge of ``inputs`` (base first when the method has one) by ``recipe``.

    Args:
        recipe: the validated recipe.
        inputs: the opened checkpoints; only their configs and headers are read.
        max_shard_bytes: largest output shard (a bigger tensor gets a shard of its own).
        chunk_elements: tensors of more float32 elements than this are merged in row
            chunks when the method allows it.
        whole_trim_elements: a tensor trimmed by magnitude is trimmed whole up to this many
            elements; a larger one gets its thresholds from a streaming pre-pass and is
            merged in row chunks.
        out_dtype: overrides the recipe's output dtype (``float32``/``float16``/``bfloat16``).
        vocabulary: the built output vocabulary (see :mod:`merge_kernels.vocabulary_plan`):
            embeddings and LM head get its rows.

    Returns:
        The plan; check ``problems`` (or call ``raise_for_problems``) before running it.

    Raises:
        RecipeError: a parameter is invalid for some tensor.
    """
    plan = MergePlan(recipe=recipe, inputs=inputs, vocabulary=vocabulary)
    spec = recipe.method
    reference = inputs[0].checkpoint
    reference_entries = reference.entries()
    plan.tie_word_embeddings = _is_tied(reference.config) and _LM_HEAD not in reference_entries
    wanted = out_dtype or _written_dtype(recipe, plan.notes)
    layers = _num_layers(reference.config, list(reference_entries))
    if _stacks_layers(recipe, layers):
        from merge_kernels.stacked_plan import plan_stacked

        unnamed = [i for i in inputs if _embedding_name(i.checkpoint.entries()) is None]
        if vocabulary is not None and unnamed and _moves_rows(vocabulary, inputs):
            plan.problems.append(
                f"{unnamed[0].checkpoint.display_name} has no embedding tensor named "
                f"{' or '.join(_EMBEDDING_NAMES)}, so its rows cannot be aligned to a tokenizer "
                "whose vocabulary differs from its own: use the base's tokenizer "
                "(tokenizer_source: base) with these checkpoints"
            )
            return plan
        plan_stacked(plan, chunk_elements, whole_trim_elements, wanted)
        if plan.tensors or not plan.problems:  # a bad layer range plans no tensor: say only that
            _finish(plan, max_shard_bytes)
        return plan
    check_configs(plan)
    indices = tuple(
        item.recipe_index if item.recipe_index is not None else position
        for position, item in enumerate(inputs)
        if item.role == "model"
    )
    for item in inputs[1:]:
        for name in item.checkpoint.entries():
            if name not in reference_entries and not (
                name == _LM_HEAD and plan.tie_word_embeddings
            ):
                plan.notes.append(
                    f"{item.checkpoint.display_name}: tensor {name!r} is not in "
                    f"{reference.display_name} and is left out"
                )
    for name, entry in reference_entries.items():
        sources = [_source_for(name, item, plan.problems) for item in inputs]
        if any(source is None for source in sources):
            continue
        row_map = _row_map(name, vocabulary, inputs, sources)
        shapes = {
            item.checkpoint.display_name: item.checkpoint.entries()[source].shape[
                (1 if vocabulary is not None and _is_vocabulary(name) else 0) :
            ]
            for item, source in zip(inputs, sources, strict=True)
            if source is not None
        }
        if len(set(shapes.values())) > 1:
            listed = ", ".join(f"{ref} {list(shape)}" for ref, shape in shapes.items())
            plan.problems.append(f"tensor {name!r} has different shapes: {listed}")
            continue
        mixed = _mixed_kinds(name, inputs, sources)
        if mixed is not None:
            plan.problems.append(mixed)
            continue
        floating = entry.dtype in _FLOAT_CODES
        dtype = _DTYPE_CODES[wanted] if (wanted and floating) else entry.dtype
        params = (
            resolve_parameters(recipe, name, layer_position(name, layers, recipe.reference))
            if floating
            else None
        )
        if not floating:
            plan.notes.append(
                f"tensor {name!r} ({entry.dtype}) is not floating point: copied unchanged "
                f"from {reference.display_name}, not merged"
            )
        rows, trim = _chunking(spec, params, entry, chunk_elements, whole_trim_elements)
        shape = entry.shape
        if row_map is not None:  # aligned across inputs, so merged whole
            rows, trim = _chunking(spec, params, entry, sys.maxsize, sys.maxsize)
            shape = (row_map.rows, *entry.shape[1:])
        plan.tensors.append(
            TensorPlan(
                name=name,
                shape=shape,
                dtype=dtype,
                sources=tuple(s for s in sources if s is not None),
                params=params,
                rows_per_chunk=rows,
                trim=trim,
                row_map=row_map,
                inputs=tuple(range(len(inputs))),
                has_base=plan.has_base,
                model_indices=indices,
            )
        )
    _finish(plan, max_shard_bytes)
    return plan


def _stacks_layers(recipe: Recipe, layers: int) -> bool:
    """Whether the recipe stacks layers: ``slices``, ``modules``, or one slice that does not
    cover every layer."""
    if recipe.slices or recipe.modules:
        return True
    return recipe.layer_range is not None and tuple(recipe.layer_range) != (0, layers)


def _finish(plan: MergePlan, max_shard_bytes: int) -> None:
    """Lay the planned tensors out in shards (or say there is nothing to write)."""
    if not plan.tensors:
        reference = plan.inputs[0].checkpoint
        plan.problems.append(_nothing_to_merge(reference.display_name, reference.entries()))
        return
    plan.shards = plan_shards(
        [OutputTensor(t.name, t.dtype, t.shape) for t in plan.tensors],
        max_shard_bytes,
        metadata={"format": "pt"},
    )


def _moves_rows(vocabulary: VocabularyPlan, inputs: Sequence[PlannedInput]) -> bool:
    """Whether the built vocabulary puts some input's embedding rows elsewhere."""
    for position, item in enumerate(inputs):
        entries = item.checkpoint.entries()
        name = _embedding_name(entries)
        rows = entries[name].shape[0] if name is not None and entries[name].shape else 0
        if not vocabulary.row_map.is_identity(position, rows):
            return True
    return False


def _is_vocabulary(name: str) -> bool:
    return name in _EMBEDDING_NAMES or name == _LM_HEAD


def _row_map(
    name: str,
    vocabulary: VocabularyPlan | None,
    inputs: Sequence[PlannedInput],
    sources: Sequence[str | None],
) -> RowMap | None:
    """The row map of a vocabulary tensor, None when no input's rows change."""
    if vocabulary is None or not _is_vocabulary(name) or any(s is None for s in sources):
        return None
    row_map = vocabulary.row_map
    rows = [
        item.checkpoint.entries()[source].shape[0]
        for item, source in zip(inputs, sources, strict=True)
        if source is not None
    ]
    if all(row_map.is_identity(position, count) for position, count in enumerate(rows)):
        return None
    return row_map


def _nothing_to_merge(reference: str, entries: Mapping[str, TensorEntry]) -> str:
    if not entries:
        return (
            f"{reference} has no tensors (its safetensors header lists none); there is nothing "
            "to merge: check that the reference is a complete checkpoint"
        )
    return (
        "no tensor is in every input with the same name and shape, so the merge would "
        "write nothing: check that every model is a fine-tune of the same base"
    )


def _chunking(
    spec: MethodSpec,
    params: TensorParameters | None,
    entry: TensorEntry,
    chunk_elements: int,
    whole_trim_elements: int,
) -> tuple[int | None, TrimSource]:
    """Rows per chunk (None: whole) and where the trim threshold comes from."""
    if params is None:
        return None, "none"
    trims = spec.needs_trim_threshold(params.method)
    model_scope = trims and getattr(params.method, "trim_scope", "tensor") == "model"
    limit = whole_trim_elements if trims and not model_scope else chunk_elements
    rows = None
    by_rows = spec.chunkable(params.method) or (
        len(entry.shape) >= 2 and spec.row_local(params.method)
    )
    if entry.shape and entry.numel > limit and by_rows:
        row_elements = max(1, entry.numel // max(1, entry.shape[0]))
        rows = max(1, chunk_elements // row_elements)
    if not trims:
        return rows, "none"
    if model_scope:
        return rows, "model_prepass"
    return rows, "tensor_prepass" if rows is not None else "kernel"
