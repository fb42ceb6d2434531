"""Planning a stacked merge (``slices`` and ``modules``) from configs and headers alone.

Follows ``MergePlanner`` of mergekit 0.1.5 (``mergekit/plan.py``): per module, the tensors
before the layers are merged from the first slice's sources, then each slice's layers in
turn, renamed to consecutive output layers, then the tensors after the layers from the last
slice's sources. Within a slice of n layers, layer i is merged at ``t = i / (n − 1)`` (1 for
a one-layer slice), so a gradient runs across each slice; the tensors outside the layers are
merged at ``t = 0``, as mergekit 0.1.5 does. Each tensor reads only its slice's models, and
the output config gets each module's new layer count (and its per-layer ``layer_types``,
remapped to the layers' sources).

With a built vocabulary (``tokenizer_source`` or ``tokenizer``), the embeddings and the LM
head get their rows aligned to it as in a ``models`` merge, but from the models they are
merged from alone: the first slice's sources for the embeddings, the last slice's for the
LM head (a tied head reads the embeddings of those models), with the slice's ``base_model``
as the base whose row a token missing from some of them takes (mergekit's
``PermutedVocabulary`` over the slice's tensors).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Any

from merge_kernels.checkpoints.base import Checkpoint
from merge_kernels.errors import RecipeError
from merge_kernels.layer_map import (
    AlignedTensor,
    LayerMap,
    LayerSource,
    OutputLayer,
    OutsideLayers,
)
from merge_kernels.module_layouts import (
    ModuleLayout,
    get_config_value,
    known_layouts,
    whole_model_layout,
)
from merge_kernels.plan import (
    _DTYPE_CODES,
    _FLOAT_CODES,
    MergePlan,
    TensorPlan,
    _chunking,
    _is_vocabulary,
    _mixed_kinds,
    _source_for,
    check_configs,
)
from merge_kernels.slices import PlannedSlice, Structure, input_references, structure_of
from merge_kernels.suggestions import did_you_mean
from merge_kernels.tensor_parameters import ParameterScope, resolve_parameters
from merge_kernels.vocabulary_plan import slice_row_map


@dataclass(frozen=True)
class _Group:
    """One slice's inputs as the plan reads them: the base first, then the merged models
    (``sources``: each one's position among the slice's sources)."""

    slice_: PlannedSlice
    inputs: tuple[int, ...]
    sources: tuple[int, ...]
    ranges: tuple[tuple[int, int], ...]
    has_base: bool
    model_indices: tuple[int, ...]
    scope: ParameterScope

    @property
    def length(self) -> int:
        first, end = self.ranges[0]
        return end - first


@dataclass(frozen=True)
class _Settings:
    chunk_elements: int
    whole_trim_elements: int
    wanted: str | None
    written: set[str] = field(default_factory=set)  # output names planned so far


def plan_stacked(
    plan: MergePlan, chunk_elements: int, whole_trim_elements: int, wanted: str | None
) -> None:
    """Fill ``plan`` (tensors, layer map, config updates, problems) for a stacked recipe.

    ``plan.inputs`` must be opened in the order of :func:`merge_kernels.slices.input_references`.

    Raises:
        RecipeError: a module cannot be mapped onto the checkpoint, or a parameter is
            invalid for some tensor.
    """
    recipe = plan.recipe
    references = input_references(recipe)
    if len(references) != len(plan.inputs):
        raise ValueError("the plan's inputs are not the recipe's input references")
    positions = {str(ref): i for i, (_, _, ref) in enumerate(references)}
    structure = structure_of(recipe)
    reference = plan.inputs[0].checkpoint
    layouts = _layouts(structure, reference, plan.notes)
    _check_configs(plan)
    settings = _Settings(chunk_elements, whole_trim_elements, wanted)
    plan.layer_map = LayerMap()
    for name, slices in structure.items():
        layout = layouts[name]
        groups = _groups(plan, layout, slices, positions)
        if groups is not None:
            _plan_module(plan, layout, groups, settings)


def _layouts(
    structure: Structure, reference: Checkpoint, notes: list[str]
) -> dict[str | None, ModuleLayout]:
    if list(structure) == [None]:
        return {None: whole_model_layout(reference)}
    known = known_layouts(reference)
    names = list(reference.entries())
    chosen: dict[str | None, ModuleLayout] = {}
    for name in structure:
        assert name is not None
        if name not in known:
            listed = ", ".join(known)
            raise RecipeError(
                f"modules.{name}",
                f"{reference.display_name} ({reference.config.get('model_type')}) has no module "
                f"{name!r}; {did_you_mean(name, known)}its modules: {listed}",
            )
        layout = known[name]
        if not any(layout.owns_tensor(n) for n in names):
            raise RecipeError(
                f"modules.{name}",
                f"no tensor of {reference.display_name} belongs to module {name} (expected "
                f"names starting with {' or '.join(layout.owns)}): the checkpoint does not "
                "have this module's layout",
            )
        layered = layout.layer_prefixes and layout.fixed_layers is None
        if layered and layout.layer_prefix(names) is None and layout.num_layers(reference) > 0:
            expected = " or ".join(prefix + "N.*" for prefix in layout.layer_prefixes)
            raise RecipeError(
                f"modules.{name}",
                f"cannot find the layers of module {name} in {reference.display_name}: "
                f"expected tensors named {expected}",
            )
        chosen[name] = layout
    for name in known:
        if name not in structure:
            notes.append(
                f"module {name} is not in `modules`: its tensors are left out of the output "
                "(as mergekit does); list it (e.g. with `models`) to keep them"
            )
    owned = [layout for layout in known.values()]
    for tensor in names:
        if not any(layout.owns_tensor(tensor) for layout in owned):
            notes.append(f"tensor {tensor!r} belongs to no module and is left out")
    return chosen


def _check_configs(plan: MergePlan) -> None:
    # Layer counts may differ between stacked models; the rest must agree.
    check_configs(plan, ("vocab_size", "hidden_size", "model_type"))


def _groups(
    plan: MergePlan, layout: ModuleLayout, slices: list[PlannedSlice], positions: dict[str, int]
) -> list[_Group] | None:
    """Each slice's inputs and layer ranges; None (with problems) when a range is invalid."""
    spec = plan.recipe.method
    groups = []
    valid = True
    for slice_ in slices:
        base = slice_.base_position(spec)
        merged = slice_.merged(spec)
        if spec.needs_base and base is None:
            plan.problems.append(
                f"{slice_.field}: the base model {slice_.base_model} must be one of the slice's "
                "sources, with a layer range as long as the others'"
            )
            valid = False
            continue
        order = ([base] if base is not None else []) + merged
        inputs = tuple(positions[str(slice_.sources[i].model)] for i in order)
        ranges = []
        for i, position in zip(order, inputs, strict=True):
            source = slice_.sources[i]
            checkpoint = plan.inputs[position].checkpoint
            count = layout.num_layers(checkpoint)
            first, end = source.layer_range or (0, count)
            if end > count:
                where = "" if layout.name == "model" else f" in module {layout.name}"
                plan.problems.append(
                    f"{source.field}.layer_range: [{first}, {end}] is outside the layers of "
                    f"{checkpoint.display_name}, which has {count} layers{where}: give a "
                    f"range within [0, {count}]"
                )
                valid = False
            ranges.append((first, end))
        if len({end - first for first, end in ranges}) > 1:
            listed = ", ".join(
                f"{plan.inputs[p].checkpoint.display_name} {list(r)}"
                for p, r in zip(inputs, ranges, strict=True)
            )
            plan.problems.append(
                f"{slice_.field}: its models have different layer counts ({listed}); layers "
                "are merged one to one: use slices with equal layer ranges"
            )
            valid = False
        groups.append(
            _Group(
                slice_=slice_,
                inputs=inputs,
                sources=tuple(order),
                ranges=tuple(ranges),
                has_base=base is not None,
                model_indices=tuple(merged),
                scope=slice_.scope(spec, plan.recipe),
            )
        )
    return groups if valid else None


