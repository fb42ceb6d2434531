"""ShardWriter writes planned shards that safetensors reads back exactly, with a correct hash."""

from __future__ import annotations

import zlib
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from merge_kernels.errors import CheckpointFileError
from merge_kernels.io.checksum import PREFIX
from merge_kernels.io.dtypes import dtype_code
from merge_kernels.io.shard_plan import OutputTensor, ShardSpec, plan_shards
from merge_kernels.io.shard_writer import ShardWriter

TENSORS = {
    "embed": torch.randn(7, 5).to(torch.bfloat16),
    "norm": torch.randn(5),
    "ids": torch.arange(9, dtype=torch.int8),
    "scale": torch.tensor(0.5, dtype=torch.float64),
    "empty": torch.zeros(0, 3, dtype=torch.float16),
    "head": torch.randn(6, 4, 2),
    "mask": torch.tensor([True, False, True]),
}


def _plan(tensors: dict[str, torch.Tensor], max_bytes: int = 1 << 30) -> list[ShardSpec]:
    specs = [OutputTensor(n, dtype_code(t.dtype), tuple(t.shape)) for n, t in tensors.items()]
    return plan_shards(specs, max_bytes)


def _crc32(path: Path) -> str:
    """The checksum computed independently: zlib's CRC-32 of the whole file, and its length."""
    data = path.read_bytes()
    return f"{PREFIX}{zlib.crc32(data):08x}:{len(data)}"


def _assert_loads(paths: list[Path], tensors: dict[str, torch.Tensor]) -> None:
    loaded: dict[str, torch.Tensor] = {}
    for path in paths:
        loaded.update(load_file(path))
    assert set(loaded) == set(tensors)
    for name, tensor in tensors.items():
        assert loaded[name].dtype == tensor.dtype
        assert torch.equal(loaded[name], tensor), name


def test_single_shard_round_trip(tmp_path: Path) -> None:
    [spec] = _plan(TENSORS)
    with ShardWriter(tmp_path, spec) as writer:
        for t in spec.tensors:
            writer.write(t.name, TENSORS[t.name])
        digest = writer.finish()
    path = tmp_path / "model.safetensors"
    assert writer.path == path
    assert path.stat().st_size == spec.size
    assert digest == _crc32(path)
    _assert_loads([path], TENSORS)


def test_multi_shard_round_trip(tmp_path: Path) -> None:
    tensors = {f"layer{i}": torch.randn(10, 10) for i in range(5)}  # 400 bytes each
    specs = _plan(tensors, 900)
    assert len(specs) == 3
    for spec in specs:
        with ShardWriter(tmp_path, spec) as writer:
            for t in spec.tensors:
                writer.write(t.name, tensors[t.name])
            assert writer.finish() == _crc32(tmp_path / spec.filename)
        assert (tmp_path / spec.filename).stat().st_size <= 900 + len(spec.header)
    _assert_loads([tmp_path / s.filename for s in specs], tensors)


def test_out_of_order_writes_give_same_file_and_hash(tmp_path: Path) -> None:
    [spec] = _plan(TENSORS)
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    with ShardWriter(tmp_path / "a", spec) as writer:
        for t in spec.tensors:
            writer.write(t.name, TENSORS[t.name])
        in_order = writer.finish()
    with ShardWriter(tmp_path / "b", spec) as writer:
        for t in reversed(spec.tensors):
            writer.write(t.name, TENSORS[t.name])
        out_of_order = writer.finish()
    a = tmp_path / "a" / spec.filename
    b = tmp_path / "b" / spec.filename
    assert a.read_bytes() == b.read_bytes()
    assert in_order == out_of_order == _crc32(b)
    _assert_loads([b], TENSORS)


def test_write_rows_in_chunks_equals_whole_write(tmp_path: Path) -> None:
    [spec] = _plan(TENSORS)
    (tmp_path / "whole").mkdir()
    (tmp_path / "rows").mkdir()
    with ShardWriter(tmp_path / "whole", spec) as writer:
        for t in spec.tensors:
            writer.write(t.name, TENSORS[t.name])
        whole = writer.finish()
    with ShardWriter(tmp_path / "rows", spec) as writer:
        for t in spec.tensors:
            tensor = TENSORS[t.name]
            if tensor.dim() == 0:
                writer.write(t.name, tensor)
                continue
            # Chunks of 2 rows, last chunk first: the checksum joins pieces in file order.
            starts = list(range(0, max(tensor.shape[0], 1), 2))
            for start in reversed(starts):
                writer.write_rows(t.name, start, tensor[start : start + 2])
        rows = writer.finish()
    path = tmp_path / "rows" / spec.filename
    assert path.read_bytes() == (tmp_path / "whole" / spec.filename).read_bytes()
    assert rows == whole == _crc32(path)


