"""The output layer map of a stacked merge: where each output layer comes from.

Decided from configs and headers alone (see :mod:`merge_kernels.stacked_plan`), so ``tureen
plan`` and ``POST /v1/plans`` show it before any tensor data is read, together with the
embeddings and LM head whose rows are aligned to a built vocabulary, and from which models.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from merge_kernels.plan import MergePlan


@dataclass(frozen=True)
class LayerSource:
    """One input layer of an output layer.

    Attributes:
        input: position in ``MergePlan.inputs``.
        layer: the layer index in that model.
        base: whether it is the base the method subtracts.
    """

    input: int
    layer: int
    base: bool = False


@dataclass(frozen=True)
class OutputLayer:
    """One output layer.

    Attributes:
        module: the module (``model`` for a single-module model).
        index: the output layer index within the module.
        slice_field: the recipe slice it comes from (``slices[1]``).
        sources: the input layers merged into it, in the slice's source order.
        t: its position within the slice, from 0 to 1, that gradients are evaluated at.
    """

    module: str
    index: int
    slice_field: str
    sources: tuple[LayerSource, ...]
    t: float


@dataclass(frozen=True)
class OutsideLayers:
    """Where a module's tensors outside its layers come from.

    Attributes:
        module: the module.
        before: the slice the tensors before the layers (embeddings) come from.
        after: the slice the tensors after them (final norm, LM head) come from.
        inputs_before: the inputs those before the layers are read from.
        inputs_after: the inputs those after the layers are read from.
    """

    module: str
    before: str
    after: str
    inputs_before: tuple[int, ...]
    inputs_after: tuple[int, ...]


@dataclass(frozen=True)
class AlignedTensor:
    """An embedding or LM head whose rows are aligned to the built vocabulary.

    Attributes:
        tensor: the output tensor.
        slice_field: the recipe slice whose models it is merged from.
        inputs: positions in ``MergePlan.inputs`` of those models, as the tensor reads them.
        rows: its output rows (the vocabulary, padding included).
        own_rows: per input, how many output rows are that model's own row for the token
            (the others are taken from other models, zeros, or padding).
    """

    tensor: str
    slice_field: str
    inputs: tuple[int, ...]
    rows: int
    own_rows: tuple[int, ...]


@dataclass
class LayerMap:
    """Every output layer of every module, in output order, the rest of each module, and
    the tensors aligned to a built vocabulary."""

    layers: list[OutputLayer] = field(default_factory=list)
    outside: list[OutsideLayers] = field(default_factory=list)
    layer_counts: dict[str, int] = field(default_factory=dict)
    aligned: list[AlignedTensor] = field(default_factory=list)

    def report(self, plan: MergePlan) -> dict[str, Any]:
        """The map as JSON-able data, naming models by their references."""

        def name(position: int) -> str:
            return plan.inputs[position].checkpoint.display_name

        return {
            "layers": self.layer_counts,
            "output_layers": [
                {
                    "module": layer.module,
                    "layer": layer.index,
                    "slice": layer.slice_field,
                    "t": layer.t,
                    "merged": len(layer.sources) > 1,
                    "sources": [
                        {
                            "model": name(source.input),
                            "layer": source.layer,
                            "role": "base" if source.base else "model",
                        }
                        for source in layer.sources
                    ],
                }
                for layer in self.layers
            ],
            "outside_layers": [
                {
                    "module": item.module,
                    "before_layers": {
                        "slice": item.before,
                        "models": [name(i) for i in item.inputs_before],
                    },
                    "after_layers": {
                        "slice": item.after,
                        "models": [name(i) for i in item.inputs_after],
                    },
                }
                for item in self.outside
            ],
            "vocabulary_rows": [
                {
                    "tensor": item.tensor,
                    "slice": item.slice_field,
                    "rows": item.rows,
                    "models": [
                        {"model": name(i), "own_rows": own, "filled_rows": item.rows - own}
                        for i, own in zip(item.inputs, item.own_rows, strict=True)
                    ],
                }
                for item in self.aligned
            ],
        }