def _plan_module(
    plan: MergePlan, layout: ModuleLayout, groups: list[_Group], settings: _Settings
) -> None:
    assert plan.layer_map is not None
    first, last = groups[0], groups[-1]
    config_source = plan.inputs[0].checkpoint
    lead = plan.inputs[first.inputs[0]].checkpoint
    before, _ = layout.outside_layers(lead)
    _, after = layout.outside_layers(plan.inputs[last.inputs[0]].checkpoint)
    for name in before:
        _add_outside(plan, name, first, settings)
    layers_of = {p: layout.layers(plan.inputs[p].checkpoint) for g in groups for p in g.inputs}
    out_prefix = layout.layer_prefix(list(config_source.entries())) or layout.layer_prefix(
        list(lead.entries())
    )
    index = 0
    types: list[Any] = []
    for group in groups:
        length = group.length
        for offset in range(length):
            t = offset / (length - 1) if length > 1 else 1.0
            sources = [first_layer + offset for first_layer, _ in group.ranges]
            _add_layer(plan, group, sources, f"{out_prefix}{index}.", layers_of, t, settings)
            plan.layer_map.layers.append(
                OutputLayer(
                    module=layout.name,
                    index=index,
                    slice_field=group.slice_.field,
                    sources=tuple(
                        LayerSource(p, layer, group.has_base and k == 0)
                        for k, (p, layer) in enumerate(zip(group.inputs, sources, strict=True))
                    ),
                    t=t,
                )
            )
            types.append(_layer_type(plan.inputs[group.inputs[0]].checkpoint, layout, sources[0]))
            index += 1
    for name in after:
        _add_outside(plan, name, last, settings)
    plan.layer_map.outside.append(
        OutsideLayers(layout.name, first.slice_.field, last.slice_.field, first.inputs, last.inputs)
    )
    plan.layer_map.layer_counts[layout.name] = index
    key = layout.layer_key(config_source.config)
    if key is not None:
        plan.config_updates[key] = index
        types_key = _types_key(key)
        if isinstance(get_config_value(config_source.config, types_key), list) and all(
            t is not None for t in types
        ):
            plan.config_updates[types_key] = types


