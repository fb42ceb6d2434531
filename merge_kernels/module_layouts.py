"""Where a checkpoint's modules, layers and layer counts are, for stacking layers.

mergekit 0.1.5 describes each architecture in JSON (``mergekit/_data/architectures``): a
model is one module or several (a text decoder, a vision tower, a projector...), each with
a weight prefix, weights before its layers, a layer template and weights after them, and a
config key holding its layer count. tureen needs less: which tensors belong to a module,
the prefix its layer index follows (``model.layers.``) and where its layer count is. A plain
model is one module found from its tensor names; the multi-module architectures mergekit
defines are listed here by ``model_type``, with the same module names, so a mergekit
``modules:`` config means the same. Tensor names that changed between transformers versions
are given as alternatives.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from merge_kernels.checkpoints.base import Checkpoint
from merge_kernels.errors import RecipeError
from merge_kernels.parameter_settings import layer_index

# A tensor outside the layers comes before them (taken from the first slice, as mergekit's
# pre_weights) when it embeds inputs; the others (final norms, heads) come after them.
_BEFORE_LAYERS = re.compile(
    r"embed|wte|wpe|patch|conv|position|pos_emb|class_emb|ln_pre|pre_layrnorm|"
    r"mm_input_projection|mm_soft_emb_norm|^shared\."
)
_LAYER_COUNT_KEYS = ("num_hidden_layers", "n_layer", "num_layers")


@dataclass(frozen=True)
class ModuleLayout:
    """One module of a checkpoint.

    Attributes:
        name: mergekit's module name (``text_decoder``, ``vision_tower``, ...).
        owns: name prefixes of the module's tensors (``""``: every tensor).
        excludes: prefixes within ``owns`` that belong to another module.
        layer_prefixes: the prefix a layer index follows, alternatives in order.
        layer_keys: config paths of the module's layer count, alternatives in order.
        fixed_layers: the layer count when the config has none (mergekit's
            ``override_num_layers``).
    """

    name: str
    owns: tuple[str, ...]
    excludes: tuple[str, ...] = ()
    layer_prefixes: tuple[str, ...] = ()
    layer_keys: tuple[str, ...] = ()
    fixed_layers: int | None = None

    def owns_tensor(self, name: str) -> bool:
        """Whether tensor ``name`` belongs to this module."""
        return any(name.startswith(p) for p in self.owns) and not any(
            name.startswith(p) for p in self.excludes
        )

    def layer_prefix(self, names: Sequence[str]) -> str | None:
        """The layer prefix ``names`` (a checkpoint's tensors) use, if any."""
        for prefix in self.layer_prefixes:
            pattern = re.compile(re.escape(prefix) + r"\d+\.")
            if any(pattern.match(name) for name in names):
                return prefix
        return None

    def layer_key(self, config: Mapping[str, object]) -> str | None:
        """The config path holding this module's layer count in ``config``, if any."""
        return next((key for key in self.layer_keys if _get(config, key) is not None), None)

    def num_layers(self, checkpoint: Checkpoint) -> int:
        """The module's layer count in ``checkpoint``: its config's, else counted."""
        key = self.layer_key(checkpoint.config)
        if key is not None:
            value = _get(checkpoint.config, key)
            if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
                return value
        if self.fixed_layers is not None:
            return self.fixed_layers
        return len(self.layers(checkpoint))

    def layers(self, checkpoint: Checkpoint) -> dict[int, list[tuple[str, str]]]:
        """Per layer index, its tensors as ``(name after the index, full name)``, in order."""
        names = list(checkpoint.entries())
        prefix = self.layer_prefix(names)
        found: dict[int, list[tuple[str, str]]] = {}
        if prefix is None:
            return found
        pattern = re.compile(re.escape(prefix) + r"(\d+)\.(.+)")
        for name in names:
            match = pattern.fullmatch(name)
            if match and self.owns_tensor(name):
                found.setdefault(int(match.group(1)), []).append((match.group(2), name))
        return found

    def outside_layers(self, checkpoint: Checkpoint) -> tuple[list[str], list[str]]:
        """The module's tensors outside its layers: those before them and those after."""
        prefix = self.layer_prefix(list(checkpoint.entries()))
        before: list[str] = []
        after: list[str] = []
        for name in checkpoint.entries():
            if not self.owns_tensor(name):
                continue
            if prefix is not None and re.match(re.escape(prefix) + r"\d+\.", name):
                continue
            (before if _BEFORE_LAYERS.search(name) else after).append(name)
        return before, after


def _text(
    *owns: str, layers: tuple[str, ...], keys: tuple[str, ...], excludes: tuple[str, ...] = ()
) -> ModuleLayout:
    return ModuleLayout("text_decoder", owns, excludes, layers, keys)


_TEXT_KEYS = ("text_config.num_hidden_layers", "num_hidden_layers")
# Qwen2-VL, Qwen2.5-VL and Qwen3-VL: the text model at the top, the vision tower and its
# merger (the projector) under ``visual.`` (``model.visual.`` in newer transformers).
_QWEN_VL = (
    _text(
        "model.",
        "lm_head.",
        layers=("model.layers.", "model.language_model.layers."),
        keys=_TEXT_KEYS,
        excludes=("model.visual.",),
    ),
    ModuleLayout(
        "vision_tower",
        ("visual.", "model.visual."),
        excludes=("visual.merger.", "model.visual.merger.", "model.visual.deepstack_merger_list."),
        layer_prefixes=("visual.blocks.", "model.visual.blocks."),
        layer_keys=("vision_config.depth",),
    ),
    ModuleLayout(
        "multi_modal_projector",
        ("visual.merger.", "model.visual.merger.", "model.visual.deepstack_merger_list."),
        # Qwen3-VL's deepstack mergers are the projector's layers (counted from the
        # tensors, 3 in mergekit's definition); Qwen2-VL's projector has none.
        layer_prefixes=("model.visual.deepstack_merger_list.",),
    ),
)


def _vision_language(
    vision_name: str, vision_owns: tuple[str, ...], vision_layers: tuple[str, ...]
) -> tuple[ModuleLayout, ...]:
    """Llava-style models: language_model., a vision tower and multi_modal_projector."""
    return (
        _text(
            "language_model.",
            "model.language_model.",
            "lm_head.",
            layers=("language_model.model.layers.", "model.language_model.layers."),
            keys=_TEXT_KEYS,
        ),
        ModuleLayout(
            vision_name,
            vision_owns,
            layer_prefixes=vision_layers,
            layer_keys=("vision_config.num_hidden_layers",),
        ),
        ModuleLayout(
            "multi_modal_projector",
            ("multi_modal_projector.", "model.multi_modal_projector."),
            fixed_layers=0,
        ),
    )


LAYOUTS: dict[str, tuple[ModuleLayout, ...]] = {
    "qwen2_vl": _QWEN_VL,
    "qwen2_5_vl": _QWEN_VL,
    "qwen3_vl": _QWEN_VL,
    "qwen3_vl_moe": _QWEN_VL,
    "gemma3": _vision_language(
        "vision_tower",
        ("vision_tower.", "model.vision_tower."),
        (
            "vision_tower.vision_model.encoder.layers.",
            "model.vision_tower.vision_model.encoder.layers.",
        ),
    ),
    "mistral3": _vision_language(
        "vision_tower",
        ("vision_tower.", "model.vision_tower."),
        ("vision_tower.transformer.layers.", "model.vision_tower.transformer.layers."),
    ),
    "llama4": _vision_language(
        "vision_model",
        ("vision_model.", "model.vision_model."),
        ("vision_model.model.layers.", "model.vision_model.model.layers."),
    ),
    "t5": (
        ModuleLayout(
            "decoder",
            ("decoder.",),
            layer_prefixes=("decoder.block.",),
            layer_keys=("num_decoder_layers", "num_layers"),
        ),
        ModuleLayout(
            "encoder",
            ("encoder.",),
            layer_prefixes=("encoder.block.",),
            layer_keys=("num_layers", "num_hidden_layers"),
        ),
        ModuleLayout("shared", ("shared.", "lm_head."), fixed_layers=0),
    ),
    "whisper": (
        ModuleLayout(
            "decoder",
            ("model.decoder.", "proj_out."),
            layer_prefixes=("model.decoder.layers.",),
            layer_keys=("decoder_layers",),
        ),
        ModuleLayout(
            "encoder",
            ("model.encoder.",),
            layer_prefixes=("model.encoder.layers.",),
            layer_keys=("encoder_layers",),
        ),
    ),
}


def known_layouts(checkpoint: Checkpoint) -> dict[str, ModuleLayout]:
    """The modules of a multi-module checkpoint, by mergekit's module names.

    Raises:
        RecipeError: (field ``modules``) the checkpoint's ``model_type`` has no known
            modules and it is not a single-module model (whose one module is ``default``).
    """
    model_type = str(checkpoint.config.get("model_type", ""))
    layouts = LAYOUTS.get(model_type)
    if layouts is None and _single_stack(checkpoint):
        # mergekit names the one module of a single-module architecture `default`.
        return {"default": whole_model_layout(checkpoint)}
    if layouts is None:
        known = ", ".join(sorted(LAYOUTS))
        raise RecipeError(
            "modules",
            f"{checkpoint.display_name} (model_type {model_type or 'unknown'!r}) has no known "
            f"modules; `modules` works with the multi-module architectures {known}; use "
            "`slices` or `models` for a single-module model",
        )
    return {layout.name: layout for layout in layouts}


def _single_stack(checkpoint: Checkpoint) -> bool:
    try:
        whole_model_layout(checkpoint)
    except RecipeError:
        return False
    return True


def whole_model_layout(checkpoint: Checkpoint) -> ModuleLayout:
    """A plain model as one module: every tensor, layers after the one prefix it uses.

    Raises:
        RecipeError: (field ``slices``) the checkpoint has several layer stacks (a
            multi-module model), which mergekit also stacks only through ``modules``.
    """
    prefixes: dict[str, None] = {}
    for name in checkpoint.entries():
        index = layer_index(name)
        if index is not None:
            match = re.search(rf"(?:^|\.)(?:layers|h|blocks|layer)\.{index}\.", name)
            if match is not None:
                prefixes.setdefault(name[: match.end() - len(f"{index}.")], None)
    if len(prefixes) > 1:
        model_type = str(checkpoint.config.get("model_type", ""))
        modules = LAYOUTS.get(model_type)
        names = f" ({', '.join(m.name for m in modules)})" if modules else ""
        raise RecipeError(
            "slices",
            f"{checkpoint.display_name} has several layer stacks ({', '.join(prefixes)}): "
            f"give each module{names} its own slices under `modules`",
        )
    return ModuleLayout(
        "model", ("",), layer_prefixes=tuple(prefixes), layer_keys=_LAYER_COUNT_KEYS
    )


def _get(config: Mapping[str, object], path: str) -> object:
    value: object = config
    for part in path.split("."):
        if not isinstance(value, Mapping) or part not in value:
            return None
        value = value[part]
    return value


def set_config_value(config: dict[str, object], path: str, value: object) -> None:
    """Set ``path`` (dotted, e.g. ``text_config.num_hidden_layers``) in a JSON config."""
    *parents, last = path.split(".")
    target: dict[str, object] = config
    for part in parents:
        child = target.get(part)
        if not isinstance(child, dict):
            child = {}
            target[part] = child
        target = child
    target[last] = value


def get_config_value(config: Mapping[str, object], path: str) -> object:
    """The value at ``path`` (dotted) in a JSON config, or None."""
    return _get(config, path)
