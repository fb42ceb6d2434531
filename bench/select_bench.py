"""Time magnitude top-k (the TIES trim) and DARE keep-masks against the usual torch routes.

Builds random bf16 "base" and "fine-tune" tensors of Llama-like shapes totalling ``--gb``
of bf16, takes the float32 delta of each pair, and times per method the seconds per GB of
bf16 delta (1 GB = 2^29 elements), as the median over ``--repeats`` runs per tensor:

- ``sort (mergekit)``: ``argsort(|δ|, descending)[:k]`` scattered into a mask, as mergekit's
  magnitude sparsification does; too slow to run on everything, it is timed on the first
  ``--sort-gb`` of tensors and extrapolated per element.
- ``kthvalue (TIES code)``: ``|δ| >= kthvalue(|δ|, n-k+1)``, as the TIES reference code.
- ``topk (PEFT)``: ``topk(|δ|, k)`` indices scattered into a mask, as PEFT's merge utils.
- ``magnitude_threshold`` and ``top_k_magnitude_mask`` (exact_k and threshold rules).
- ``StreamingMagnitudeSelect``: one threshold over the whole model (both passes).
- ``keep_mask``: the DARE mask of each tensor.

The base is N(0, 0.02²) in bf16; each fine-tune adds noise of standard deviation 0.001
(``--deltas scaled``) or 0.0002 (``--deltas bf16-ties``: about one bf16 ulp, as
``bench/generate.py --deltas bf16-ties`` draws it; the task vector then takes few distinct
values and about a sixth of its entries tie at the density-0.2 threshold).

Usage: ``python bench/select_bench.py [--gb 1.0] [--tensor-mib 64] [--repeats 3]
[--deltas bf16-ties]``.

On a machine whose cores other busy processes share, set ``OMP_WAIT_POLICY=PASSIVE``: by
default idle OpenMP workers spin at every barrier, and with more runnable threads than
cores each of the many chunk-sized operations can stall for a scheduler time slice.
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import statistics
import sys
import time
from collections.abc import Callable

import torch

from merge_kernels.methods.magnitude_select import (
    StreamingMagnitudeSelect,
    magnitude_threshold,
    top_k_magnitude_mask,
)
from merge_kernels.methods.random_mask import dare_key, keep_mask

ELEMENTS_PER_GB = 1 << 29  # 1 GB of bf16


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def llama_like_shapes(total_gb: float, tensor_mib: float) -> list[tuple[int, int]]:
    """Alternating (hidden, m) and (m, hidden) matrices of about ``tensor_mib`` each."""
    per_tensor = int(tensor_mib * (1 << 20) / 2)
    hidden = 4096 if per_tensor >= 4096 * 4096 else 1024
    m = max(128, round(per_tensor / hidden / 128) * 128)
    count = max(1, round(total_gb * ELEMENTS_PER_GB / (hidden * m)))
    return [(hidden, m) if i % 2 == 0 else (m, hidden) for i in range(count)]


def sort_mask(delta: torch.Tensor, k: int) -> torch.Tensor:
    order = torch.argsort(delta.abs().view(-1), descending=True)[:k]
    mask = torch.zeros(delta.numel(), dtype=torch.bool, device=delta.device)
    mask[order] = True
    return mask.view(delta.shape)


def kthvalue_mask(delta: torch.Tensor, k: int) -> torch.Tensor:
    mags = delta.abs()
    value = mags.view(-1).kthvalue(delta.numel() - k + 1).values
    return mags >= value


def topk_mask(delta: torch.Tensor, k: int) -> torch.Tensor:
    indices = torch.topk(delta.abs().view(-1), k, largest=True).indices
    mask = torch.zeros(delta.numel(), dtype=torch.bool, device=delta.device)
    mask[indices] = True
    return mask.view(delta.shape)


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def median_time(fn: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gb", type=float, default=1.0, help="GB of bf16 per model")
    parser.add_argument("--tensor-mib", type=float, default=64.0, help="MiB of bf16 per tensor")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--density", type=float, default=0.2, help="fraction kept (TIES: 0.2)")
    parser.add_argument("--sort-gb", type=float, default=0.125, help="GB timed for sort")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    parser.add_argument("--skip-baselines", action="store_true", help="time only ours")
    parser.add_argument("--device", default="cpu", help="where the tensors live (cpu, cuda)")
    parser.add_argument(
        "--deltas",
        choices=["scaled", "bf16-ties"],
        default="scaled",
        help="fine-tune noise: 1e-3 (scaled) or 2e-4 (bf16-ties: heavy ties at the threshold)",
    )
    args = parser.parse_args()
    noise_std = 2e-4 if args.deltas == "bf16-ties" else 1e-3
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)

    shapes = llama_like_shapes(args.gb, args.tensor_mib)
    generator = torch.Generator().manual_seed(0)
    bases, tunes = [], []
    for shape in shapes:
        base = (torch.randn(shape, generator=generator) * 0.02).bfloat16()
        noise = torch.randn(shape, generator=generator) * noise_std
        bases.append(base.to(device))
        tunes.append((base.float() + noise).bfloat16().to(device))
        del noise
    total = sum(b.numel() for b in bases)
    gb = total / ELEMENTS_PER_GB
    rss_inputs = peak_rss_mib()

    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, {platform.processor()}")
    print(f"cpus {os.cpu_count()}, load average at start {os.getloadavg()}")
    print(
        f"{len(shapes)} tensors {shapes[0]} / {shapes[-1]}, {total:,} elements = {gb:.3f} GB"
        f" of bf16 ({args.deltas} deltas); density {args.density}; median of {args.repeats}"
    )
    print(f"peak RSS after building the inputs: {rss_inputs:,.0f} MiB; device {device}")
    if device.type == "cuda":
        print(f"{torch.cuda.get_device_name(device)}")

    sort_budget = int(args.sort_gb * ELEMENTS_PER_GB)
    methods: list[tuple[str, Callable[[torch.Tensor, int], object], bool]] = [
        ("magnitude_threshold", magnitude_threshold, False),
        ("top_k_magnitude_mask exact_k", top_k_magnitude_mask, False),
        (
            "top_k_magnitude_mask threshold",
            lambda d, k: top_k_magnitude_mask(d, k, ties="threshold"),
            False,
        ),
    ]
    if not args.skip_baselines:
        methods += [
            ("kthvalue (TIES code)", kthvalue_mask, False),
            ("topk (PEFT)", topk_mask, False),
            ("sort (mergekit)", sort_mask, True),
        ]
    seconds = {name: 0.0 for name, _, _ in methods}
    covered = {name: 0 for name, _, _ in methods}
    rss_after: dict[str, float] = {}
    delta_seconds = 0.0
    keep_seconds = 0.0
    for index, (base, tuned) in enumerate(zip(bases, tunes, strict=True)):
        start = time.perf_counter()
        delta = tuned.float() - base.float()
        delta_seconds += time.perf_counter() - start
        n = delta.numel()
        k = int(args.density * n)
        for name, fn, subset in methods:
            if subset and covered[name] >= sort_budget:
                continue
            seconds[name] += median_time(lambda fn=fn, d=delta, k=k: fn(d, k), args.repeats)
            covered[name] += n
            rss_after[name] = peak_rss_mib()
        key = dare_key(0, 0, f"layer.{index}.weight")
        keep_seconds += median_time(
            lambda key=key, n=n: keep_mask(key, args.density, n, device=device), args.repeats
        )
        rss_after["keep_mask"] = peak_rss_mib()
        del delta
        print(f"tensor {index + 1}/{len(shapes)} timed", file=sys.stderr, flush=True)

    stream_seconds = []
    for _ in range(args.repeats):
        selector = StreamingMagnitudeSelect(total, int(args.density * total))
        elapsed = 0.0
        while selector.needs_pass():
            for base, tuned in zip(bases, tunes, strict=True):
                delta = tuned.float() - base.float()
                sync()
                start = time.perf_counter()
                selector.update(delta)
                sync()
                elapsed += time.perf_counter() - start
            sync()
            start = time.perf_counter()
            selector.end_pass()
            elapsed += time.perf_counter() - start
        stream_seconds.append(elapsed)
    rss_after["StreamingMagnitudeSelect"] = peak_rss_mib()

    print()
    print(f"{'method':<38} {'s/GB':>8} {'timed on':>10} {'peak RSS MiB':>13}")
    rows: list[tuple[str, float, str, float]] = []
    for name, _, subset in methods:
        if covered[name] == 0:
            continue
        per_gb = seconds[name] / (covered[name] / ELEMENTS_PER_GB)
        share = covered[name] / ELEMENTS_PER_GB
        label = f"{share:.3f} GB" + ("*" if subset and covered[name] < total else "")
        rows.append((name, per_gb, label, rss_after[name]))
    rows.append(
        (
            "StreamingMagnitudeSelect (2 passes)",
            statistics.median(stream_seconds) / gb,
            f"{gb:.3f} GB",
            rss_after["StreamingMagnitudeSelect"],
        )
    )
    rows.append(("keep_mask (DARE)", keep_seconds / gb, f"{gb:.3f} GB", rss_after["keep_mask"]))
    rows.append(("(float32 delta, for scale)", delta_seconds / gb, f"{gb:.3f} GB", rss_inputs))
    for name, per_gb, label, rss in rows:
        print(f"{name:<38} {per_gb:>8.2f} {label:>10} {rss:>13,.0f}")
    if any(label.endswith("*") for _, _, label, _ in rows):
        print("* timed on the first tensors only and extrapolated per element")
    if device.type == "cuda":
        print(f"peak CUDA memory allocated {torch.cuda.max_memory_allocated() / 2**20:,.0f} MiB")
    print(f"load average at end {os.getloadavg()}")


if __name__ == "__main__":
    main()
