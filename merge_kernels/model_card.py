"""The files that accompany merged weights: config, tokenizer, provenance and model card."""

from __future__ import annotations

import hashlib
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from merge_kernels import __version__
from merge_kernels.checkpoints.base import Checkpoint
from merge_kernels.io.staging import write_bytes_atomic, write_json_atomic
from merge_kernels.recipe import Recipe

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
    "generation_config.json",
)
RECIPE_FILE = "tureen_recipe.yaml"
_TORCH_DTYPE_NAMES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}


def input_provenance(role: str, checkpoint: Checkpoint) -> dict[str, Any]:
    """Identify an input without reading its tensor data.

    Hub inputs are pinned by their commit SHA; every weight file is listed with its size
    and the sha256 of its safetensors header (names, dtypes, shapes and offsets), which
    changes whenever the file's layout does.
    """
    files = []
    for path in checkpoint.files():
        with path.open("rb") as handle:
            length = int.from_bytes(handle.read(8), "little")
            header = handle.read(min(length, 100 * 1024 * 1024))
        files.append(
            {
                "file": path.name,
                "bytes": path.stat().st_size,
                "header_sha256": hashlib.sha256(header).hexdigest(),
            }
        )
    return {
        "role": role,
        "reference": checkpoint.display_name,
        "revision": checkpoint.revision,
        "files": files,
    }


def write_config(source: Checkpoint, out_dir: Path, dtype_code: str | None) -> None:
    """Copy ``config.json`` from ``source``, with its dtype set to the output's."""
    if not source.has_config:
        return
    config = dict(source.config)
    if dtype_code in _TORCH_DTYPE_NAMES:
        name = _TORCH_DTYPE_NAMES[dtype_code]
        keys = [key for key in ("torch_dtype", "dtype") if key in config] or ["torch_dtype"]
        for key in keys:
            config[key] = name
    write_json_atomic(out_dir / "config.json", config)


def copy_tokenizer(source: Checkpoint, out_dir: Path) -> list[str]:
    """Copy the tokenizer and generation config files that ``source`` has."""
    copied = []
    for name in TOKENIZER_FILES:
        path = source.folder / name
        if path.is_file():
            shutil.copyfile(path, out_dir / name)
            copied.append(name)
    return copied


def write_model_card(
    out_dir: Path, recipe: Recipe, provenance: Sequence[dict[str, Any]], title: str
) -> None:
    """Write ``README.md`` (Hub model card with YAML front matter) and the recipe file."""
    spec = recipe.method
    bases = [p["reference"] for p in provenance]
    front = {
        "base_model": bases,
        "base_model_relation": "merge",
        "library_name": "transformers",
        "tags": ["merge", "tureen", spec.name],
    }
    rows = "\n".join(
        f"| {p['role']} | `{p['reference']}` | {p['revision'] or 'local'} | "
        + ", ".join(
            f"{f['file']} ({f['bytes']} B, header sha256 {f['header_sha256'][:16]}…)"
            for f in p["files"]
        )
        + " |"
        for p in provenance
    )
    body = (
        f"# {title}\n\n"
        f"Merged with tureen {__version__} using **{spec.title}** ({spec.paper}).\n\n"
        "## Inputs\n\n| role | reference | revision | weight files |\n|---|---|---|---|\n"
        f"{rows}\n\n## Recipe\n\n```yaml\n{recipe.to_yaml()}```\n"
    )
    card = f"---\n{yaml.safe_dump(front, sort_keys=False)}---\n\n{body}"
    write_bytes_atomic(out_dir / "README.md", card.encode())
    write_bytes_atomic(out_dir / RECIPE_FILE, recipe.to_yaml().encode())