def test_non_contiguous_tensor_is_written_correctly(tmp_path: Path) -> None:
    tensor = torch.randn(4, 6)
    [spec] = _plan({"t": tensor.t()})
    with ShardWriter(tmp_path, spec) as writer:
        writer.write("t", tensor.t())
        writer.finish()
    assert torch.equal(load_file(tmp_path / spec.filename)["t"], tensor.t())


def test_missing_tensor_makes_finish_raise(tmp_path: Path) -> None:
    [spec] = _plan(TENSORS)
    with ShardWriter(tmp_path, spec) as writer:
        for t in spec.tensors:
            if t.name not in ("head", "empty"):
                writer.write(t.name, TENSORS[t.name])
        with pytest.raises(ValueError, match=r"incomplete: tensors 'empty', 'head'"):
            writer.finish()
        # The writer stays usable: writing the rest completes the shard.
        writer.write("head", TENSORS["head"])
        writer.write("empty", TENSORS["empty"])
        digest = writer.finish()
    assert digest == _crc32(tmp_path / spec.filename)


def test_missing_rows_make_finish_raise(tmp_path: Path) -> None:
    tensor = torch.randn(6, 2)
    [spec] = _plan({"w": tensor})
    with ShardWriter(tmp_path, spec) as writer:
        writer.write_rows("w", 0, tensor[:2])
        writer.write_rows("w", 4, tensor[4:])
        with pytest.raises(ValueError, match="'w'"):
            writer.finish()


def test_leaving_without_finish_deletes_partial_file(tmp_path: Path) -> None:
    [spec] = _plan(TENSORS)

    def fail_midway() -> None:
        with ShardWriter(tmp_path, spec) as writer:
            writer.write("embed", TENSORS["embed"])
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        fail_midway()
    assert not (tmp_path / spec.filename).exists()
    with ShardWriter(tmp_path, spec):
        pass
    assert not (tmp_path / spec.filename).exists()


def test_plan_mismatches_are_clear_errors(tmp_path: Path) -> None:
    [spec] = _plan(TENSORS)
    with ShardWriter(tmp_path, spec) as writer:
        with pytest.raises(ValueError, match=r"'embed' is F32 but .* plans it as BF16"):
            writer.write("embed", TENSORS["embed"].float())
        with pytest.raises(ValueError, match=r"'embed' has shape \(5, 7\)"):
            writer.write("embed", TENSORS["embed"].t())
        with pytest.raises(ValueError, match="'nope' is not planned"):
            writer.write("nope", TENSORS["norm"])
        with pytest.raises(ValueError, match="'head' has shape"):
            writer.write_rows("head", 0, torch.zeros(2, 4, 3))
        with pytest.raises(ValueError, match="do not fit tensor 'head'"):
            writer.write_rows("head", 5, TENSORS["head"][:2])
        with pytest.raises(ValueError, match="'scale' is 0-d"):
            writer.write_rows("scale", 0, TENSORS["scale"])
        with pytest.raises(CheckpointFileError, match="complex64"):
            writer.write("norm", TENSORS["norm"].to(torch.complex64))
        writer.write_rows("head", 0, TENSORS["head"][:3])
        with pytest.raises(ValueError, match=r"rows \[2, 4\) of tensor 'head' overlap"):
            writer.write_rows("head", 2, TENSORS["head"][2:4])
        with pytest.raises(ValueError, match="overlap"):
            writer.write("head", TENSORS["head"])


def test_finish_is_idempotent_and_closes(tmp_path: Path) -> None:
    tensor = torch.ones(3)
    [spec] = _plan({"w": tensor})
    with ShardWriter(tmp_path, spec) as writer:
        writer.write("w", tensor)
        digest = writer.finish()
        assert writer.finish() == digest
        with pytest.raises(ValueError, match="already finished"):
            writer.write("w", tensor)
    assert (tmp_path / spec.filename).exists()


def test_overwrites_a_stale_file(tmp_path: Path) -> None:
    tensor = torch.ones(3)
    [spec] = _plan({"w": tensor})
    (tmp_path / spec.filename).write_bytes(b"x" * 10_000)
    with ShardWriter(tmp_path, spec) as writer:
        writer.write("w", tensor)
        digest = writer.finish()
    assert (tmp_path / spec.filename).stat().st_size == spec.size
    assert digest == _crc32(tmp_path / spec.filename)
