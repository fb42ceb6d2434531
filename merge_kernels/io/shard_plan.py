"""Plan the layout of sharded safetensors output before any tensor is computed.

The streaming engine produces output tensors one at a time and writes each straight to its
final place on disk. For that it needs every shard's header and every tensor's byte range up
front, which only needs names, dtypes and shapes. This module computes them: which tensors go
to which shard, the exact header bytes (as safetensors itself would write them), and the
absolute byte range of each tensor.

Shards are filled greedily in the given order, counting tensor data bytes only (as
transformers' ``max_shard_size`` does). Files are named as transformers names them, and
:func:`index_json` builds the matching ``model.safetensors.index.json`` content.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from merge_kernels.io.dtypes import SUPPORTED_CODES, is_supported, itemsize

SINGLE_SHARD_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"

# The order safetensors' own serializer lays tensors out in: by dtype, widest alignment first
# (the order of its Rust ``Dtype`` enum, reversed), then by name. Laying data out this way
# keeps every tensor naturally aligned, since the data section starts 8-byte aligned.
_SAFETENSORS_DTYPE_RANK = {
    code: rank
    for rank, code in enumerate(
        ("I64", "F64", "F32", "I32", "BF16", "F16", "I16", "F8_E4M3", "F8_E5M2", "I8", "U8", "BOOL")
    )
}


@dataclass(frozen=True)
class OutputTensor:
    """A tensor the merge will write: its name, safetensors dtype code and shape."""

    name: str
    dtype: str
    shape: tuple[int, ...]

    def __post_init__(self) -> None:
        if not is_supported(self.dtype):
            raise ValueError(
                f"output tensor {self.name!r} has unknown dtype {self.dtype!r}; "
                f"use one of {', '.join(SUPPORTED_CODES)}"
            )
        shape = tuple(self.shape)
        if not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
            raise ValueError(
                f"output tensor {self.name!r} has shape {self.shape!r}; a shape must be "
                "non-negative integers"
            )
        # Accept lists or torch.Size from callers but store a plain tuple so specs compare equal.
        object.__setattr__(self, "shape", tuple(int(d) for d in shape))

    @property
    def nbytes(self) -> int:
        """Bytes of tensor data."""
        return math.prod(self.shape) * itemsize(self.dtype)


@dataclass(frozen=True)
class ShardSpec:
    """The full layout of one output shard.

    Attributes:
        filename: the shard's file name, e.g. ``model-00001-of-00003.safetensors``.
        tensors: the shard's tensors in file order.
        header: the 8-byte length prefix plus the JSON header, space-padded to a multiple of 8.
        offsets: absolute byte range ``(begin, end)`` of each tensor in the file.
        size: total file size in bytes.
    """

    filename: str
    tensors: tuple[OutputTensor, ...]
    header: bytes
    offsets: dict[str, tuple[int, int]]
    size: int

    @property
    def data_start(self) -> int:
        """Absolute offset of the first tensor byte (the header's length)."""
        return len(self.header)

    @property
    def data_bytes(self) -> int:
        """Bytes of tensor data in the shard."""
        return self.size - len(self.header)


def _safetensors_sort_key(tensor: OutputTensor) -> tuple[int, str]:
    return (_SAFETENSORS_DTYPE_RANK[tensor.dtype], tensor.name)


def _build_shard(
    filename: str, tensors: Sequence[OutputTensor], metadata: Mapping[str, str]
) -> ShardSpec:
    header_obj: dict[str, object] = {"__metadata__": dict(metadata)}
    relative: list[tuple[int, int]] = []
    cursor = 0
    for tensor in tensors:
        relative.append((cursor, cursor + tensor.nbytes))
        header_obj[tensor.name] = {
            "dtype": tensor.dtype,
            "shape": list(tensor.shape),
            "data_offsets": [cursor, cursor + tensor.nbytes],
        }
        cursor += tensor.nbytes
    # Compact separators and raw UTF-8 match safetensors' serde_json output byte for byte.
    body = json.dumps(header_obj, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    body += b" " * (-len(body) % 8)
    header = len(body).to_bytes(8, "little") + body
    data_start = len(header)
    offsets = {
        t.name: (data_start + b, data_start + e)
        for t, (b, e) in zip(tensors, relative, strict=True)
    }
    return ShardSpec(
        filename=filename,
        tensors=tuple(tensors),
        header=header,
        offsets=offsets,
        size=data_start + cursor,
    )


def plan_shards(
    tensors: Sequence[OutputTensor],
    max_shard_bytes: int,
    *,
    metadata: Mapping[str, str] | None = None,
    sort_like_safetensors: bool = False,
) -> list[ShardSpec]:
    """Split output tensors into shards and lay out each shard's file.

    Tensors are assigned greedily in the given order: a shard is closed when the next tensor
    would take its data past ``max_shard_bytes``. A tensor larger than ``max_shard_bytes`` gets
    a shard to itself. One shard is named ``model.safetensors``; N shards are named
    ``model-00001-of-0000N.safetensors`` etc., as transformers names them.

    Args:
        tensors: the output tensors, in the order to write them.
        max_shard_bytes: the most tensor-data bytes (headers excluded) per shard.
        metadata: the header's ``__metadata__``; ``{"format": "pt"}`` when omitted.
        sort_like_safetensors: lay each shard's tensors out the way
            ``safetensors.torch.save_file`` does (dtype, widest first, then name) instead of in
            the given order. This keeps every tensor's data naturally aligned and makes a shard
            byte-identical to ``save_file`` output for the same tensors and metadata (for
            metadata with at most one key; safetensors writes several keys in hash order).
            Assignment of tensors to shards still follows the given order.

    Returns:
        One :class:`ShardSpec` per shard, in shard order.

    Raises:
        ValueError: no tensors, duplicate or reserved names, or ``max_shard_bytes < 1``.
    """
    if max_shard_bytes < 1:
        raise ValueError(f"max_shard_bytes must be at least 1, not {max_shard_bytes}")
    if not tensors:
        raise ValueError("there are no tensors to write")
    seen: set[str] = set()
    for tensor in tensors:
        if tensor.name == "__metadata__":
            raise ValueError("a tensor cannot be named '__metadata__'; safetensors reserves it")
        if tensor.name in seen:
            raise ValueError(f"tensor {tensor.name!r} is listed more than once")
        seen.add(tensor.name)
    meta = {"format": "pt"} if metadata is None else dict(metadata)
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items()):
        raise ValueError("safetensors metadata must map strings to strings")

    groups: list[list[OutputTensor]] = [[]]
    group_bytes = 0
    for tensor in tensors:
        # An oversized tensor also lands in a fresh shard and, having pushed group_bytes past
        # the limit, closes that shard behind it.
        if groups[-1] and group_bytes + tensor.nbytes > max_shard_bytes:
            groups.append([])
            group_bytes = 0
        groups[-1].append(tensor)
        group_bytes += tensor.nbytes

    if sort_like_safetensors:
        groups = [sorted(g, key=_safetensors_sort_key) for g in groups]
    if len(groups) == 1:
        return [_build_shard(SINGLE_SHARD_NAME, groups[0], meta)]
    total = len(groups)
    return [
        _build_shard(f"model-{i:05d}-of-{total:05d}.safetensors", group, meta)
        for i, group in enumerate(groups, start=1)
    ]


def index_json(shards: Sequence[ShardSpec]) -> dict[str, object]:
    """Build the content of ``model.safetensors.index.json`` for a sharded output.

    Args:
        shards: the planned shards.

    Returns:
        ``{"metadata": {"total_size": <tensor data bytes>}, "weight_map": {name: filename}}``,
        the format transformers reads; ``weight_map`` is sorted by tensor name as transformers
        writes it.
    """
    weight_map = {t.name: shard.filename for shard in shards for t in shard.tensors}
    total_size = sum(t.nbytes for shard in shards for t in shard.tensors)
    return {
        "metadata": {"total_size": total_size},
        "weight_map": dict(sorted(weight_map.items())),
    }
