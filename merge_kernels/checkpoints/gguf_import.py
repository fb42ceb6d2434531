"""Import a GGUF file (llama.cpp's format) as a safetensors checkpoint tureen can merge.

``import_gguf(path, out_dir)`` writes ``config.json``, the tokenizer files,
``generation_config.json`` and ``model.safetensors`` (sharded past ``max_shard_bytes``), a
folder that loads with ``AutoModelForCausalLM.from_pretrained`` and merges like any other
input.

The import streams: tensors are read from the memory-mapped file with the ``gguf`` package's
``GGUFReader`` and dequantised (``gguf.quants.dequantize``) one block of rows at a time,
straight into their planned place in the output shard, so memory stays at a few blocks
whatever the model's size. No transformers model is built beyond an empty one on the meta
device, whose parameter names and shapes check the mapping. transformers (imported inside
functions) reads the configuration and builds the tokenizer from the file's metadata.

llama.cpp's converter renames every tensor (``blk.0.attn_q.weight`` for
``model.layers.0.self_attn.q_proj.weight``) and, for Llama-family models, permutes the rows of
the query and key projections within each attention head (rotary halves interleaved); both
are undone here, as transformers' own GGUF loader undoes them. Supported architectures are
listed in :data:`SUPPORTED_ARCHITECTURES`; every quantisation type the ``gguf`` package can
dequantise is accepted. Tensors llama.cpp adds that transformers derives from the config
(``rope_freqs.weight``, Llama 3's scaled rotary frequencies) are left out, with a warning, and
listed in :attr:`ImportResult.ignored`: the configuration transformers reads from a GGUF file
does not carry Llama 3's rope scaling, so such a model's ``config.json`` may need its
``rope_parameters`` set by hand.

The default output dtype is float32: every dequantised value (an f16 scale times a small
integer, plus an f16 offset) is exactly representable in it, so the import adds no rounding to
the quantisation error. bfloat16 or float16 halve the output at the cost of one rounding.

The output is written into a staging folder beside ``out_dir`` and renamed into place only
when complete (:class:`~merge_kernels.io.staging.StagingDir`); re-running an interrupted
import resumes after its last finished shard.

Needs the ``gguf`` extra: ``pip install 'tureen[gguf]'``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import re
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from merge_kernels.errors import CheckpointFileError, CheckpointNotFoundError, TureenError
from merge_kernels.io.dtypes import dtype_code
from merge_kernels.io.shard_plan import INDEX_NAME, OutputTensor, index_json, plan_shards
from merge_kernels.io.shard_writer import ShardWriter
from merge_kernels.io.staging import StagingDir, write_json_atomic

log = logging.getLogger(__name__)

GGUF_MAGIC = b"GGUF"
#: GGUF ``general.architecture`` values imported, and whether llama.cpp permuted their Q/K rows.
SUPPORTED_ARCHITECTURES: dict[str, bool] = {"llama": True, "qwen2": False}
#: Output dtypes ``import_gguf`` writes.
OUTPUT_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}
DEFAULT_DTYPE = "float32"
DEFAULT_SHARD_BYTES = 5 * 1000**3
#: float32 bytes dequantised at once (rows of one tensor); bounds the import's memory.
BLOCK_BYTES = 64 * 1024 * 1024
_FORMAT = "tureen-gguf-import/1"

_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_BLOCK_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_BLOCK_TENSOR = re.compile(r"^blk\.(\d+)\.([a-z_]+)\.(weight|bias)$")
#: Tensors llama.cpp writes that transformers computes from the config instead.
_DERIVED = frozenset({"rope_freqs.weight"})


class UnsupportedGgufError(CheckpointFileError):
    """The GGUF file is valid but holds something the import cannot convert."""

    code = "unsupported_gguf"


@dataclass
class ImportResult:
    """What :func:`import_gguf` wrote.

    Attributes:
        out_dir: the output folder.
        architecture: the file's ``general.architecture``.
        model_type: the transformers ``model_type`` of the output.
        files: the output's file names, sorted.
        tensors: tensors written.
        parameters: elements in them.
        bytes_written: tensor data bytes of the output.
        dtype: the output dtype.
        quantization: GGUF tensor type name -> how many tensors of the file had it.
        ignored: file tensors left out (derived from the config by transformers).
        shards_resumed: shards kept from an interrupted earlier run.
        seconds: wall time.
    """

    out_dir: Path
    architecture: str
    model_type: str
    files: list[str]
    tensors: int
    parameters: int
    bytes_written: int
    dtype: str
    quantization: dict[str, int]
    ignored: list[str] = field(default_factory=list)
    shards_resumed: int = 0
    seconds: float = 0.0

    def report(self) -> dict[str, object]:
        """A JSON-able summary."""
        return {
            "out_dir": str(self.out_dir),
            "architecture": self.architecture,
            "model_type": self.model_type,
            "files": self.files,
            "tensors": self.tensors,
            "parameters": self.parameters,
            "bytes_written": self.bytes_written,
            "dtype": self.dtype,
            "quantization": self.quantization,
            "ignored": self.ignored,
            "shards_resumed": self.shards_resumed,
            "seconds": round(self.seconds, 3),
        }


@dataclass(frozen=True)
class _Source:
    """One file tensor to write: where it comes from and how its rows are reordered."""

    name: str
    shape: tuple[int, ...]
    data: Any  # the reader's memory-mapped numpy array
    tensor_type: Any  # gguf.GGMLQuantizationType
    head_dim: int | None  # rows are llama.cpp-permuted in groups of this size


def _gguf() -> Any:
    try:
        import gguf
    except ImportError:
        raise TureenError(
            "importing GGUF files needs the gguf package; install it with "
            "pip install 'tureen[gguf]'"
        ) from None
    return gguf


def hf_name(gguf_name: str) -> str | None:
    """The transformers name of a llama.cpp tensor name, or None when there is no rule for it.

    Args:
        gguf_name: e.g. ``blk.3.attn_q.weight``.

    Returns:
        e.g. ``model.layers.3.self_attn.q_proj.weight``.
    """
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    match = _BLOCK_TENSOR.match(gguf_name)
    if match is None or match.group(2) not in _BLOCK_NAMES:
        return None
    layer, leaf, kind = match.groups()
    return f"model.layers.{layer}.{_BLOCK_NAMES[leaf]}.{kind}"


def unpermute_rows(rows: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Undo llama.cpp's rotary permutation of query/key rows.

    llama.cpp stores each head's rows ``[r0, r1, ..., r(d/2-1), r(d/2), ...]`` interleaved as
    ``[r0, r(d/2), r1, r(d/2+1), ...]``; this restores transformers' order. It acts within
    groups of ``head_dim`` rows, so any block of whole heads can be processed on its own.

    Args:
        rows: whole heads' rows (dim 0 a multiple of ``head_dim``).
        head_dim: rows per head (even).

    Returns:
        The rows in transformers' order.
    """
    rest = rows.shape[1:]
    grouped = rows.reshape(-1, head_dim // 2, 2, *rest)
    return grouped.transpose(1, 2).reshape(rows.shape)


def _field_value(reader: Any, key: str) -> Any:
    field_ = reader.fields.get(key)
    if field_ is None or not field_.data:
        return None
    part = field_.parts[field_.data[0]]
    if field_.types and int(field_.types[0]) == 8:  # GGUFValueType.STRING
        return bytes(part).decode("utf-8", errors="replace")
    return part.tolist()[0]


def _open_reader(path: Path) -> Any:
    gguf = _gguf()
    if not path.exists():
        raise CheckpointNotFoundError(
            f"GGUF file {path} does not exist; check the path", details={"file": str(path)}
        )
    if not path.is_file():
        raise CheckpointFileError(
            f"{path} is not a file; pass the .gguf file itself", details={"file": str(path)}
        )
    with path.open("rb") as fh:
        magic = fh.read(4)
    if magic != GGUF_MAGIC:
        raise CheckpointFileError(
            f"{path} is not a GGUF file (it starts with {magic!r}, not b'GGUF'); pass a .gguf "
            "file written by llama.cpp or the gguf package",
            details={"file": str(path)},
        )
    try:
        reader = gguf.GGUFReader(str(path))
    except (ValueError, OSError, IndexError, KeyError) as exc:
        raise CheckpointFileError(
            f"{path} cannot be read as GGUF ({exc}); the file may be truncated or corrupt",
            details={"file": str(path)},
        ) from None
    if getattr(reader, "byte_order", "I") != "I":
        raise UnsupportedGgufError(
            f"{path} was written for a big-endian machine; tureen imports little-endian GGUF "
            "files only",
            details={"file": str(path)},
        )
    return reader


def _check_architecture(path: Path, reader: Any) -> str:
    architecture = _field_value(reader, "general.architecture")
    if architecture not in SUPPORTED_ARCHITECTURES:
        raise UnsupportedGgufError(
            f"{path} holds a {architecture!r} model; tureen imports GGUF architectures "
            f"{', '.join(sorted(SUPPORTED_ARCHITECTURES))}. Convert the original checkpoint "
            "instead, or load this file with transformers (from_pretrained(..., gguf_file=...)) "
            "and save_pretrained it",
            details={"file": str(path), "architecture": str(architecture)},
        )
    return str(architecture)


def _check_dequantizable(path: Path, reader: Any) -> dict[str, int]:
    """Dequantise one row of every tensor; name the first type the gguf package cannot read."""
    gguf = _gguf()
    counts: Counter[str] = Counter()
    for tensor in reader.tensors:
        kind = tensor.tensor_type.name
        counts[kind] += 1
        if counts[kind] > 1:
            continue
        sample = tensor.data[:1] if tensor.data.ndim > 1 else tensor.data
        try:
            gguf.quants.dequantize(sample, tensor.tensor_type)
        except NotImplementedError:
            raise UnsupportedGgufError(
                f"tensor {tensor.name!r} of {path} is quantised as {kind}, which the installed "
                f"gguf package cannot dequantise; upgrade it (pip install -U gguf) or use a file "
                "with another quantisation",
                details={"file": str(path), "tensor": tensor.name, "quantization": kind},
            ) from None
    return dict(sorted(counts.items()))


def _load_config(path: Path) -> Any:
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name)
    except (ValueError, KeyError, OSError) as exc:
        raise UnsupportedGgufError(
            f"transformers cannot build a configuration from {path}'s metadata ({exc})",
            details={"file": str(path)},
        ) from None
    # transformers stores general.name here; it is no configuration of the model.
    config.__dict__.pop("_model_name_or_path", None)
    return config