def _types_key(layers_key: str) -> str:
    parent, _, _ = layers_key.rpartition(".")
    return f"{parent}.layer_types" if parent else "layer_types"


def _layer_type(checkpoint: Checkpoint, layout: ModuleLayout, layer: int) -> Any:
    """The ``layer_types`` entry of a source layer (None when its config has none)."""
    key = layout.layer_key(checkpoint.config)
    types = get_config_value(checkpoint.config, _types_key(key)) if key else None
    if isinstance(types, list) and layer < len(types):
        return types[layer]
    return None


def _add_layer(
    plan: MergePlan,
    group: _Group,
    layers: list[int],
    out_prefix: str,
    layers_of: dict[int, dict[int, list[tuple[str, str]]]],
    t: float,
    settings: _Settings,
) -> None:
    lead = layers_of[group.inputs[0]].get(layers[0], [])
    if not lead:
        checkpoint = plan.inputs[group.inputs[0]].checkpoint
        plan.problems.append(f"{checkpoint.display_name} has no tensors of layer {layers[0]}")
        return
    for rest, _ in lead:
        names: list[str | None] = []
        for position, layer in zip(group.inputs, layers, strict=True):
            found = dict(layers_of[position].get(layer, [])).get(rest)
            if found is None:
                checkpoint = plan.inputs[position].checkpoint
                plan.problems.append(
                    f"{checkpoint.display_name} has no tensor {rest!r} in layer {layer}"
                )
            names.append(found)
        _add(plan, out_prefix + rest, group, names, t, settings)


def _add_outside(plan: MergePlan, name: str, group: _Group, settings: _Settings) -> None:
    names = [_source_for(name, plan.inputs[p], plan.problems) for p in group.inputs]
    _add(plan, name, group, names, 0.0, settings)


def _add(
    plan: MergePlan,
    name: str,
    group: _Group,
    names: list[str | None],
    t: float,
    settings: _Settings,
) -> None:
    """Plan output tensor ``name`` from ``names`` (one per input of ``group``)."""
    if any(n is None for n in names):
        return
    sources = tuple(n for n in names if n is not None)
    items = [plan.inputs[p] for p in group.inputs]
    # a vocabulary tensor's rows are aligned to the built vocabulary: only its rows may differ
    vocabulary = plan.vocabulary is not None and _is_vocabulary(name)
    shapes = {
        f"{item.checkpoint.display_name}:{source}": item.checkpoint.entries()[source].shape[
            (1 if vocabulary else 0) :
        ]
        for item, source in zip(items, sources, strict=True)
    }
    if len(set(shapes.values())) > 1:
        listed = ", ".join(f"{ref} {list(shape)}" for ref, shape in shapes.items())
        plan.problems.append(f"tensor {name!r} has different shapes: {listed}")
        return
    mixed = _mixed_kinds(name, items, list(sources))
    if mixed is not None:
        plan.problems.append(mixed)
        return
    entry = items[0].checkpoint.entries()[sources[0]]
    floating = entry.dtype in _FLOAT_CODES
    dtype = _DTYPE_CODES[settings.wanted] if (settings.wanted and floating) else entry.dtype
    params = None
    spec = plan.recipe.method
    if floating:
        merged_names = sources[1:] if group.has_base else sources
        params = resolve_parameters(plan.recipe, name, t, group.scope, merged_names)
    else:
        plan.notes.append(
            f"tensor {name!r} ({entry.dtype}) is not floating point: copied unchanged from "
            f"{items[0].checkpoint.display_name}, not merged"
        )
    rows, trim = _chunking(
        spec, params, entry, settings.chunk_elements, settings.whole_trim_elements
    )
    row_map = None
    if vocabulary:
        assert plan.vocabulary is not None
        row_map = slice_row_map(
            plan.vocabulary, plan.inputs, name, group.slice_, group.inputs, group.sources, sources
        )
    shape = entry.shape
    if row_map is not None:  # aligned across the slice's models, so merged whole
        rows, trim = _chunking(spec, params, entry, sys.maxsize, sys.maxsize)
        shape = (row_map.rows, *entry.shape[1:])
    if trim == "model_prepass":
        raise RecipeError(
            "parameters.trim_scope",
            "a model-wide trim ranks one model's whole task vector, which stacked slices split "
            "between different models; use trim_scope: tensor with slices or modules",
        )
    if name in settings.written:
        plan.problems.append(f"tensor {name!r} would be written twice (two modules claim it)")
        return
    settings.written.add(name)
    if row_map is not None:
        assert plan.layer_map is not None
        plan.layer_map.aligned.append(
            AlignedTensor(name, group.slice_.field, group.inputs, row_map.rows, row_map.own_rows())
        )
    plan.tensors.append(
        TensorPlan(
            name=name,
            shape=shape,
            dtype=dtype,
            sources=sources,
            params=params,
            rows_per_chunk=rows,
            trim=trim,
            row_map=row_map,
            inputs=group.inputs,
            has_base=group.has_base,
            model_indices=group.model_indices,
        )
    )
