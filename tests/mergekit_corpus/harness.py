"""Run one corpus config through mergekit 0.1.5 and tureen on tiny checkpoints and compare.

mergekit is the oracle here only (tests and benchmarks; never imported by the engine).
tureen is driven through its public entry points alone (``parse_recipe`` and
``runner.run_merge``), once with ``reference: mergekit`` (compared with mergekit) and once
unchanged (which must be accepted and run). A ``name:`` multi-merge file runs its documents
in order, each engine feeding its own earlier outputs to the later documents.

Comparison rules:

* tensor names and shapes, and the output config's ``num_hidden_layers`` and
  ``vocab_size``, must be equal;
* deterministic methods: relative L2 error ≤ 1e-6 per tensor;
* DARE and DELLA (random masks): the fraction of elements the merge changes from the base
  and the norm of the merged task vector, over the whole model.

Trims that rank magnitudes (TIES, Breadcrumbs) or variances (SCE) meet many ties on tiny
fp16/bf16 checkpoints, and mergekit's unstable sorts leave which tied entries survive
unspecified. mergekit therefore runs with that order pinned to tureen's (``pinned_ties``, one
of the orders its sorts may return), and those methods are compared value for value too.
"""

from __future__ import annotations

import json
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors.torch import load_file

from merge_kernels.recipe import parse_recipe
from merge_kernels.runner import MergeOptions, run_merge
from tests.mergekit_corpus.pinned_ties import pinned_ties
from tests.mergekit_corpus.tiny_models import MappedConfig, map_config

CONFIG_DIR = Path(__file__).parent / "configs"
RANDOM_METHODS = {"dare_ties", "dare_linear", "della", "della_linear"}
RELATIVE_L2 = 1e-6
KEPT_FRACTION_SLACK = 0.03
NORM_RATIO_SLACK = 0.15
_STAGE = "@stage:"


def config_paths() -> list[Path]:
    """Every corpus config, sorted by name."""
    return sorted(CONFIG_DIR.glob("*.yaml"))


def load_documents(path: Path) -> list[dict[str, Any]]:
    """The YAML documents of a config file (one, or several for a multi-merge file)."""
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


@dataclass
class Comparison:
    """How tureen's output compares with mergekit's."""

    rule: str
    problems: list[str] = field(default_factory=list)
    worst: float = 0.0
    worst_tensor: str = ""


@dataclass
class CorpusResult:
    """The outcome of one config."""

    name: str
    methods: list[str]
    mergekit_error: str | None = None
    unchanged_error: str | None = None
    reference_error: str | None = None
    comparison: Comparison | None = None

    @property
    def accepted(self) -> bool:
        return self.unchanged_error is None and self.reference_error is None

    @property
    def ok(self) -> bool:
        return (
            self.mergekit_error is None
            and self.accepted
            and self.comparison is not None
            and not self.comparison.problems
        )

    def summary(self) -> str:
        """One paragraph saying what went wrong (empty when nothing did)."""
        lines = []
        for label, error in (
            ("mergekit failed", self.mergekit_error),
            ("tureen refused the config unchanged", self.unchanged_error),
            ("tureen refused the config with reference: mergekit", self.reference_error),
        ):
            if error:
                lines.append(f"{label}: {error}")
        if self.comparison is not None:
            lines += self.comparison.problems
        return "\n".join(lines)


def _substitute(value: Any, outputs: dict[str, str]) -> Any:
    if isinstance(value, str) and value.startswith(_STAGE):
        return outputs[value.removeprefix(_STAGE)]
    if isinstance(value, str) and _STAGE in value:  # a stage output as a LoRA base
        for name, folder in outputs.items():
            value = value.replace(_STAGE + name, folder)
        return value
    if isinstance(value, dict):
        return {k: _substitute(v, outputs) for k, v in value.items()}
    if isinstance(value, list):
        return [_substitute(v, outputs) for v in value]
    return value


def _stage_dir(out_root: Path, index: int, name: str | None) -> Path:
    return out_root / f"{index}-{name or 'final'}"


def run_mergekit(mapped: MappedConfig, out_root: Path) -> Path:
    """Run every document with mergekit; returns the last output folder."""
    from mergekit.config import MergeConfiguration  # type: ignore[import-untyped]
    from mergekit.merge import run_merge as mergekit_run  # type: ignore[import-untyped]
    from mergekit.options import MergeOptions as MergekitOptions  # type: ignore[import-untyped]

    options = MergekitOptions(
        device="cpu",
        random_seed=0,
        quiet=True,
        write_model_card=False,
        lora_merge_cache=str(out_root / "lora-cache"),
    )
    outputs: dict[str, str] = {}
    out = out_root
    for index, (doc, name) in enumerate(zip(mapped.documents, mapped.names, strict=True)):
        out = _stage_dir(out_root, index, name)
        config = MergeConfiguration.model_validate(_substitute(doc, outputs))
        with pinned_ties():
            mergekit_run(config, str(out), options)
        if name:
            outputs[name] = str(out)
    return out


def run_tureen(mapped: MappedConfig, out_root: Path, reference: str | None) -> Path:
    """Run every document with tureen (``reference`` added when given); the last output."""
    outputs: dict[str, str] = {}
    out = out_root
    for index, (doc, name) in enumerate(zip(mapped.documents, mapped.names, strict=True)):
        out = _stage_dir(out_root, index, name)
        document = _substitute(doc, outputs)
        if reference is not None:
            document = {**document, "reference": reference}
        run_merge(parse_recipe(document), out, MergeOptions())
        if name:
            outputs[name] = str(out)
    return out


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for path in sorted(folder.glob("*.safetensors")):
        tensors.update(load_file(str(path)))
    return tensors


