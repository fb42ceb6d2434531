"""Hub inputs of a Ray merge, fetched on each node one file at a time, as its tasks read them.

The driver resolves a Hub reference to a commit and reads its headers (the runner's plan);
the tasks then need not resolve it again, nor download the snapshot: the driver sends each
Hub input's commit, its small side files' names (config, tokenizer, shard index) and which
tensors every weight file holds (:class:`HubFiles`). A node plans from that, with
:class:`HubFilesCheckpoint`, and a task downloads a weight file (``hf_hub_download`` of that
file, pinned to the commit, into the node's Hugging Face cache) the first time it reads a
tensor of it: a node fetches the files its tasks' shards live in, never a whole model.

Nodes plan again on their own (:mod:`merge_kernels.executors.ray_tasks`) and must find the
driver's plan: :func:`node_fingerprint` is the runner's fingerprint with each Hub input
identified by its commit and files rather than by its files' paths and times in one
machine's cache.
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING

import torch
from filelock import FileLock

from merge_kernels.checkpoints import Checkpoint, LocalCheckpoint, open_checkpoint
from merge_kernels.checkpoints.confinement import Confinement
from merge_kernels.checkpoints.hub import fetch_file
from merge_kernels.checkpoints.local import SafetensorsWeights
from merge_kernels.checkpoints.reference import HubRef
from merge_kernels.errors import CheckpointFileError
from merge_kernels.io.safetensors_header import TensorEntry, read_header
from merge_kernels.plan import MergePlan, PlannedInput
from merge_kernels.recipe import Recipe

if TYPE_CHECKING:
    from merge_kernels.runner import MergeOptions


@dataclass(frozen=True)
class HubFiles:
    """One Hub input as the driver resolved it.

    Attributes:
        ref: the reference.
        commit: the commit every file is fetched at.
        side_files: the small files beside the weights (config, tokenizer, shard index).
        weights: each weight file with the tensors it holds, in the checkpoint's order.
    """

    ref: HubRef
    commit: str
    side_files: tuple[str, ...]
    weights: tuple[tuple[str, tuple[TensorEntry, ...]], ...]

    def file_of(self) -> dict[str, str]:
        """Which weight file holds each tensor."""
        return {entry.name: name for name, entries in self.weights for entry in entries}


def hub_inputs(plan: MergePlan) -> dict[int, HubFiles]:
    """The plan's Hub inputs with safetensors weights, by position in ``plan.inputs``.

    Other inputs (local folders, LoRA adapters, pickle weights) are opened on the nodes as
    the runner opens them.
    """
    found: dict[int, HubFiles] = {}
    for position, item in enumerate(plan.inputs):
        checkpoint = item.checkpoint
        if type(checkpoint) is not LocalCheckpoint or not isinstance(checkpoint.ref, HubRef):
            continue
        files = checkpoint.files()
        if checkpoint.revision is None or not all(p.suffix == ".safetensors" for p in files):
            continue
        weights = tuple(
            (
                path.name,
                tuple(read_header(path, open_fd=checkpoint.confinement.open_fd).tensors.values()),
            )
            for path in files
        )
        names = {path.name for path in files}
        side = tuple(sorted(p.name for p in checkpoint.folder.iterdir() if p.name not in names))
        found[position] = HubFiles(checkpoint.ref, checkpoint.revision, side, weights)
    return found


class HubFilesCheckpoint(Checkpoint):
    """A Hub checkpoint whose weight files are downloaded one by one, when first read.

    Attributes:
        fetched: ``(file, bytes)`` of each weight file this checkpoint downloaded (files
            already in the node's cache are not listed).
    """

    def __init__(self, files: HubFiles, *, confined: bool) -> None:
        """Fetch the side files (config, tokenizer, index); no weight file yet.

        Args:
            files: the input as the driver resolved it.
            confined: whether files must resolve inside the repository's cache folder (as
                the runner confines Hub snapshots when allowed roots are set).

        Raises:
            CheckpointNotFoundError: the repository, commit or a file cannot be fetched.
        """
        self.ref = files.ref
        self.revision = files.commit
        self.files_at = files
        self.folder = _snapshot_folder(files)
        for name in files.side_files:
            self.folder = fetch_file(files.ref, name, files.commit).parent
        repository = self.folder.parent.parent
        self.confinement = Confinement.of([repository] if confined else None)
        self._entries = MappingProxyType(
            {entry.name: entry for _, entries in files.weights for entry in entries}
        )
        self._file_of = files.file_of()
        self._opened: dict[str, SafetensorsWeights] = {}
        self._lock = threading.Lock()
        self.fetched: list[tuple[str, int]] = []

    def _weights(self, filename: str) -> SafetensorsWeights:
        with self._lock:
            weights = self._opened.get(filename)
            if weights is None:
                # One worker of the node downloads a file, the others wait for it and find
                # it cached: each download is reported by the task that made it.
                with FileLock(str(_lock_path(self.files_at, filename))):
                    cached = _cached(self.files_at, filename)
                    path = fetch_file(self.files_at.ref, filename, self.files_at.commit)
                if not cached:
                    self.fetched.append((filename, path.stat().st_size))
                weights = SafetensorsWeights([path], None, self.confinement)
                _check_same(self.files_at, filename, weights)
                self._opened[filename] = weights
            return weights

    def entries(self) -> Mapping[str, TensorEntry]:
        """See ``Checkpoint.entries``: the driver's, no file read."""
        return self._entries

    def read(self, name: str) -> torch.Tensor:
        """See ``Checkpoint.read``; fetches the tensor's file first if this node lacks it."""
        return self._weights(self._file_of[name]).read(name)

    def read_rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        """See ``Checkpoint.read_rows``; fetches the tensor's file first if needed."""
        return self._weights(self._file_of[name]).read_rows(name, start, stop)

    def files(self) -> list[Path]:
        """The weight files fetched (or found in the cache) so far."""
        with self._lock:
            return [path for weights in self._opened.values() for path in weights.files()]

    def close(self) -> None:
        """Close every open file."""
        with self._lock:
            opened = list(self._opened.values())
            self._opened.clear()
        for weights in opened:
            weights.close()


