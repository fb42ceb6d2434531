"""Reading a PEFT LoRA ``adapter_config.json`` and refusing what tureen cannot apply.

LoRA (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models",
arXiv:2106.09685) adds ``scaling * B @ A`` to a frozen weight. This module turns PEFT's
adapter config into the numbers needed to apply it: the rank and alpha of each module
(``r``/``lora_alpha`` overridden per module by ``rank_pattern``/``alpha_pattern``, matched
exactly as PEFT's ``get_pattern_key`` does), rsLoRA scaling (``alpha / sqrt(r)``) and the
``fan_in_fan_out`` layout. Variants that change the merge formula or the base they apply to
(DoRA, QA-LoRA, aLoRA, PiSSA/OLoRA/CorDA/LoRA-GA/LoftQ initialisation, layer replication,
...) are refused with the reason.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path

from merge_kernels.checkpoints.base import load_json_object
from merge_kernels.checkpoints.confinement import UNCONFINED, Confinement
from merge_kernels.errors import CheckpointFileError

ADAPTER_CONFIG_NAME = "adapter_config.json"

# adapter_config.json fields whose presence (any truthy value) changes what merging means.
_REFUSED_FIELDS: dict[str, str] = {
    "use_dora": "DoRA (weight-decomposed LoRA) rescales each merged weight column by a learned "
    "magnitude, which tureen does not apply",
    "use_qalora": "QA-LoRA pools inputs group-wise and is meant for quantized bases",
    "alora_invocation_tokens": "activated LoRA (aLoRA) only applies after invocation tokens "
    "and cannot be merged into the weights",
    "layer_replication": "layer replication builds extra layers the base checkpoint lacks",
    "target_parameters": "LoRA on raw parameters (target_parameters) is not supported",
    "trainable_token_indices": "trainable tokens store sparse embedding-row updates tureen "
    "does not apply",
    "velora_config": "VeLoRA changes the layer computation",
    "monteclora_config": "MonteCLoRA samples its update and has no single merged weight",
    "use_bdlora": "block-diagonal LoRA stores factors in a layout tureen does not read",
    "arrow_config": "Arrow routes between several adapters at inference time",
    "kasa_config": "KaSA changes the adapter's singular values and merge formula",
}

# init_lora_weights values whose saved adapter is relative to a transformed base model.
_REFUSED_INITS = ("pissa", "olora", "corda", "lora_ga", "loftq")


def _adapter_error(path: Path, message: str) -> CheckpointFileError:
    return CheckpointFileError(
        f"{path}: {message}", details={"file": str(path), "reason": "unsupported_adapter"}
    )


def _number(path: Path, config: dict[str, object], key: str, default: float | None) -> float:
    value = config.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
        raise _adapter_error(path, f"'{key}' must be a positive number, got {value!r}")
    return float(value)


def _pattern(path: Path, config: dict[str, object], key: str) -> dict[str, float]:
    raw = config.get(key) or {}
    if not isinstance(raw, dict):
        raise _adapter_error(path, f"'{key}' must be an object mapping module patterns to numbers")
    out: dict[str, float] = {}
    for pattern, value in raw.items():
        if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
            raise _adapter_error(path, f"'{key}'[{pattern!r}] must be a positive number")
        try:
            re.compile(pattern)
        except re.error as exc:
            raise _adapter_error(
                path, f"'{key}' key {pattern!r} is not a valid regular expression ({exc})"
            ) from None
        out[str(pattern)] = float(value)
    return out


def _match_pattern(patterns: dict[str, float], module: str) -> float | None:
    # Mirrors peft.utils.other.get_pattern_key: the first key that matches the end of the
    # module name (after a '.' or at its start) wins.
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return None


@dataclass(frozen=True)
class LoraSettings:
    """The parts of a LoRA ``adapter_config.json`` that determine the merged weights."""

    path: Path
    r: int
    lora_alpha: float
    use_rslora: bool = False
    fan_in_fan_out: bool = False
    rank_pattern: dict[str, float] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    modules_to_save: tuple[str, ...] = ()
    raw: dict[str, object] = field(default_factory=dict)

    def rank(self, module: str) -> int:
        """The configured rank of ``module`` (``rank_pattern`` first, else ``r``)."""
        value = _match_pattern(self.rank_pattern, module)
        return int(value) if value is not None else self.r

    def alpha(self, module: str) -> float:
        """The configured alpha of ``module`` (``alpha_pattern`` first, else ``lora_alpha``)."""
        value = _match_pattern(self.alpha_pattern, module)
        return value if value is not None else self.lora_alpha

    def scaling(self, module: str) -> float:
        """``alpha / r``, or ``alpha / sqrt(r)`` with rsLoRA, for ``module``."""
        r = self.rank(module)
        alpha = self.alpha(module)
        return alpha / math.sqrt(r) if self.use_rslora else alpha / r


def load_lora_settings(path: Path, confinement: Confinement = UNCONFINED) -> LoraSettings:
    """Read a PEFT ``adapter_config.json`` and check that tureen can apply it.

    Args:
        path: the ``adapter_config.json`` file.
        confinement: where the file must resolve to.

    Returns:
        The settings that determine the merged weights.

    Raises:
        CheckpointNotFoundError: the file does not exist.
        CheckpointFileError: the file is malformed, the adapter is not LoRA, or it uses a
            LoRA variant tureen cannot merge (``details['reason'] == 'unsupported_adapter'``);
            the message says which and why.
    """
    config = load_json_object(path, confinement=confinement)
    peft_type = config.get("peft_type", "LORA")
    if peft_type != "LORA":
        raise _adapter_error(
            path,
            f"adapter type {peft_type!r} is not supported; tureen applies LoRA adapters "
            "only. Merge this adapter into its base with PEFT's merge_and_unload() and "
            "reference the merged model instead",
        )
    for key, reason in _REFUSED_FIELDS.items():
        if config.get(key):
            raise _adapter_error(
                path,
                f"the adapter sets '{key}': {reason}. Merge it into its base with PEFT's "
                "merge_and_unload() and reference the merged model instead",
            )
    init = str(config.get("init_lora_weights", True)).lower()
    if any(init.startswith(name) for name in _REFUSED_INITS):
        raise _adapter_error(
            path,
            f"the adapter was initialised with init_lora_weights={init!r}, so its weights are "
            "relative to a transformed base model, not the published one. Re-save it with "
            "PEFT's save_pretrained(path_initial_model_for_weight_conversion=...) to convert "
            "it to a plain LoRA adapter",
        )
    bias = config.get("bias", "none")
    if bias not in ("none", "all", "lora_only"):
        raise _adapter_error(path, f"'bias' must be 'none', 'all' or 'lora_only', got {bias!r}")
    modules = config.get("modules_to_save") or []
    if not isinstance(modules, list) or not all(isinstance(m, str) for m in modules):
        raise _adapter_error(path, "'modules_to_save' must be a list of module names")
    r = _number(path, config, "r", 8)
    if r != int(r):
        raise _adapter_error(path, f"'r' must be an integer, got {config.get('r')!r}")
    return LoraSettings(
        path=path,
        r=int(r),
        lora_alpha=_number(path, config, "lora_alpha", 8),
        use_rslora=bool(config.get("use_rslora", False)),
        fan_in_fan_out=bool(config.get("fan_in_fan_out", False)),
        rank_pattern=_pattern(path, config, "rank_pattern"),
        alpha_pattern=_pattern(path, config, "alpha_pattern"),
        modules_to_save=tuple(modules),
        raw=config,
    )
