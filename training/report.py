"""The parts of a training report that every kind of run shares.

A report (``training_report.json`` in the adapter folder) records what went in (the config,
the base's config hash, each data file's path, record count and sha256, library versions,
the device) and what came out (the loss curve and the held-out numbers before and after).
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import platform
from typing import Any

from training.config import TrainingConfig
from training.data import DataFile

_LIBRARIES = ("torch", "transformers", "peft", "trl", "tokenizers")


def _version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def inputs_report(
    config: TrainingConfig, train: DataFile, held_out: DataFile | None, counts: dict[str, int]
) -> dict[str, Any]:
    """What a run was given: config, base, data files and their hashes, environment.

    Args:
        config: the validated config.
        train: the training file as read.
        held_out: the held-out file as read (None: split from ``train``).
        counts: records actually used, as ``{"train": n, "held_out": m}``.
    """
    base_config = config.base_model / "config.json"
    data: dict[str, Any] = {"train": train.summary(), "counts": counts}
    if held_out is not None:
        data["held_out"] = held_out.summary()
    else:
        data["held_out"] = {
            "split_from_train": True,
            "fraction": config.data.eval_fraction,
            "seed": config.training.seed,
        }
    return {
        "kind": getattr(config, "kind", "lora"),
        "config": config.model_dump(mode="json"),
        "base_model": {
            "path": str(config.base_model),
            "config_sha256": hashlib.sha256(base_config.read_bytes()).hexdigest(),
        },
        "data": data,
        "device": config.resolved_device(),
        "versions": {name: _version(name) for name in _LIBRARIES}
        | {"python": platform.python_version()},
    }