def _snapshot_folder(files: HubFiles) -> Path:
    from huggingface_hub import constants

    repository = f"models--{files.ref.repo.replace('/', '--')}"
    return Path(constants.HF_HUB_CACHE) / repository / "snapshots" / files.commit


def _lock_path(files: HubFiles, filename: str) -> Path:
    from huggingface_hub import constants

    folder = Path(constants.HF_HUB_CACHE) / ".locks" / "tureen"
    folder.mkdir(parents=True, exist_ok=True)
    key = hashlib.sha256(f"{files.ref.repo}\0{files.commit}\0{filename}".encode()).hexdigest()
    return folder / f"{key[:32]}.lock"


def _cached(files: HubFiles, filename: str) -> bool:
    from huggingface_hub import try_to_load_from_cache

    return isinstance(try_to_load_from_cache(files.ref.repo, filename, revision=files.commit), str)


def _check_same(files: HubFiles, filename: str, weights: SafetensorsWeights) -> None:
    """The file fetched holds what the driver planned with (it is at the same commit)."""
    expected = next(entries for name, entries in files.weights if name == filename)
    if tuple(weights.entries().values()) != expected:
        raise CheckpointFileError(
            f"Hub checkpoint {files.ref}: {filename} at commit {files.commit} differs from the "
            "file the merge was planned with; clear this node's Hugging Face cache entry for "
            "it and run the merge again",
            details={"reference": str(files.ref), "file": filename},
        )


def open_node_inputs(
    recipe: Recipe,
    hub: Mapping[int, HubFiles],
    *,
    allowed_roots: Sequence[Path] | None,
    allow_pickle: bool,
    base_dir: Path | None,
) -> list[PlannedInput]:
    """The recipe's inputs opened on a node: Hub ones from ``hub``, others as the runner does.

    Raises:
        CheckpointNotFoundError, CheckpointFileError: an input cannot be opened.
    """
    from merge_kernels.runner import close_inputs
    from merge_kernels.slices import input_references

    inputs: list[PlannedInput] = []
    try:
        for position, (role, index, reference) in enumerate(input_references(recipe)):
            files = hub.get(position)
            checkpoint: Checkpoint
            if files is not None:
                checkpoint = HubFilesCheckpoint(files, confined=allowed_roots is not None)
            else:
                checkpoint = open_checkpoint(
                    reference,
                    allowed_roots=allowed_roots,
                    allow_pickle=allow_pickle,
                    base_dir=base_dir,
                )
            inputs.append(PlannedInput(role, index, checkpoint))
    except BaseException:
        close_inputs(inputs)
        raise
    return inputs


def node_fingerprint(plan: MergePlan, hub: Mapping[int, HubFiles]) -> str:
    """What a node's plan must share with the driver's: the recipe, every shard's header,
    and each input (a Hub input by commit and files; others by their files' paths, sizes
    and modification times, as the runner's fingerprint has them)."""
    inputs: list[object] = []
    for position, item in enumerate(plan.inputs):
        files = hub.get(position)
        if files is not None:
            inputs.append([str(files.ref), files.commit, [name for name, _ in files.weights]])
        else:
            inputs.append(
                [
                    item.checkpoint.display_name,
                    item.checkpoint.revision,
                    [
                        (str(p), p.stat().st_size, p.stat().st_mtime_ns)
                        for p in item.checkpoint.files()
                    ],
                ]
            )
    identity = {
        "recipe": plan.recipe.fingerprint(),
        "shards": [(s.filename, hashlib.sha256(s.header).hexdigest()) for s in plan.shards],
        "inputs": inputs,
    }
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()


def plan_with_hub_files(
    recipe: Recipe, options: MergeOptions, hub: Mapping[int, HubFiles]
) -> tuple[MergePlan, list[PlannedInput]]:
    """The runner's ``plan_merge`` on a node, with the Hub inputs of ``hub`` opened from the
    driver's description (the driver has checked them against the Hub already)."""
    from merge_kernels.runner import close_inputs, plan_inputs

    inputs = open_node_inputs(
        recipe,
        hub,
        allowed_roots=options.allowed_roots,
        allow_pickle=options.allow_pickle,
        base_dir=options.base_dir,
    )
    try:
        return plan_inputs(recipe, inputs, options), inputs
    except BaseException:
        close_inputs(inputs)
        raise


def fetched_files(inputs: Sequence[PlannedInput]) -> list[tuple[str, str, int]]:
    """``(repository, file, bytes)`` of every weight file the inputs downloaded so far."""
    return [
        (str(item.checkpoint.ref), name, size)
        for item in inputs
        if isinstance(item.checkpoint, HubFilesCheckpoint)
        for name, size in item.checkpoint.fetched
    ]
