"""A base checkpoint with a PEFT LoRA adapter applied, one tensor at a time.

LoRA (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models",
arXiv:2106.09685) trains ``W' = W + scaling * B @ A`` with ``A`` (r x in) and ``B``
(out x r). This module reads adapters saved by Hugging Face PEFT
(https://github.com/huggingface/peft) and produces, for each base tensor, exactly what PEFT's
``merge_and_unload()`` would, without loading the full model:

* ``<module>.lora_A.weight`` / ``.lora_B.weight``: ``W + scaling * (B @ A)``, transposed when
  the layer stores its weight as (in x out) (``fan_in_fan_out``, e.g. GPT-2's Conv1D);
* ``<module>.lora_embedding_A`` / ``_B`` (embedding LoRA): ``W + scaling * (B @ A).T``;
* ``<module>.lora_B.bias`` (``lora_bias``): ``bias + scaling * lora_B.bias``;
* any other tensor (``modules_to_save``, biases trained with ``bias='all'|'lora_only'``,
  embedding copies PEFT saves when the embedding is targeted) replaces the base tensor.

``scaling`` is ``alpha / r`` (``alpha / sqrt(r)`` with rsLoRA), per module with
``rank_pattern``/``alpha_pattern``. Merges are computed in float32 and cast back to the base
tensor's dtype. ``read_rows`` computes only the requested rows (``B[rows] @ A``).
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from merge_kernels.checkpoints.base import Checkpoint, check_row_range
from merge_kernels.checkpoints.confinement import UNCONFINED, Confinement
from merge_kernels.checkpoints.local import SafetensorsWeights, check_folder
from merge_kernels.checkpoints.lora_config import (
    ADAPTER_CONFIG_NAME,
    load_lora_settings,
)
from merge_kernels.checkpoints.pickle_import import PickleWeights, refuse_pickle
from merge_kernels.checkpoints.reference import CheckpointRef, LocalRef, LoraRef
from merge_kernels.errors import CheckpointFileError, CheckpointNotFoundError
from merge_kernels.io.safetensors_header import TensorEntry

ADAPTER_SAFETENSORS_NAME = "adapter_model.safetensors"
ADAPTER_PICKLE_NAME = "adapter_model.bin"
PEFT_PREFIX = "base_model.model."

_LINEAR_A, _LINEAR_B = ".lora_A.weight", ".lora_B.weight"
_EMBED_A, _EMBED_B = ".lora_embedding_A", ".lora_embedding_B"
_LORA_BIAS = ".lora_B.bias"
_SHOWN = 8


@dataclass(frozen=True)
class _LowRank:
    """``delta = scaling * L @ R``; rows of the delta are ``L[rows] @ R``."""

    module: str
    a_name: str
    b_name: str
    scaling: float
    transposed: bool  # True: L = A.T, R = B.T (fan_in_fan_out and embeddings)


@dataclass
class _Patch:
    replace: str | None = None  # adapter tensor holding the whole new value
    low_rank: _LowRank | None = None
    bias: tuple[str, float] | None = None  # (adapter tensor, scaling) added to a bias


def _shown(names: list[str]) -> str:
    more = f" and {len(names) - _SHOWN} more" if len(names) > _SHOWN else ""
    return ", ".join(names[:_SHOWN]) + more


def _open_adapter_weights(
    folder: Path, allow_pickle: bool, confinement: Confinement
) -> SafetensorsWeights | PickleWeights:
    path = folder / ADAPTER_SAFETENSORS_NAME
    if confinement.is_file(path):
        return SafetensorsWeights([path], None, confinement)
    pickle_path = folder / ADAPTER_PICKLE_NAME
    if confinement.is_file(pickle_path):
        if not allow_pickle:
            raise refuse_pickle(folder, [ADAPTER_PICKLE_NAME])
        return PickleWeights([pickle_path], shards={pickle_path: []})
    raise CheckpointNotFoundError(
        f"adapter folder {folder} has no {ADAPTER_SAFETENSORS_NAME}; a PEFT adapter folder "
        f"holds {ADAPTER_CONFIG_NAME} and {ADAPTER_SAFETENSORS_NAME}",
        details={"folder": str(folder)},
    )


class LoraCheckpoint(Checkpoint):
    """A base checkpoint as PEFT's ``merge_and_unload()`` would leave it after a LoRA adapter.

    ``entries()``, ``config`` and ``folder`` are the base's (merged tensors keep the base's
    names, dtypes and shapes); ``files()`` lists base and adapter weight files.

    Attributes:
        base: the base checkpoint (closed with this one).
        adapter_folder: the folder holding the adapter.
        adapter_revision: the adapter's resolved commit SHA when it came from the Hub.
        settings: the parsed ``adapter_config.json``.
    """

    def __init__(
        self,
        base: Checkpoint,
        adapter_folder: Path,
        *,
        ref: CheckpointRef | None = None,
        adapter_revision: str | None = None,
        allow_pickle: bool = False,
        confinement: Confinement = UNCONFINED,
    ) -> None:
        """Check the adapter against the base and plan every merged tensor.

        Reads the adapter config and weight header and the base's headers; no tensor data.

        Args:
            base: the base model.
            adapter_folder: folder with ``adapter_config.json`` and ``adapter_model.safetensors``.
            ref: the reference it was opened from (default: base ref + adapter folder).
            adapter_revision: the adapter's resolved commit SHA, for Hub adapters.
            allow_pickle: accept ``adapter_model.bin`` (restricted unpickler).
            confinement: where the adapter's files must resolve to (the base's files
                follow the base's own).

        Raises:
            CheckpointNotFoundError: the adapter folder, config or weights are missing.
            UnsafeCheckpointError: only ``adapter_model.bin`` exists and pickle is not allowed.
            CheckpointFileError: the adapter is malformed, uses an unsupported LoRA variant,
                or its tensors do not fit the base (names and shapes in the message).
        """
        adapter_folder = Path(adapter_folder)
        check_folder(adapter_folder)
        self.base = base
        self.adapter_folder = adapter_folder
        self.adapter_revision = adapter_revision
        self.folder = base.folder
        self.revision = base.revision
        self.confinement = base.confinement  # ``folder`` (config, tokenizer) is the base's
        self.adapter_confinement = confinement
        if ref is None:
            side = base.ref if not isinstance(base.ref, LoraRef) else LocalRef(path=base.folder)
            ref = LoraRef(base=side, adapter=LocalRef(path=adapter_folder))
        self.ref = ref
        self.settings = load_lora_settings(adapter_folder / ADAPTER_CONFIG_NAME, confinement)
        self._adapter = _open_adapter_weights(adapter_folder, allow_pickle, confinement)
        self._lock = threading.Lock()
        self._factors: tuple[str, torch.Tensor, torch.Tensor] | None = None
        try:
            self._patches = self._plan()
        except BaseException:
            self._adapter.close()
            raise

    @property
    def config(self) -> dict[str, object]:
        """The base model's ``config.json``."""
        return self.base.config

    @property
    def has_config(self) -> bool:
        """Whether the base model has a ``config.json``."""
        return self.base.has_config

    # ----------------------------------------------------------------------------- planning

    def _error(self, message: str, tensors: list[str]) -> CheckpointFileError:
        return CheckpointFileError(
            f"adapter {self.adapter_folder} does not fit base {self.base.display_name}: {message}",
            details={"file": str(self.adapter_folder), "tensors": tensors[:50]},
        )

    def _plan(self) -> dict[str, _Patch]:
        base = self.base.entries()
        adapter = self._adapter.entries()
        if not adapter:
            raise self._error("the adapter weights hold no tensors", [])
        strip = all(name.startswith(PEFT_PREFIX) for name in adapter)
        pairs: dict[str, dict[str, str]] = {}
        patches: dict[str, _Patch] = {}
        unmatched: list[str] = []
        for key in adapter:
            name = key.removeprefix(PEFT_PREFIX) if strip else key
            for suffix in (_LINEAR_A, _LINEAR_B, _EMBED_A, _EMBED_B, _LORA_BIAS):
                if name.endswith(suffix):
                    pairs.setdefault(name.removesuffix(suffix), {})[suffix] = key
                    break
            else:
                target = name.replace(".base_layer.", ".")
                if target not in base:
                    unmatched.append(key)
                    continue
                patches.setdefault(target, _Patch()).replace = key
                if adapter[key].shape != base[target].shape:
                    raise self._error(
                        f"adapter tensor {key!r} has shape {list(adapter[key].shape)} but base "
                        f"tensor {target!r} has shape {list(base[target].shape)}. If the "
                        "vocabulary was resized for training, resize the base model the same "
                        "way and reference that",
                        [key],
                    )
        if unmatched:
            raise self._error(
                f"{len(unmatched)} adapter tensor(s) match no base tensor ({_shown(unmatched)}); "
                "was the adapter trained on a different architecture?",
                unmatched,
            )
        for module, parts in pairs.items():
            self._plan_module(module, parts, base, adapter, patches)
        return patches

    def _plan_module(
        self,
        module: str,
        parts: dict[str, str],
        base: Mapping[str, TensorEntry],
        adapter: Mapping[str, TensorEntry],
        patches: dict[str, _Patch],
    ) -> None:
        weight = f"{module}.weight"
        if weight not in base:
            raise self._error(
                f"adapter targets module {module!r} but the base has no tensor {weight!r}",
                list(parts.values()),
            )
        scaling = self.settings.scaling(module)
        if _LORA_BIAS in parts:
            bias = f"{module}.bias"
            if bias not in base:
                raise self._error(
                    f"adapter has a LoRA bias for {module!r} (lora_bias) but the base layer has "
                    "no bias to add it to",
                    [parts[_LORA_BIAS]],
                )
            patches.setdefault(bias, _Patch()).bias = (parts[_LORA_BIAS], scaling)
        embedding = _EMBED_A in parts or _EMBED_B in parts
        a_key = parts.get(_EMBED_A if embedding else _LINEAR_A)
        b_key = parts.get(_EMBED_B if embedding else _LINEAR_B)
        if a_key is None or b_key is None:
            raise self._error(
                f"module {module!r} has only one of its two LoRA matrices "
                f"({_shown(list(parts.values()))})",
                list(parts.values()),
            )
        a, b, w = adapter[a_key].shape, adapter[b_key].shape, base[weight].shape
        if len(a) != 2 or len(b) != 2 or len(w) != 2:
            raise self._error(
                f"module {module!r} is not a linear or embedding layer (LoRA A {list(a)}, "
                f"B {list(b)}, base {list(w)}); convolution LoRA is not supported",
                [a_key, b_key],
            )
        rank = self.settings.rank(module)
        if embedding:
            # PEFT Embedding: A is (r, num_embeddings), B is (dim, r), delta = (B @ A).T.
            fits, transposed = (a[0] == b[1] == rank and w == (a[1], b[0])), True
        else:
            plain = w == (b[0], a[1])
            flipped = w == (a[1], b[0])
            transposed = flipped if not (plain and flipped) else self.settings.fan_in_fan_out
            fits = a[0] == b[1] == rank and (plain or flipped)
        if not fits:
            raise self._error(
                f"module {module!r}: LoRA A {list(a)} and B {list(b)} (configured rank {rank}) "
                f"do not fit base weight {weight!r} {list(w)}",
                [a_key, b_key],
            )
        patch = patches.setdefault(weight, _Patch())
        patch.low_rank = _LowRank(module, a_key, b_key, scaling, transposed)

    # ------------------------------------------------------------------------------ reading

    def _left_right(self, low: _LowRank) -> tuple[torch.Tensor, torch.Tensor]:
        with self._lock:
            if self._factors is not None and self._factors[0] == low.module:
                return self._factors[1], self._factors[2]
        a = self._adapter.read(low.a_name).to(torch.float32)
        b = self._adapter.read(low.b_name).to(torch.float32)
        left, right = (a.T.contiguous(), b.T.contiguous()) if low.transposed else (b, a)
        with self._lock:
            self._factors = (low.module, left, right)
        return left, right

    def _merged(self, name: str, patch: _Patch, rows: tuple[int, int] | None) -> torch.Tensor:
        dtype = self.base.entries()[name].torch_dtype
        if patch.replace is not None:
            value = (
                self._adapter.read(patch.replace)
                if rows is None
                else self._adapter.read_rows(patch.replace, *rows)
            )
        else:
            value = self.base.read(name) if rows is None else self.base.read_rows(name, *rows)
        if patch.low_rank is None and patch.bias is None:
            return value.to(dtype)
        merged = value.to(torch.float32)
        if patch.low_rank is not None:
            left, right = self._left_right(patch.low_rank)
            if rows is not None:
                left = left[rows[0] : rows[1]]
            merged += (left @ right) * patch.low_rank.scaling
        if patch.bias is not None:
            bias_name, scaling = patch.bias
            delta = self._adapter.read(bias_name).to(torch.float32)
            if rows is not None:
                delta = delta[rows[0] : rows[1]]
            merged += delta * scaling
        return merged.to(dtype)

    def entries(self) -> Mapping[str, TensorEntry]:
        """The base's entries: merged tensors keep the base's names, dtypes and shapes."""
        return self.base.entries()

    def read(self, name: str) -> torch.Tensor:
        """Read tensor ``name`` with the adapter merged in, in the base tensor's dtype."""
        patch = self._patches.get(name)
        if patch is None:
            return self.base.read(name)
        return self._merged(name, patch, None)

    def read_rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Read rows ``start:stop`` of tensor ``name`` with the adapter merged in."""
        patch = self._patches.get(name)
        if patch is None:
            return self.base.read_rows(name, start, stop)
        check_row_range(self.base.entries()[name], start, stop)
        return self._merged(name, patch, (start, stop))

    def adapted_tensors(self) -> list[str]:
        """Names of the base tensors the adapter changes or replaces."""
        return list(self._patches)

    def files(self) -> list[Path]:
        """The base's weight files followed by the adapter's."""
        return [*self.base.files(), *self._adapter.files()]

    def open_file(self, path: Path) -> int:
        """See ``Checkpoint.open_file``: adapter files are confined like the adapter."""
        if path in self._adapter.files():
            return self.adapter_confinement.open_fd(path)
        return self.base.open_file(path)

    def close(self) -> None:
        """Close the adapter and the base. Idempotent."""
        self._adapter.close()
        with self._lock:
            self._factors = None
        self.base.close()
