"""Typed training configs: LoRA SFT and DPO, mapping onto PEFT's ``LoraConfig`` and TRL's
``DPOConfig``.

A config is a YAML or JSON document::

    base_model: ./tiny-base            # a local model folder (nothing is downloaded)
    output_dir: ./adapters/reverse     # the PEFT adapter folder to write
    data:
      train: reverse/train.jsonl       # {"prompt","completion"} or {"text"} lines
      eval: reverse/heldout.jsonl      # held-out lines (else eval_fraction of train)
    lora: {r: 8, alpha: 16, dropout: 0.0, target_modules: [q_proj, v_proj]}
    training: {seed: 0, max_steps: 60, learning_rate: 0.003, batch_size: 8}
    dpo: {beta: 0.1, loss_type: sigmoid}   # DPO configs only

Relative paths resolve against a base folder (the config file's folder on the command
line). Hardware is checked here, so that a config asking for CUDA or 4-bit QLoRA on a
machine without CUDA fails at validation with a message naming the field, not deep inside
a training run.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from training.errors import TrainingConfigError

TrainingKind = Literal["lora", "dpo"]
DEFAULT_TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj")

_STRICT = ConfigDict(extra="forbid", frozen=True)


class LoraSettings(BaseModel):
    """The adapter: PEFT ``LoraConfig`` arguments (Hu et al. 2021; rsLoRA, Kalajdzievski 2023)."""

    model_config = _STRICT

    r: int = Field(8, ge=1, le=4096, description="Rank of the low-rank update.")
    alpha: float = Field(16.0, gt=0, description="lora_alpha: the update is scaled by alpha / r.")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="Dropout on the LoRA input.")
    target_modules: list[str] | Literal["all-linear"] = Field(
        default_factory=lambda: list(DEFAULT_TARGET_MODULES),
        min_length=1,
        description="Module names (suffixes) to adapt, or 'all-linear'.",
    )
    use_rslora: bool = Field(False, description="Scale by alpha / sqrt(r) (rank-stabilised).")

    def to_peft(self) -> Any:
        """Return the equivalent ``peft.LoraConfig`` for a causal language model."""
        from peft import LoraConfig, TaskType

        lora_config: Any = LoraConfig  # lora_alpha is typed int, but PEFT takes any number
        return lora_config(
            r=self.r,
            lora_alpha=self.alpha,
            lora_dropout=self.dropout,
            target_modules=self.target_modules
            if isinstance(self.target_modules, str)
            else list(self.target_modules),
            use_rslora=self.use_rslora,
            bias="none",
            task_type=TaskType.CAUSAL_LM,
        )


class DataSettings(BaseModel):
    """Where the examples are and how long they may be."""

    model_config = _STRICT

    train: Path = Field(description="Training JSONL file.")
    eval: Path | None = Field(
        None, description="Held-out JSONL file; without it, eval_fraction of train is held out."
    )
    eval_fraction: float = Field(
        0.1, gt=0.0, lt=1.0, description="Share of train held out when no eval file is given."
    )
    max_length: int = Field(
        256, ge=8, le=1_000_000, description="Longest tokenized example; longer ones are cut."
    )


class OptimizationSettings(BaseModel):
    """The optimisation: AdamW with a learning-rate schedule, as transformers' Trainer runs it."""

    model_config = _STRICT

    seed: int = Field(0, ge=0, description="Seeds LoRA init, dropout and data order.")
    max_steps: int | None = Field(
        None, ge=1, description="Optimizer steps; overrides epochs when given."
    )
    epochs: float | None = Field(
        None, gt=0, description="Passes over the training data (default 1 when max_steps unset)."
    )
    batch_size: int = Field(8, ge=1, le=65536, description="Examples per micro-batch.")
    gradient_accumulation_steps: int = Field(
        1, ge=1, le=65536, description="Micro-batches per optimizer step."
    )
    learning_rate: float = Field(2e-4, gt=0, le=10.0)
    lr_scheduler: Literal["linear", "cosine", "constant", "constant_with_warmup"] = "linear"
    warmup_steps: int = Field(0, ge=0, description="Steps of linear warm-up.")
    weight_decay: float = Field(0.0, ge=0.0)
    max_grad_norm: float | None = Field(
        1.0, gt=0, description="Gradient clipping norm (null: none)."
    )
    eval_batch_size: int = Field(16, ge=1, le=65536, description="Examples per held-out batch.")


class QuantizationSettings(BaseModel):
    """QLoRA (Dettmers et al. 2023): a frozen 4-bit base through bitsandbytes; CUDA only."""

    model_config = _STRICT

    load_in_4bit: Literal[True] = True
    quant_type: Literal["nf4", "fp4"] = Field("nf4", description="4-bit data type.")
    compute_dtype: Literal["bfloat16", "float16", "float32"] = "bfloat16"
    double_quant: bool = Field(True, description="Quantize the quantization constants too.")


class DpoSettings(BaseModel):
    """Direct Preference Optimization (Rafailov et al. 2023), as TRL's ``DPOTrainer`` runs it."""

    model_config = _STRICT

    beta: float = Field(0.1, gt=0, description="Strength of the pull towards the reference.")
    loss_type: Literal[
        "sigmoid",
        "hinge",
        "ipo",
        "exo_pair",
        "nca_pair",
        "robust",
        "bco_pair",
        "sppo_hard",
        "aot",
        "aot_unpaired",
        "apo_zero",
        "apo_down",
        "discopop",
        "sigmoid_norm",
    ] = "sigmoid"
    label_smoothing: float = Field(0.0, ge=0.0, lt=0.5, description="For robust and exo_pair.")


def cuda_available() -> bool:
    """Return whether torch sees a CUDA device."""
    import torch

    return bool(torch.cuda.is_available())


