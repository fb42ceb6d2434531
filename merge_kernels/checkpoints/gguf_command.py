"""The ``tureen import-gguf FILE OUT_DIR`` command, wrapping :func:`import_gguf`."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from merge_kernels.checkpoints.gguf_import import (
    DEFAULT_DTYPE,
    DEFAULT_SHARD_BYTES,
    OUTPUT_DTYPES,
    import_gguf,
)


def cmd_import_gguf(args: argparse.Namespace) -> int:
    """Import a GGUF file as a safetensors checkpoint; print what was written as JSON."""

    def progress(done: int, total: int) -> None:
        print(f"\r{done}/{total} tensors", end="", file=sys.stderr, flush=True)

    try:
        result = import_gguf(
            Path(args.file),
            Path(args.out_dir),
            dtype=args.dtype,
            max_shard_bytes=args.shard_size,
            overwrite=args.overwrite,
            progress=None if args.quiet else progress,
        )
    except FileExistsError as error:
        print(f"error: {error}; pass --overwrite to replace it", file=sys.stderr)
        return 2
    if not args.quiet:
        print(file=sys.stderr)
    print(json.dumps(result.report(), indent=2))
    return 0


def add_import_gguf_command(
    subparsers: Any, *, parse_size: Callable[[str], int]
) -> argparse.ArgumentParser:
    """Add ``import-gguf`` to ``subparsers`` (the result of ``add_subparsers``).

    Args:
        subparsers: where to add the command.
        parse_size: turns ``--shard-size`` text (``5GB``) into bytes.

    Returns:
        The command's parser.
    """
    command: argparse.ArgumentParser = subparsers.add_parser(
        "import-gguf",
        help="convert a GGUF file into a safetensors checkpoint",
        description="Dequantise a GGUF file (llama.cpp's format) tensor by tensor into a "
        "safetensors checkpoint folder (config, tokenizer, weights) that transformers loads "
        "and tureen merges. OUT_DIR appears only once complete.",
    )
    command.add_argument("file", help="the .gguf file")
    command.add_argument("out_dir", help="output folder (appears only when complete)")
    command.add_argument(
        "--dtype",
        choices=list(OUTPUT_DTYPES),
        default=DEFAULT_DTYPE,
        help="output dtype (default float32: exact for every quantisation type)",
    )
    command.add_argument(
        "--shard-size",
        type=parse_size,
        default=DEFAULT_SHARD_BYTES,
        help="largest output shard, e.g. 5GB (default) or 500MB",
    )
    command.add_argument("--overwrite", action="store_true", help="replace an existing OUT_DIR")
    command.add_argument("--quiet", action="store_true", help="no progress output")
    command.set_defaults(handler=cmd_import_gguf)
    return command
