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

With ``--draw-on DEVICE`` (``cuda`` on a GPU machine) the weights are drawn by torch on that
device instead, with the same recipe (a base, and fine-tunes that add a delta of 1% of the mean
weight magnitude from their own seeds) but other random streams, and the models are written
concurrently, without hashing or fsyncing each shard (one ``sync`` at the end): on a GPU
machine this writes a set at the disk's speed, where drawing on the CPU takes minutes for tens
of GB. Such sets are marked with the device and never mistaken for CPU-drawn ones.

With ``--deltas bf16-ties`` the fine-tunes are those of a real bf16 fine-tune instead: the
base is drawn as N(0, 0.02²) and stored in the dtype, and each fine-tune is the stored base
plus noise N(0, (0.01·0.02)²), rounded to the dtype. The noise is about one unit in the last
place of a bf16 weight, so each task vector takes few distinct values and the k-th largest
magnitude of a TIES trim (density 0.2) is shared by a large share of the entries (about a
sixth of them): heavy ties at the threshold. These sets are drawn with the same random
streams on any device (CPU generator), are named with a ``-bf16ties`` suffix and never mistaken
for the default ones.

Usage: ``python bench/generate.py --model-gb 3 [--finetunes 3] [--dtype bf16]
[--shard-size 2GB] [--data bench/data] [--draw-on cuda] [--deltas bf16-ties]``; prints the
set's folder. A small set for a 2-core machine: ``--model-gb 0.5`` (one layer beside the
embeddings, about 250 M parameters per model).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from merge_kernels.io.dtypes import dtype_code
from merge_kernels.io.shard_plan import OutputTensor, index_json, plan_shards
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
# --deltas: how the fine-tunes differ from the base (see the module docstring).
DELTAS = ("scaled", "bf16-ties")
TIES_BASE_STD = 0.02  # bf16-ties: the base's standard deviation...
TIES_NOISE_STD = 0.01 * TIES_BASE_STD  # ...and the fine-tunes' noise, about one bf16 ulp


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
    shape: LlamaShape,
    dtype: str,
    shard_bytes: int,
    seed: int,
    base_seed: int | None,
    draw_on: str | None = None,
    deltas: str = "scaled",
) -> dict[str, object]:
    marker: dict[str, object] = {
        "format": 1,
        "shape": asdict(shape),
        "dtype": dtype,
        "max_shard_bytes": shard_bytes,
        "seed": seed,
        "base_seed": base_seed,
        "delta_scale": DELTA_SCALE,
    }
    if draw_on is not None:
        marker["drawn_on"] = draw_on
    if deltas != "scaled":  # the default sets' markers stay as they were
        marker["deltas"] = deltas
        marker["base_std"] = TIES_BASE_STD
        marker["noise_std"] = TIES_NOISE_STD
    return marker


def _up_to_date(folder: Path, marker: dict[str, object]) -> bool:
    path = folder / MARKER
    if not path.is_file():
        return False
    try:
        return bool(json.loads(path.read_text()) == marker)
    except (OSError, ValueError):
        return False


def _draw_tied(
    name: str, shape: tuple[int, ...], seed: int, base_seed: int | None, dtype: torch.dtype
) -> torch.Tensor:
    """One tensor of a ``bf16-ties`` model, in ``dtype``: the base N(0, 0.02²) stored in the
    dtype, or a fine-tune: that stored base plus N(0, (0.01·0.02)²), rounded to the dtype."""
    key = sum(name.encode()) * 7919 + len(name)
    generator = torch.Generator().manual_seed(
        (base_seed if base_seed is not None else seed) * 1_000_003 + key
    )
    base = torch.randn(shape, generator=generator).mul_(TIES_BASE_STD).to(dtype)
    if base_seed is None:
        return base
    generator.manual_seed(seed * 1_000_003 + key + 1)
    noise = torch.randn(shape, generator=generator).mul_(TIES_NOISE_STD)
    return noise.add_(base.float()).to(dtype)


