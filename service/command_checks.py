"""Checks the ``tureen`` command makes before any work starts, so that a mistake in the
command line costs nothing and leaves nothing behind."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

from merge_kernels.errors import TureenError

_DEVICE = re.compile(r"^(cpu|cuda(:\d+)?)$")


class CommandLineError(TureenError):
    """An option's value cannot work on this machine or with these files."""

    code = "invalid_command_line"


def parse_device(text: str) -> str:
    """``cpu``, ``cuda`` or ``cuda:N``; anything else is an argparse usage error."""
    device = text.strip().lower()
    if not _DEVICE.match(device):
        raise argparse.ArgumentTypeError(f"{text!r} is not a device; use cpu, cuda or cuda:N")
    return device


def check_device_available(device: str) -> None:
    """Refuse a CUDA device this machine does not have, before anything is read or written.

    Raises:
        CommandLineError: CUDA is unavailable, or ``cuda:N`` names a missing GPU.
    """
    if not device.startswith("cuda"):
        return
    import torch

    if not torch.cuda.is_available():
        raise CommandLineError(
            f"--device {device}: CUDA is not available on this machine (no GPU, or this torch "
            "build has no CUDA support); use --device cpu",
            details={"field": "device"},
        )
    index = int(device.partition(":")[2] or 0)
    count = torch.cuda.device_count()
    if index >= count:
        raise CommandLineError(
            f"--device {device}: this machine has {count} CUDA device(s), "
            f"numbered 0 to {count - 1}",
            details={"field": "device"},
        )


def check_output_folder(out_dir: Path, *, overwrite: bool) -> None:
    """Refuse an existing output folder unless ``overwrite`` is set, before merging.

    Raises:
        CommandLineError: ``out_dir`` exists (or is a file) and ``overwrite`` is false.
    """
    if overwrite or not out_dir.exists():
        return
    kind = "folder" if out_dir.is_dir() else "file"
    raise CommandLineError(
        f"output {kind} {out_dir} already exists; choose another OUT_DIR, remove it, or pass "
        "--overwrite to replace it once the new merge is complete",
        details={"field": "out_dir"},
    )
