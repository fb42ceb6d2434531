"""Write synthetic Llama-layout checkpoints for the merge benchmark: a base and K fine-tunes.

Each fine-tune is the base plus a small random delta (relative size ``--delta-scale`` of the
mean weight magnitude, drawn from its own seed), as
:func:`merge_kernels.synthetic.write_checkpoint` makes them. Checkpoints are written tensor
by tensor into planned shards, so memory stays at a few copies of the largest tensor (the
32000 x 2048 embedding) whatever the model size.

Layout: ``DATA/<set>/base`` and ``DATA/<set>/finetune-1`` ... ``finetune-K``, where ``<set>``
is named after the parameters (e.g. ``llama-3gb-bf16-s2gb``). Every model folder gets a
``bench-marker.json`` once it is complete; a folder whose marker matches the requested
parameters is kept as it is, any other is deleted and written again.

Usage: ``python bench/generate.py --model-gb 3 [--finetunes 3] [--dtype bf16]
[--shard-size 2GB] [--data bench/data]``; prints the set's folder.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from merge_kernels.synthetic import LlamaShape, shape_for_bytes, write_checkpoint
from service.cli import parse_size

MARKER = "bench-marker.json"
DEFAULT_DATA = Path(__file__).resolve().parent / "data"
DTYPES: dict[str, torch.dtype] = {
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
    "fp32": torch.float32,
    "float32": torch.float32,
}
BASE_SEED = 0
DELTA_SCALE = 0.01


@dataclass(frozen=True)
class DataSet:
    """A generated base and its fine-tunes."""

    folder: Path
    base: Path
    finetunes: tuple[Path, ...]
    shape: LlamaShape
    dtype: str

    @property
    def models(self) -> tuple[Path, ...]:
        """The base first, then the fine-tunes."""
        return (self.base, *self.finetunes)


def checkpoint_files(folder: Path) -> list[Path]:
    """The safetensors files of one checkpoint folder."""
    return sorted(folder.glob("*.safetensors"))


def checkpoint_bytes(folder: Path) -> int:
    """Total size of the safetensors files of one checkpoint folder."""
    return sum(p.stat().st_size for p in checkpoint_files(folder))


def set_name(model_gb: float, dtype: str, shard_bytes: int) -> str:
    """The folder name of a data set, from its parameters."""
    shard = f"{shard_bytes / 1000**3:g}gb"
    return f"llama-{model_gb:g}gb-{dtype}-s{shard}"


def _marker(
    shape: LlamaShape, dtype: str, shard_bytes: int, seed: int, base_seed: int | None
) -> dict[str, object]:
    return {
        "format": 1,
        "shape": asdict(shape),
        "dtype": dtype,
        "max_shard_bytes": shard_bytes,
        "seed": seed,
        "base_seed": base_seed,
        "delta_scale": DELTA_SCALE,
    }


def _up_to_date(folder: Path, marker: dict[str, object]) -> bool:
    path = folder / MARKER
    if not path.is_file():
        return False
    try:
        return bool(json.loads(path.read_text()) == marker)
    except (OSError, ValueError):
        return False


def _write_model(
    folder: Path, shape: LlamaShape, dtype: str, shard_bytes: int, seed: int, base_seed: int | None
) -> bool:
    """Write one checkpoint unless an identical one is there; True if it was written."""
    marker = _marker(shape, dtype, shard_bytes, seed, base_seed)
    if _up_to_date(folder, marker):
        return False
    if folder.exists():
        shutil.rmtree(folder)
    started = time.monotonic()
    write_checkpoint(
        folder,
        shape,
        seed=seed,
        base_seed=base_seed,
        dtype=DTYPES[dtype],
        delta_scale=DELTA_SCALE,
        max_shard_bytes=shard_bytes,
    )
    (folder / MARKER).write_text(json.dumps(marker, indent=2))
    size = checkpoint_bytes(folder)
    print(
        f"wrote {folder} ({size / 1e9:.2f} GB in {time.monotonic() - started:.0f} s)",
        file=sys.stderr,
    )
    return True


def ensure_dataset(
    model_gb: float,
    *,
    finetunes: int = 3,
    dtype: str = "bf16",
    shard_bytes: int = 2 * 1000**3,
    data: Path = DEFAULT_DATA,
) -> DataSet:
    """Generate (or find already generated) a base and ``finetunes`` fine-tunes."""
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; use one of {sorted(DTYPES)}")
    dtype = str(DTYPES[dtype]).removeprefix("torch.")
    shape = shape_for_bytes(int(model_gb * 1000**3), DTYPES[dtype])
    folder = data / set_name(model_gb, dtype, shard_bytes)
    base = folder / "base"
    _write_model(base, shape, dtype, shard_bytes, seed=BASE_SEED, base_seed=None)
    tuned = []
    for index in range(1, finetunes + 1):
        path = folder / f"finetune-{index}"
        _write_model(path, shape, dtype, shard_bytes, seed=index, base_seed=BASE_SEED)
        tuned.append(path)
    return DataSet(folder, base, tuple(tuned), shape, dtype)


def main(argv: list[str] | None = None) -> int:
    """Parse the arguments and generate the data set."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-gb", type=float, required=True, help="size of each model, GB")
    parser.add_argument("--finetunes", type=int, default=3, help="number of fine-tunes (K)")
    parser.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    parser.add_argument("--shard-size", type=parse_size, default=2 * 1000**3, help="e.g. 2GB")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="where sets are kept")
    args = parser.parse_args(argv)
    dataset = ensure_dataset(
        args.model_gb,
        finetunes=args.finetunes,
        dtype=args.dtype,
        shard_bytes=args.shard_size,
        data=args.data,
    )
    total = sum(checkpoint_bytes(m) for m in dataset.models)
    print(
        f"{dataset.folder}: {len(dataset.models)} models, {dataset.shape.num_hidden_layers} "
        f"layers, {dataset.shape.parameters() / 1e9:.2f} B parameters each, "
        f"{total / 1e9:.2f} GB in all",
        file=sys.stderr,
    )
    print(dataset.folder)
    return 0


if __name__ == "__main__":
    sys.exit(main())