def _draw(
    name: str,
    shape: tuple[int, ...],
    seed: int,
    base_seed: int | None,
    device: torch.device,
) -> torch.Tensor:
    """One tensor of a synthetic model, drawn on ``device`` (float32).

    The recipe of :func:`merge_kernels.synthetic.write_checkpoint`: norms near 1, matrices with
    standard deviation 1/sqrt(fan-in); a fine-tune adds a delta of relative size DELTA_SCALE
    (of the base's mean magnitude) from its own seed.
    """
    key = sum(name.encode()) * 7919 + len(name)
    generator = torch.Generator(device=device)
    generator.manual_seed((base_seed if base_seed is not None else seed) * 1_000_003 + key)
    base = torch.randn(shape, generator=generator, device=device)
    base = base.mul_(0.1).add_(1.0) if len(shape) == 1 else base.mul_(1.0 / math.sqrt(shape[-1]))
    if base_seed is None:
        return base
    generator.manual_seed(seed * 1_000_003 + key + 1)
    delta = torch.randn(shape, generator=generator, device=device)
    return base.add_(delta, alpha=DELTA_SCALE * float(base.abs().mean()))


def _pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    done = 0
    while done < len(data):
        done += os.pwrite(fd, data[done:], offset + done)


def write_drawn_checkpoint(
    folder: Path,
    shape: LlamaShape,
    *,
    seed: int,
    base_seed: int | None,
    dtype: torch.dtype,
    max_shard_bytes: int,
    device: torch.device,
    deltas: str = "scaled",
) -> None:
    """Write a synthetic checkpoint whose tensors are drawn on ``device``.

    Shards are laid out as :func:`merge_kernels.synthetic.write_checkpoint` lays them out and
    written with ``pwrite`` at their planned offsets; nothing is hashed or fsynced here.
    ``bf16-ties`` deltas are drawn on the CPU whatever ``device`` is.
    """
    folder.mkdir(parents=True, exist_ok=True)
    names = shape.tensors()
    by_name = dict(names)
    code = dtype_code(dtype)
    shards = plan_shards([OutputTensor(n, code, s) for n, s in names], max_shard_bytes)
    for spec in shards:
        fd = os.open(folder / spec.filename, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            _pwrite_all(fd, memoryview(spec.header), 0)
            os.ftruncate(fd, spec.size)
            for tensor in spec.tensors:
                dims = by_name[tensor.name]
                if deltas == "bf16-ties":
                    drawn = _draw_tied(tensor.name, dims, seed, base_seed, dtype)
                else:
                    drawn = _draw(tensor.name, dims, seed, base_seed, device)
                host = drawn.to(dtype).cpu().contiguous().reshape(-1)
                _pwrite_all(fd, host.view(torch.uint8).numpy().data, spec.offsets[tensor.name][0])
        finally:
            os.close(fd)
    if len(shards) > 1:
        (folder / "model.safetensors.index.json").write_text(
            json.dumps(index_json(shards), indent=2)
        )
    (folder / "config.json").write_text(json.dumps(shape.config(dtype), indent=2))


def _write_model(
    folder: Path,
    shape: LlamaShape,
    dtype: str,
    shard_bytes: int,
    seed: int,
    base_seed: int | None,
    draw_on: str | None = None,
    deltas: str = "scaled",
) -> bool:
    """Write one checkpoint unless an identical one is there; True if it was written."""
    marker = _marker(shape, dtype, shard_bytes, seed, base_seed, draw_on, deltas)
    if _up_to_date(folder, marker):
        return False
    if folder.exists():
        shutil.rmtree(folder)
    started = time.monotonic()
    if deltas != "scaled":
        write_drawn_checkpoint(
            folder,
            shape,
            seed=seed,
            base_seed=base_seed,
            dtype=DTYPES[dtype],
            max_shard_bytes=shard_bytes,
            device=torch.device(draw_on or "cpu"),
            deltas=deltas,
        )
    elif draw_on is None:
        write_checkpoint(
            folder,
            shape,
            seed=seed,
            base_seed=base_seed,
            dtype=DTYPES[dtype],
            delta_scale=DELTA_SCALE,
            max_shard_bytes=shard_bytes,
        )
    else:
        write_drawn_checkpoint(
            folder,
            shape,
            seed=seed,
            base_seed=base_seed,
            dtype=DTYPES[dtype],
            max_shard_bytes=shard_bytes,
            device=torch.device(draw_on),
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
    draw_on: str | None = None,
    deltas: str = "scaled",
) -> DataSet:
    """Generate (or find already generated) a base and ``finetunes`` fine-tunes.

    With ``draw_on`` (a torch device such as ``"cuda"``) the tensors are drawn on that device
    and the models written concurrently (see the module docstring), then synced once.
    ``deltas`` is ``scaled`` (the default sets) or ``bf16-ties`` (heavy ties at the TIES
    threshold, see the module docstring).
    """
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; use one of {sorted(DTYPES)}")
    if deltas not in DELTAS:
        raise ValueError(f"unknown deltas {deltas!r}; use one of {DELTAS}")
    dtype = str(DTYPES[dtype]).removeprefix("torch.")
    shape = shape_for_bytes(int(model_gb * 1000**3), DTYPES[dtype])
    name = set_name(model_gb, dtype, shard_bytes)
    if draw_on is not None:
        draw_on = torch.device(draw_on).type
        name = f"{name}-{draw_on}"
    if deltas == "bf16-ties":
        name = f"{name}-bf16ties"
    folder = data / name
    base = folder / "base"
    tuned = [folder / f"finetune-{index}" for index in range(1, finetunes + 1)]
    jobs: list[tuple[Path, int, int | None]] = [(base, BASE_SEED, None)]
    jobs += [(path, index, BASE_SEED) for index, path in enumerate(tuned, start=1)]
    if draw_on is None:
        for path, seed, base_seed in jobs:
            _write_model(
                path, shape, dtype, shard_bytes, seed=seed, base_seed=base_seed, deltas=deltas
            )
    else:
        with ThreadPoolExecutor(max_workers=len(jobs)) as pool:
            futures = [
                pool.submit(
                    _write_model, path, shape, dtype, shard_bytes, seed, base_seed, draw_on, deltas
                )
                for path, seed, base_seed in jobs
            ]
            written = [future.result() for future in futures]
        if any(written):
            started = time.monotonic()
            os.sync()
            print(f"sync: {time.monotonic() - started:.1f} s", file=sys.stderr)
    return DataSet(folder, base, tuple(tuned), shape, dtype)


def main(argv: list[str] | None = None) -> int:
    """Parse the arguments and generate the data set."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-gb", type=float, required=True, help="size of each model, GB")
    parser.add_argument("--finetunes", type=int, default=3, help="number of fine-tunes (K)")
    parser.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    parser.add_argument("--shard-size", type=parse_size, default=2 * 1000**3, help="e.g. 2GB")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="where sets are kept")
    parser.add_argument(
        "--draw-on", help="draw the weights with torch on this device (e.g. cuda); faster"
    )
    parser.add_argument(
        "--deltas",
        choices=DELTAS,
        default="scaled",
        help="bf16-ties: fine-tunes one bf16 ulp from the base (heavy ties at the TIES threshold)",
    )
    args = parser.parse_args(argv)
    started = time.monotonic()
    dataset = ensure_dataset(
        args.model_gb,
        finetunes=args.finetunes,
        dtype=args.dtype,
        shard_bytes=args.shard_size,
        data=args.data,
        draw_on=args.draw_on,
        deltas=args.deltas,
    )
    total = sum(checkpoint_bytes(m) for m in dataset.models)
    print(
        f"{dataset.folder}: {len(dataset.models)} models, {dataset.shape.num_hidden_layers} "
        f"layers, {dataset.shape.parameters() / 1e9:.2f} B parameters each, "
        f"{total / 1e9:.2f} GB in all ({time.monotonic() - started:.1f} s)",
        file=sys.stderr,
    )
    print(dataset.folder)
    return 0


if __name__ == "__main__":
    sys.exit(main())