class TrainingConfig(BaseModel):
    """What every training run needs: a base, data, an adapter and an optimisation."""

    model_config = _STRICT

    base_model: Path = Field(description="Local folder of the base model (config + weights).")
    output_dir: Path = Field(description="Folder the PEFT adapter is written to.")
    overwrite: bool = Field(False, description="Replace an existing output_dir.")
    device: str = Field(
        "auto", pattern=r"^(auto|cpu|cuda(:\d+)?)$", description="auto, cpu, cuda or cuda:N."
    )
    dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "float32", description="dtype the base is loaded in (LoRA weights stay float32)."
    )
    data: DataSettings
    lora: LoraSettings = Field(default_factory=LoraSettings)
    training: OptimizationSettings = Field(default_factory=OptimizationSettings)
    quantization: QuantizationSettings | None = Field(
        None, description="4-bit QLoRA base (CUDA and the 'qlora' extra only)."
    )

    @model_validator(mode="after")
    def _hardware(self) -> TrainingConfig:
        if self.device.startswith("cuda") and not cuda_available():
            raise ValueError(
                f"device: {self.device!r} asks for CUDA, but torch sees no CUDA device on this "
                "machine; use device: cpu (or auto)"
            )
        if self.quantization is not None:
            if self.device == "cpu" or not cuda_available():
                reason = "device is cpu" if self.device == "cpu" else "torch sees no CUDA device"
                raise ValueError(
                    "quantization: 4-bit QLoRA runs only on CUDA (bitsandbytes' NF4 kernels), "
                    f"and {reason}; remove quantization to train the full-precision base, or run "
                    "on a CUDA machine"
                )
            if importlib.util.find_spec("bitsandbytes") is None:
                raise ValueError(
                    "quantization: 4-bit QLoRA needs bitsandbytes, which is not installed; "
                    "install it with pip install 'tureen[qlora]'"
                )
        return self

    def resolved_device(self) -> str:
        """The torch device to train on: ``auto`` is CUDA when there is one, else the CPU."""
        if self.device == "auto":
            return "cuda" if cuda_available() else "cpu"
        return self.device


class LoraTrainingConfig(TrainingConfig):
    """LoRA supervised fine-tuning: loss on completion tokens (all tokens for ``text``)."""

    kind: Literal["lora"] = "lora"


class DpoTrainingConfig(TrainingConfig):
    """DPO with a LoRA adapter; the reference is the base with the adapter disabled."""

    kind: Literal["dpo"] = "dpo"
    dpo: DpoSettings = Field(default_factory=DpoSettings)


AnyTrainingConfig = LoraTrainingConfig | DpoTrainingConfig
_CLASSES: dict[str, type[LoraTrainingConfig] | type[DpoTrainingConfig]] = {
    "lora": LoraTrainingConfig,
    "dpo": DpoTrainingConfig,
}


def _field_name(loc: tuple[int | str, ...]) -> str:
    parts = [str(part) for part in loc if not str(part).startswith("function-")]
    return ".".join(parts) or "config"


def _resolve(path: Path, base_dir: Path | None) -> Path:
    path = path.expanduser()
    if not path.is_absolute() and base_dir is not None:
        path = base_dir / path
    return path


def parse_training_config(
    document: object, kind: TrainingKind, *, base_dir: Path | None = None
) -> AnyTrainingConfig:
    """Validate a config document and resolve its relative paths.

    Args:
        document: the parsed YAML/JSON mapping.
        kind: ``lora`` or ``dpo``; a ``kind`` key in the document must agree.
        base_dir: folder relative paths are resolved against (None: leave them relative).

    Returns:
        The validated config, with absolute paths when ``base_dir`` is given.

    Raises:
        TrainingConfigError: naming the first invalid field and what to do about it.
    """
    if kind not in _CLASSES:
        raise TrainingConfigError("kind", f"unknown training kind {kind!r}; use lora or dpo")
    if not isinstance(document, dict):
        raise TrainingConfigError(
            "config", f"a training config is a mapping, got {type(document).__name__}"
        )
    if "kind" in document and document["kind"] != kind:
        raise TrainingConfigError(
            "kind", f"this is a {document['kind']!r} config, but {kind!r} training was asked for"
        )
    try:
        config = _CLASSES[kind].model_validate(document)
    except ValidationError as error:
        first = error.errors()[0]
        field = _field_name(tuple(first["loc"]))
        message = str(first["msg"]).removeprefix("Value error, ")
        if first["type"] == "extra_forbidden":
            message = "unknown field; check the spelling against the documented fields"
        if field == "config" and ": " in message:
            field, _, message = message.partition(": ")
        raise TrainingConfigError(field, message) from None
    if base_dir is None:
        return config
    data = config.data.model_copy(
        update={
            "train": _resolve(config.data.train, base_dir),
            "eval": None if config.data.eval is None else _resolve(config.data.eval, base_dir),
        }
    )
    return config.model_copy(
        update={
            "base_model": _resolve(config.base_model, base_dir),
            "output_dir": _resolve(config.output_dir, base_dir),
            "data": data,
        }
    )


def load_training_config(path: Path, kind: TrainingKind) -> AnyTrainingConfig:
    """Read a YAML or JSON config file; relative paths resolve against its folder.

    Raises:
        TrainingConfigError: the file is missing, unparsable or invalid.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as error:
        raise TrainingConfigError(
            "config", f"cannot read {path}: {error.strerror or error}"
        ) from None
    try:
        document = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as error:
        raise TrainingConfigError("config", f"{path} is not valid YAML/JSON: {error}") from None
    return parse_training_config(document, kind, base_dir=path.resolve().parent)