def _config(folder: Path) -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads((folder / "config.json").read_text())
    return loaded


def _relative_l2(ours: torch.Tensor, theirs: torch.Tensor) -> float:
    a, b = ours.double(), theirs.double()
    scale = max(float(b.norm().item()), 1e-30)
    return float((a - b).norm().item()) / scale


def _compare_structure(ours: Path, theirs: Path, comparison: Comparison) -> bool:
    mine, oracle = _tensors(ours), _tensors(theirs)
    if set(mine) != set(oracle):
        missing = sorted(set(oracle) - set(mine))[:5]
        extra = sorted(set(mine) - set(oracle))[:5]
        comparison.problems.append(f"tensor names differ: missing {missing}, extra {extra}")
        return False
    for name in sorted(oracle):
        if mine[name].shape != oracle[name].shape:
            comparison.problems.append(
                f"{name}: shape {tuple(mine[name].shape)} vs mergekit {tuple(oracle[name].shape)}"
            )
    for key in ("num_hidden_layers", "vocab_size"):
        if _config(ours).get(key) != _config(theirs).get(key):
            comparison.problems.append(
                f"config {key}: {_config(ours).get(key)} vs mergekit {_config(theirs).get(key)}"
            )
    return not comparison.problems


def _compare_exact(ours: Path, theirs: Path, comparison: Comparison) -> None:
    mine, oracle = _tensors(ours), _tensors(theirs)
    for name in sorted(oracle):
        error = _relative_l2(mine[name], oracle[name])
        if error > comparison.worst:
            comparison.worst, comparison.worst_tensor = error, name
        if error > RELATIVE_L2:
            comparison.problems.append(f"{name}: relative L2 {error:.3g} > {RELATIVE_L2}")


def _compare_statistics(
    ours: Path, theirs: Path, base: Path | None, comparison: Comparison
) -> None:
    if base is None:
        comparison.problems.append("no base model to measure the random masks against")
        return
    mine, oracle, reference = _tensors(ours), _tensors(theirs), _tensors(base)
    kept = {"tureen": 0.0, "mergekit": 0.0}
    norms = {"tureen": 0.0, "mergekit": 0.0}
    total = 0
    for name in sorted(oracle):
        if name not in reference or reference[name].shape != oracle[name].shape:
            continue  # resized vocabularies have no base to compare against
        base_tensor = reference[name].double()
        for label, tensors in (("tureen", mine), ("mergekit", oracle)):
            delta = tensors[name].double() - base_tensor
            kept[label] += (delta != 0).sum().item()
            norms[label] += delta.pow(2).sum().item()
        total += base_tensor.numel()
    kept_mine, kept_oracle = kept["tureen"] / total, kept["mergekit"] / total
    ratio = (norms["tureen"] / max(norms["mergekit"], 1e-30)) ** 0.5
    comparison.worst = max(abs(kept_mine - kept_oracle), abs(ratio - 1))
    comparison.worst_tensor = f"kept {kept_mine:.3f} vs {kept_oracle:.3f}, norm ratio {ratio:.3f}"
    if abs(kept_mine - kept_oracle) > KEPT_FRACTION_SLACK:
        comparison.problems.append(
            f"changed fraction {kept_mine:.3f} vs mergekit {kept_oracle:.3f}"
        )
    if abs(ratio - 1) > NORM_RATIO_SLACK:
        comparison.problems.append(f"merged task-vector norm ratio to mergekit {ratio:.3f}")


def compare(ours: Path, theirs: Path, methods: list[str], base: Path | None) -> Comparison:
    """Compare tureen's output folder with mergekit's by the rules in the module doc."""
    if set(methods) & RANDOM_METHODS:
        comparison = Comparison("statistics (random masks)")
        if _compare_structure(ours, theirs, comparison):
            _compare_statistics(ours, theirs, base, comparison)
        return comparison
    comparison = Comparison("values")
    if _compare_structure(ours, theirs, comparison):
        _compare_exact(ours, theirs, comparison)
    return comparison


def _error(error: BaseException) -> str:
    lines = traceback.format_exception_only(type(error), error)
    return " ".join(line.strip() for line in lines)[:600]


def evaluate(path: Path, root: Path) -> CorpusResult:
    """Map, run with both engines and compare one corpus config."""
    # Tiny tensors: thread start-up costs more than it saves, badly so on a loaded machine.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _evaluate(path, root)
    finally:
        torch.set_num_threads(threads)


def _evaluate(path: Path, root: Path) -> CorpusResult:
    documents = load_documents(path)
    result = CorpusResult(path.stem, [str(doc["merge_method"]) for doc in documents])
    mapped = map_config(documents, root / "shared", lambda name: _STAGE + name)
    work = root / "runs" / path.stem
    try:
        theirs = run_mergekit(mapped, work / "mergekit")
    except Exception as error:  # the oracle itself fails: the config does not belong
        result.mergekit_error = _error(error)
        return result
    try:
        run_tureen(mapped, work / "tureen-unchanged", None)
    except Exception as error:
        result.unchanged_error = _error(error)
    try:
        ours = run_tureen(mapped, work / "tureen-mergekit", "mergekit")
    except Exception as error:
        result.reference_error = _error(error)
        return result
    final = documents[-1]
    base: Path | None = None
    if final.get("base_model") is not None:
        mapped_base = str(mapped.documents[-1]["base_model"])
        if mapped_base.startswith(_STAGE):
            index = mapped.names.index(mapped_base.removeprefix(_STAGE))
            base = _stage_dir(work / "mergekit", index, mapped.names[index])
        elif "+" not in mapped_base:
            base = Path(mapped_base)
    result.comparison = compare(ours, theirs, result.methods, base)
    return result
