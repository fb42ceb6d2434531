"""Loading the base model and tokenizer a training run starts from, on its device."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from training.config import TrainingConfig
from training.errors import TrainingConfigError


def check_base_folder(folder: Path) -> None:
    """Check that ``folder`` is a local model folder with safetensors weights.

    Raises:
        TrainingConfigError: naming ``base_model`` and what is missing.
    """
    if not (folder / "config.json").is_file():
        raise TrainingConfigError(
            "base_model",
            f"{folder} is not a local model folder (no config.json); training reads local "
            "folders only (build one with `tureen train base DIR`, or download it first)",
        )
    if not any(folder.glob("*.safetensors")):
        raise TrainingConfigError(
            "base_model",
            f"{folder} has no *.safetensors weights; pickle checkpoints are not loaded",
        )


def check_output_dir(config: TrainingConfig) -> None:
    """Refuse an existing output folder unless ``overwrite`` is set, before any work.

    Raises:
        TrainingConfigError: naming ``output_dir``.
    """
    if config.output_dir.exists() and not config.overwrite:
        raise TrainingConfigError(
            "output_dir",
            f"{config.output_dir} already exists; choose another folder or set overwrite: true",
        )


def load_base(config: TrainingConfig) -> tuple[Any, Any]:
    """Load the base model (on the config's device, 4-bit with QLoRA) and its tokenizer.

    The tokenizer pads on the right with its pad token (the end-of-sequence token when it has
    none).

    Returns:
        ``(model, tokenizer)``; the model is in eval mode with every weight frozen.

    Raises:
        TrainingConfigError: the folder is no model folder, or its tokenizer has no
            end-of-sequence token.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = Path(config.base_model)
    check_base_folder(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    if tokenizer.eos_token is None:
        raise TrainingConfigError(
            "base_model", f"the tokenizer in {folder} has no end-of-sequence token"
        )
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    device = config.resolved_device()
    kwargs: dict[str, Any] = {"local_files_only": True, "use_safetensors": True}
    quantization = config.quantization
    if quantization is None:
        kwargs["dtype"] = getattr(torch, config.dtype)
    else:
        from transformers import BitsAndBytesConfig

        compute_dtype = getattr(torch, quantization.compute_dtype)
        kwargs["dtype"] = compute_dtype
        bnb_config: Any = BitsAndBytesConfig
        kwargs["quantization_config"] = bnb_config(
            load_in_4bit=True,
            bnb_4bit_quant_type=quantization.quant_type,
            bnb_4bit_compute_dtype=compute_dtype,
            bnb_4bit_use_double_quant=quantization.double_quant,
        )
        kwargs["device_map"] = {"": torch.device(device).index or 0}
    model: Any = AutoModelForCausalLM.from_pretrained(folder, **kwargs)
    if quantization is None:
        model.to(device)
    else:
        from peft import prepare_model_for_kbit_training

        prepare: Any = prepare_model_for_kbit_training
        model = prepare(model, use_gradient_checkpointing=False)
    model.requires_grad_(False)
    model.eval()
    return model, tokenizer
