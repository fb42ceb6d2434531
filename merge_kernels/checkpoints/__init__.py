"""Checkpoint references and tensor-by-tensor access for the streaming merge engine.

A merge input is named by a ``CheckpointRef``: a local folder, a Hugging Face Hub
repository (``org/name@revision``) or a base model plus a PEFT LoRA adapter
(``base+adapter``). ``open_checkpoint`` turns one into a ``Checkpoint`` that describes
every tensor from file headers and reads tensors (or row blocks) one at a time, never
loading a whole model. Pickle weights are refused unless explicitly allowed.
"""

from merge_kernels.checkpoints.base import Checkpoint
from merge_kernels.checkpoints.local import LocalCheckpoint
from merge_kernels.checkpoints.lora import LoraCheckpoint
from merge_kernels.checkpoints.opening import open_checkpoint, resolve_local_path
from merge_kernels.checkpoints.reference import (
    CheckpointRef,
    CheckpointRefField,
    HubRef,
    LocalRef,
    LoraRef,
    parse_reference,
    reference_from_value,
)

__all__ = [
    "Checkpoint",
    "CheckpointRef",
    "CheckpointRefField",
    "HubRef",
    "LocalCheckpoint",
    "LocalRef",
    "LoraCheckpoint",
    "LoraRef",
    "open_checkpoint",
    "parse_reference",
    "reference_from_value",
    "resolve_local_path",
]
