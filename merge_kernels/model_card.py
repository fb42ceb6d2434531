"""The files that accompany merged weights: config, tokenizer, provenance and model card."""

from __future__ import annotations

import copy
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from merge_kernels import __version__
from merge_kernels.checkpoints.base import Checkpoint
from merge_kernels.checkpoints.reference import HubRef, LoraRef
from merge_kernels.io.staging import write_bytes_atomic, write_json_atomic
from merge_kernels.module_layouts import set_config_value
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
EVALUATION_FILE = "evaluation.json"
_TORCH_DTYPE_NAMES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}


def input_provenance(
    role: str, checkpoint: Checkpoint, sha256: Callable[[Path], str]
) -> dict[str, Any]:
    """Identify an input: its revision and every weight file's size and sha256.

    Hub inputs are pinned by their commit SHA; every weight file is listed with its size
    and the sha256 of its whole content, so two inputs with the same layout but different
    weights (fine-tunes of one base) are told apart. ``hub_repos`` lists the Hub
    repositories the input comes from (both sides of a base + LoRA input), for the card's
    ``base_model``.

    Args:
        role: ``base`` or ``model``.
        checkpoint: the input.
        sha256: the digest of one of its weight files (see ``InputHashes``).
    """
    files = [
        {"file": path.name, "bytes": path.stat().st_size, "sha256": sha256(path)}
        for path in checkpoint.files()
    ]
    ref = checkpoint.ref
    sides = [ref.base, ref.adapter] if isinstance(ref, LoraRef) else [ref]
    return {
        "role": role,
        "reference": checkpoint.display_name,
        "revision": checkpoint.revision,
        "hub_repos": [side.repo for side in sides if isinstance(side, HubRef)],
        "files": files,
    }


def write_config(
    source: Checkpoint,
    out_dir: Path,
    dtype_code: str | None,
    vocab_size: int | None = None,
    updates: Mapping[str, object] | None = None,
) -> None:
    """Copy ``config.json`` from ``source``, with its dtype set to the output's, its
    ``vocab_size`` when the merge built a vocabulary, and the dotted paths of ``updates`` (a
    stacked model's layer counts) set."""
    if not source.has_config:
        return
    config = copy.deepcopy(dict(source.config))
    if vocab_size is not None:
        text = config.get("text_config")
        if "vocab_size" not in config and isinstance(text, dict) and "vocab_size" in text:
            config["text_config"] = {**text, "vocab_size": vocab_size}
        else:
            config["vocab_size"] = vocab_size
    for path, value in (updates or {}).items():
        set_config_value(config, path, value)
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
        if source.confinement.is_file(path):
            source.confinement.copy_file(path, out_dir / name)
            copied.append(name)
    return copied


@dataclass(frozen=True)
class CardExtras:
    """What a merge adds to its model card beyond the engine's own recipe and inputs.

    Attributes:
        recipe: the recipe to show and save instead of the engine's (a greedy soup's, whose
            output the engine writes as a linear merge of the kept ingredients).
        evaluate: called with the finished folder (weights, config, tokenizer) before the
            card is written; returns the evaluation report for the card and
            ``evaluation.json``.
        references: inputs to name otherwise in the card and the provenance, by their
            reference (a multi-document file's intermediates by their document's name, so
            that no folder of the machine that merged shows).
    """

    recipe: Recipe | None = None
    evaluate: Callable[[Path], dict[str, Any]] | None = None
    references: Mapping[str, str] = field(default_factory=dict)


def _evaluation_section(evaluation: dict[str, Any]) -> str:
    lines = ["## Evaluation", ""]
    summary = evaluation.get("summary")
    if isinstance(summary, list) and summary:
        lines += ["| model | score |", "|---|---|"]
        lines += [f"| {row['model']} | {row['score']} |" for row in summary]
        lines.append("")
    search = evaluation.get("search")
    if isinstance(search, dict):  # a searched recipe (merge_kernels.search): how it was found
        lines += [
            f"Found by a {search.get('strategy')} search over "
            f"{', '.join(map(str, search.get('dimensions', [])))} "
            f"({search.get('evaluations')} evaluations); the best point: "
            f"`{json.dumps(search.get('best_point'))}`. Every point and score: `report.json`.",
            "",
        ]
    lines += [
        "Full report (also in `evaluation.json`):",
        "",
        "```json",
        json.dumps(evaluation, indent=2),
        "```",
        "",
    ]
    return "\n".join(lines)


def hub_base_models(provenance: Sequence[dict[str, Any]]) -> list[str]:
    """The Hub repository ids among the inputs, for the card's ``base_model`` list.

    The Hub accepts only repository ids there: local folders are left out (they appear in
    the card's table of inputs), revisions are dropped (they are recorded in the table, by
    commit SHA), and a base + LoRA input contributes each side that is a Hub repository.

    Args:
        provenance: the inputs, as :func:`input_provenance` describes them.

    Returns:
        Repository ids in input order, without duplicates.
    """
    found: list[str] = []
    for item in provenance:
        for repo in item.get("hub_repos", []):
            if repo not in found:
                found.append(repo)
    return found


def write_model_card(
    out_dir: Path,
    recipe: Recipe,
    provenance: Sequence[dict[str, Any]],
    title: str,
    evaluation: dict[str, Any] | None = None,
) -> None:
    """Write ``README.md`` (Hub model card with YAML front matter) and the recipe file."""
    spec = recipe.method
    front: dict[str, Any] = {}
    bases = hub_base_models(provenance)
    if bases:
        front = {"base_model": bases, "base_model_relation": "merge"}
    front |= {"library_name": "transformers", "tags": ["merge", "tureen", spec.name]}
    rows = "\n".join(
        f"| {p['role']} | `{p['reference']}` | {p['revision'] or 'local'} | "
        + ", ".join(f"{f['file']} ({f['bytes']} B, sha256 `{f['sha256']}`)" for f in p["files"])
        + " |"
        for p in provenance
    )
    body = (
        f"# {title}\n\n"
        f"Merged with tureen {__version__} using **{spec.title}** ({spec.paper}).\n\n"
        "## Inputs\n\n| role | reference | revision | weight files |\n|---|---|---|---|\n"
        f"{rows}\n\n## Recipe\n\n```yaml\n{recipe.to_yaml()}```\n"
    )
    if evaluation is not None:
        body += "\n" + _evaluation_section(evaluation)
        write_json_atomic(out_dir / EVALUATION_FILE, evaluation)
    card = f"---\n{yaml.safe_dump(front, sort_keys=False)}---\n\n{body}"
    write_bytes_atomic(out_dir / "README.md", card.encode())
    write_bytes_atomic(out_dir / RECIPE_FILE, recipe.to_yaml().encode())