def _empty_model(config: Any) -> tuple[str, dict[str, tuple[int, ...]]]:
    """The model class name and its parameter names and shapes, from a model on ``meta``."""
    from transformers import AutoModelForCausalLM

    auto: Any = AutoModelForCausalLM  # untyped in some transformers releases
    with torch.device("meta"):
        model = auto.from_config(config)
    shapes = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    return type(model).__name__, shapes


def _sources(
    path: Path, reader: Any, architecture: str, config: Any, expected: dict[str, tuple[int, ...]]
) -> tuple[list[_Source], list[str]]:
    """Map every file tensor to its output name, checked against the model's parameters."""
    permuted = SUPPORTED_ARCHITECTURES[architecture]
    heads = {
        "self_attn.q_proj": int(config.num_attention_heads),
        "self_attn.k_proj": int(getattr(config, "num_key_value_heads", None) or 0)
        or int(config.num_attention_heads),
    }
    sources: dict[str, _Source] = {}
    ignored: list[str] = []
    problems: list[str] = []
    for tensor in reader.tensors:
        if tensor.name in _DERIVED:
            log.warning(
                "%s: left out %s, which transformers derives from config.json; check that "
                "the config's rope settings match the model",
                path,
                tensor.name,
            )
            ignored.append(tensor.name)
            continue
        name = hf_name(tensor.name)
        if name is None or name not in expected:
            problems.append(f"{tensor.name}: no {config.model_type} parameter corresponds to it")
            continue
        shape = tuple(int(d) for d in reversed(tensor.shape.tolist()))
        if shape != expected[name]:
            problems.append(
                f"{tensor.name}: shape {list(shape)} but {name} has {list(expected[name])}"
            )
            continue
        head_dim = None
        module = name.rsplit(".", 1)[0].split(".", 3)[-1]
        if permuted and module in heads:
            count = heads[module]
            if shape[0] % count or (shape[0] // count) % 2:
                problems.append(f"{tensor.name}: {shape[0]} rows do not split into {count} heads")
                continue
            head_dim = shape[0] // count
        sources[name] = _Source(name, shape, tensor.data, tensor.tensor_type, head_dim)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    missing = [
        name for name in expected if name not in sources and not (tied and name == "lm_head.weight")
    ]
    if missing:
        problems.append(f"the file lacks {len(missing)} tensors the model needs: {missing[:10]}")
    if problems:
        raise UnsupportedGgufError(
            f"{path} does not map onto a transformers {config.model_type} model: "
            + "; ".join(problems[:10]),
            details={"file": str(path), "problems": problems},
        )
    order = [sources[name] for name in expected if name in sources]
    return order, ignored


def _row_blocks(source: _Source) -> Iterator[tuple[int, int]]:
    rows = source.shape[0]
    row_bytes = 4 * math.prod(source.shape[1:])
    step = max(1, BLOCK_BYTES // max(1, row_bytes))
    if source.head_dim is not None:
        step = max(source.head_dim, step // source.head_dim * source.head_dim)
    for start in range(0, rows, step):
        yield start, min(rows, start + step)


def _dequantize(source: _Source, start: int, stop: int, dtype: torch.dtype) -> torch.Tensor:
    gguf = _gguf()
    whole = start == 0 and stop == source.shape[0]
    # Quantised data is stored as bytes per row, so only leading dims can be sliced.
    data = source.data if whole else source.data[start:stop]
    values = gguf.quants.dequantize(data, source.tensor_type)
    # A copy only where needed: F32 tensors come back as read-only views of the memory map.
    array = np.require(values, dtype=np.float32, requirements=["C", "W"])
    block = torch.from_numpy(array).reshape(stop - start, *source.shape[1:])
    if source.head_dim is not None:
        block = unpermute_rows(block, source.head_dim)
    return block.to(dtype).contiguous()


def _fingerprint(path: Path, dtype: str, max_shard_bytes: int) -> str:
    stat = path.stat()
    identity = {
        "format": _FORMAT,
        "file": str(path.resolve()),
        "size": stat.st_size,
        "mtime_ns": stat.st_mtime_ns,
        "dtype": dtype,
        "max_shard_bytes": max_shard_bytes,
    }
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()


def _write_tokenizer(path: Path, reader: Any, folder: Path) -> None:
    if reader.fields.get("tokenizer.ggml.model") is None:
        log.warning("%s has no tokenizer metadata; the output has no tokenizer files", path)
        return
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    except (ValueError, KeyError) as exc:
        raise UnsupportedGgufError(
            f"transformers cannot build the tokenizer {path} describes "
            f"(tokenizer.ggml.model = {_field_value(reader, 'tokenizer.ggml.model')!r}): {exc}",
            details={"file": str(path)},
        ) from None
    tokenizer.save_pretrained(str(folder))


def _write_configs(config: Any, class_name: str, dtype: torch.dtype, folder: Path) -> None:
    from transformers import GenerationConfig

    config.architectures = [class_name]
    config.dtype = dtype
    config.save_pretrained(str(folder))
    generation = GenerationConfig.from_model_config(config)
    if generation.to_diff_dict():
        generation.save_pretrained(str(folder))


ProgressCallback = Callable[[int, int], None]


def import_gguf(
    path: Path,
    out_dir: Path,
    *,
    dtype: str = DEFAULT_DTYPE,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
    overwrite: bool = False,
    progress: ProgressCallback | None = None,
) -> ImportResult:
    """Convert the GGUF file ``path`` into a safetensors checkpoint folder ``out_dir``.

    Args:
        path: the ``.gguf`` file.
        out_dir: the output folder; it appears only once complete.
        dtype: ``float32`` (default; exact), ``bfloat16`` or ``float16``.
        max_shard_bytes: largest output shard (tensor bytes); larger outputs are sharded with
            a ``model.safetensors.index.json``.
        overwrite: replace an existing ``out_dir``.
        progress: called with (tensors done, tensors total) after every tensor.

    Returns:
        What was written.

    Raises:
        CheckpointNotFoundError: ``path`` does not exist.
        CheckpointFileError: ``path`` is not a readable GGUF file.
        UnsupportedGgufError: its architecture, a quantisation type, a tensor or its tokenizer
            cannot be converted (the message names which).
        FileExistsError: ``out_dir`` exists and ``overwrite`` is false.
        TureenError: the gguf package is not installed.
        ValueError: ``dtype`` or ``max_shard_bytes`` is invalid.
    """
    started = time.monotonic()
    if dtype not in OUTPUT_DTYPES:
        raise ValueError(f"dtype {dtype!r} is not one of {', '.join(OUTPUT_DTYPES)}")
    torch_dtype = OUTPUT_DTYPES[dtype]
    path = Path(path)
    out_dir = Path(out_dir)
    reader = _open_reader(path)
    architecture = _check_architecture(path, reader)
    quantization = _check_dequantizable(path, reader)
    config = _load_config(path)
    class_name, expected = _empty_model(config)
    sources, ignored = _sources(path, reader, architecture, config, expected)

    code = dtype_code(torch_dtype)
    planned = [OutputTensor(s.name, code, s.shape) for s in sources]
    shards = plan_shards(planned, max_shard_bytes, sort_like_safetensors=True)
    by_name = {s.name: s for s in sources}

    staging = StagingDir(out_dir, _fingerprint(path, dtype, max_shard_bytes))
    if out_dir.exists() and not overwrite:
        raise FileExistsError(
            f"output folder {out_dir} already exists; choose another one, remove it, or ask "
            "to overwrite it"
        )
    done = staging.prepare()
    _write_tokenizer(path, reader, staging.path)
    _write_configs(config, class_name, torch_dtype, staging.path)
    finished = 0
    for spec in shards:
        if spec.filename in done:
            finished += len(spec.tensors)
            continue
        with ShardWriter(staging.path, spec) as writer:
            for planned_tensor in spec.tensors:
                source = by_name[planned_tensor.name]
                if len(source.shape) < 2:
                    writer.write(source.name, _dequantize(source, 0, source.shape[0], torch_dtype))
                else:
                    for start, stop in _row_blocks(source):
                        rows = _dequantize(source, start, stop, torch_dtype)
                        writer.write_rows(source.name, start, rows)
                finished += 1
                if progress is not None:
                    progress(finished, len(sources))
            staging.mark_shard_done(spec.filename, writer.finish())
    if len(shards) > 1:
        write_json_atomic(staging.path / INDEX_NAME, index_json(shards), sort_keys=True)
    staging.commit(overwrite=overwrite)
    files = sorted(p.name for p in out_dir.iterdir() if p.is_file())
    return ImportResult(
        out_dir=out_dir,
        architecture=architecture,
        model_type=str(config.model_type),
        files=files,
        tensors=len(planned),
        parameters=sum(math.prod(t.shape) for t in planned),
        bytes_written=sum(t.nbytes for t in planned),
        dtype=dtype,
        quantization=quantization,
        ignored=ignored,
        shards_resumed=len(done),
        seconds=time.monotonic() - started,
    )
