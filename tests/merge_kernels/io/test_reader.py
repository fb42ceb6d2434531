"""SafetensorsReader returns exactly what safetensors' own safe_open returns."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from merge_kernels.errors import CheckpointFileError
from merge_kernels.io.reader import SafetensorsReader
from merge_kernels.io.safetensors_header import read_header

DTYPES = [
    torch.float32,
    torch.float16,
    torch.bfloat16,
    torch.float64,
    torch.int64,
    torch.int32,
    torch.int16,
    torch.int8,
    torch.uint8,
    torch.bool,
    torch.float8_e4m3fn,
    torch.float8_e5m2,
]
SHAPES: list[tuple[int, ...]] = [(), (0,), (0, 3), (7,), (5, 3), (4, 0), (3, 2, 5)]


def _random(shape: tuple[int, ...], dtype: torch.dtype, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    raw = torch.randint(0, 256, (*shape, dtype.itemsize), generator=gen, dtype=torch.uint8)
    if dtype == torch.bool:
        return (raw[..., 0] & 1).bool()
    # Arbitrary bit patterns (NaNs included) exercise the raw byte path.
    return raw.view(dtype).reshape(shape)


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bitwise equality, NaNs and float8 included."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    return torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tensors = {
        f"{str(dtype).removeprefix('torch.')}/{'x'.join(map(str, shape)) or 'scalar'}": _random(
            shape, dtype, seed
        )
        for seed, (dtype, shape) in enumerate((d, s) for d in DTYPES for s in SHAPES)
    }
    path = tmp_path_factory.mktemp("reader") / "model.safetensors"
    save_file(tensors, path, metadata={"format": "pt"})
    return path


def test_read_matches_safe_open(checkpoint: Path) -> None:
    with safe_open(checkpoint, framework="pt") as ref, SafetensorsReader(checkpoint) as reader:
        names = list(ref.keys())
        assert set(names) == set(reader.header.tensors)
        for name in names:
            expected = ref.get_tensor(name)
            got = reader.read(name)
            assert _same(got, expected), name


def test_read_rows_matches_safe_open_slices(checkpoint: Path) -> None:
    with safe_open(checkpoint, framework="pt") as ref, SafetensorsReader(checkpoint) as reader:
        for name, entry in reader.header.tensors.items():
            if not entry.shape:
                continue
            rows = entry.shape[0]
            for start, stop in {(0, rows), (0, 0), (rows, rows), (1, rows), (0, rows // 2)}:
                if not 0 <= start <= stop <= rows:
                    continue
                expected = ref.get_slice(name)[start:stop]
                got = reader.read_rows(name, start, stop)
                assert _same(got, expected), (name, start, stop)


def test_read_rows_of_3d_tensor(tmp_path: Path) -> None:
    tensor = torch.arange(60, dtype=torch.bfloat16).reshape(5, 3, 4)
    path = tmp_path / "m.safetensors"
    save_file({"w": tensor}, path)
    with SafetensorsReader(path) as reader:
        assert torch.equal(reader.read_rows("w", 2, 4), tensor[2:4])
        parts = [reader.read_rows("w", i, min(i + 2, 5)) for i in range(0, 5, 2)]
        assert torch.equal(torch.cat(parts), tensor)


def test_results_own_their_memory(tmp_path: Path) -> None:
    path = tmp_path / "m.safetensors"
    save_file({"w": torch.arange(6, dtype=torch.float32).reshape(2, 3)}, path)
    with SafetensorsReader(path) as reader:
        first = reader.read("w")
        first.add_(100)
        second = reader.read("w")
        assert torch.equal(second, torch.arange(6, dtype=torch.float32).reshape(2, 3))
        assert second.untyped_storage().nbytes() == 24


def test_accepts_a_header_read_earlier(tmp_path: Path) -> None:
    path = tmp_path / "m.safetensors"
    save_file({"w": torch.ones(3)}, path)
    header = read_header(path)
    with SafetensorsReader(path, header) as reader:
        assert reader.header is header
        assert torch.equal(reader.read("w"), torch.ones(3))


def test_unknown_tensor_names_tensor_and_file(tmp_path: Path) -> None:
    path = tmp_path / "m.safetensors"
    save_file({"w": torch.ones(3)}, path)
    with SafetensorsReader(path) as reader, pytest.raises(CheckpointFileError) as info:
        reader.read("lm_head.weight")
    assert "'lm_head.weight'" in info.value.message
    assert str(path) in info.value.message
    assert info.value.details == {"file": str(path), "tensor": "lm_head.weight"}


def test_bad_row_ranges(tmp_path: Path) -> None:
    path = tmp_path / "m.safetensors"
    save_file({"w": torch.ones(4, 2), "s": torch.tensor(1.0)}, path)
    with SafetensorsReader(path) as reader:
        with pytest.raises(ValueError, match=r"rows \[3, 5\) are out of range"):
            reader.read_rows("w", 3, 5)
        with pytest.raises(ValueError, match="out of range"):
            reader.read_rows("w", 2, 1)
        with pytest.raises(ValueError, match="out of range"):
            reader.read_rows("w", -1, 1)
        with pytest.raises(ValueError, match="0-d"):
            reader.read_rows("s", 0, 1)


def test_file_truncated_while_open_is_a_short_read(tmp_path: Path) -> None:
    path = tmp_path / "m.safetensors"
    save_file({"a": torch.ones(4), "z": torch.ones(1000)}, path)
    with SafetensorsReader(path) as reader:
        os.truncate(path, reader.header.tensors["z"].begin + 100)
        assert torch.equal(reader.read("a"), torch.ones(4))
        with pytest.raises(CheckpointFileError, match="the file is truncated") as info:
            reader.read("z")
        assert info.value.details == {"file": str(path), "tensor": "z"}
        with pytest.raises(CheckpointFileError, match="'z'"):
            reader.read_rows("z", 990, 1000)


def test_file_changed_after_header_was_read(tmp_path: Path) -> None:
    path = tmp_path / "m.safetensors"
    save_file({"w": torch.ones(100)}, path)
    header = read_header(path)
    os.truncate(path, header.file_size - 10)
    with pytest.raises(CheckpointFileError, match="changed underneath"):
        SafetensorsReader(path, header)


def test_closed_reader_refuses_reads(tmp_path: Path) -> None:
    path = tmp_path / "m.safetensors"
    save_file({"w": torch.ones(3)}, path)
    reader = SafetensorsReader(path)
    reader.close()
    reader.close()
    with pytest.raises(ValueError, match="closed"):
        reader.read("w")
