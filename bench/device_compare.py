"""The streaming merge with kernels on the CPU and on CUDA: wall time and output agreement.

    python bench/device_compare.py --model-gb 1 --folder ../tureen-gpu-data [--methods linear ties]

Writes a bf16 base and three synthetic fine-tunes of ``--model-gb`` each (once), merges
each method with ``device=cpu`` and ``device=cuda``, alternating, and prints the median
wall time of each and the largest difference between the two outputs (DARE masks are the
same bits on both devices, so DARE outputs differ only by float rounding).
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import time
from pathlib import Path

import torch
from safetensors import safe_open

from merge_kernels.recipe import parse_recipe
from merge_kernels.runner import MergeOptions, run_merge
from merge_kernels.synthetic import shape_for_bytes, write_checkpoint

RECIPES = {
    "linear": {"merge_method": "linear"},
    "task_arithmetic": {"merge_method": "task_arithmetic", "base_model": "base"},
    "ties": {"merge_method": "ties", "base_model": "base", "parameters": {"density": 0.2}},
    "dare_ties": {
        "merge_method": "dare_ties",
        "base_model": "base",
        "parameters": {"density": 0.1},
    },
}


def _max_difference(a: Path, b: Path) -> float:
    worst = 0.0
    for file in sorted(a.glob("*.safetensors")):
        with safe_open(file, "pt") as left, safe_open(b / file.name, "pt") as right:
            for name in left.keys():  # noqa: SIM118 (safe_open has no __iter__)
                x, y = left.get_tensor(name).float(), right.get_tensor(name).float()
                worst = max(worst, float((x - y).abs().max()))
    return worst


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-gb", type=float, default=1.0)
    parser.add_argument("--folder", type=Path, required=True)
    parser.add_argument("--methods", nargs="+", default=list(RECIPES))
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    shape = shape_for_bytes(int(args.model_gb * 1e9))
    models = ["finetune-1", "finetune-2", "finetune-3"]
    if not (args.folder / "base").exists():
        write_checkpoint(args.folder / "base", shape, seed=0, dtype=torch.bfloat16)
        for index, name in enumerate(models, 1):
            write_checkpoint(
                args.folder / name, shape, seed=index, base_seed=0, dtype=torch.bfloat16
            )
    print(f"cuda: {torch.cuda.get_device_name(0)}; torch {torch.__version__}")
    print("| method | cpu s | cuda s | cpu/cuda | max |cpu − cuda| |\n|---|---|---|---|---|")
    for method in args.methods:
        document = dict(RECIPES[method])
        names = models if document.get("base_model") else ["base", *models]
        document["models"] = [{"model": name} for name in names]
        recipe = parse_recipe(document, base_dir=args.folder)
        times: dict[str, list[float]] = {"cpu": [], "cuda": []}
        for _ in range(args.repeats):
            for device in ("cpu", "cuda"):
                out = args.folder / f"out-{method}-{device}"
                shutil.rmtree(out, ignore_errors=True)
                start = time.perf_counter()
                run_merge(recipe, out, MergeOptions(base_dir=args.folder, device=device))
                times[device].append(time.perf_counter() - start)
        cpu, cuda = statistics.median(times["cpu"]), statistics.median(times["cuda"])
        difference = _max_difference(
            args.folder / f"out-{method}-cpu", args.folder / f"out-{method}-cuda"
        )
        print(f"| {method} | {cpu:.2f} | {cuda:.2f} | {cpu / cuda:.2f} | {difference:.3g} |")


if __name__ == "__main__":
    main()
