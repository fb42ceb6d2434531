"""The one loop that joins checkpoint IO and merge kernels.

recipe → plan (headers only) → for each output shard not already done: for each tensor
(or row chunk): read the inputs → kernel in float32 → cast once → write at the planned
offset → shard finished, checksummed and recorded → index, config, tokenizer, model card →
atomic rename. Reading the next piece of work overlaps computing the current one. The
runner knows nothing of HTTP or jobs: it reports progress through a callback and checks a
cancellation callback between pieces of work.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from merge_kernels.checkpoints import Checkpoint, open_checkpoint
from merge_kernels.checkpoints.lora import LoraCheckpoint
from merge_kernels.errors import InsufficientSpaceError, MergeCancelledError, RecipeError
from merge_kernels.executors import ShardExecutor, ShardWork, executor_for
from merge_kernels.hub_precheck import check_hub_inputs
from merge_kernels.input_hashes import InputHashes
from merge_kernels.io.disk_space import (
    DEFAULT_RESERVE_BYTES,
    disk_full_error,
    is_disk_full,
    require_space,
)
from merge_kernels.io.staging import StagingDir, write_json_atomic
from merge_kernels.model_card import (
    CardExtras,
    input_provenance,
    write_config,
    write_model_card,
)
from merge_kernels.plan import (
    DEFAULT_CHUNK_ELEMENTS,
    DEFAULT_SHARD_BYTES,
    DEFAULT_WHOLE_TRIM_ELEMENTS,
    MergePlan,
    PlannedInput,
    build_plan,
)
from merge_kernels.recipe import ModelReference, Recipe
from merge_kernels.slices import input_references
from merge_kernels.tokenizer_output import write_tokenizer
from merge_kernels.tokenizer_source import check_tokenizer_source
from merge_kernels.vocabulary_plan import plan_vocabulary

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class MergeOptions:
    """How to run a merge (what to merge is the recipe's business).

    Attributes:
        max_shard_bytes: largest output shard in bytes.
        out_dtype: overrides the recipe's output dtype.
        device: where the kernels run, ``cpu`` or ``cuda``.
        chunk_elements: merge larger tensors in row chunks of about this many elements.
        whole_trim_elements: trim by magnitude in one piece up to this many elements; larger
            tensors are trimmed by a streaming pre-pass and merged in row chunks.
        allowed_roots: local checkpoints must lie under one of these folders (None: any).
        allow_pickle: accept pickle checkpoints through torch's weights-only loader.
        base_dir: folder relative local references are resolved against.
        overwrite: replace an existing output folder.
        space_reserve_bytes: bytes that must stay free on the output's disk besides the
            output itself; a merge that would leave less is refused before it writes.
        keep_commit_record: leave the commit record beside the output (see
            :mod:`merge_kernels.io.staging`) for a caller that records the success itself and
            then calls :meth:`StagingDir.forget_commit`; otherwise it is dropped at once.
        executor: where the shards are merged: ``local`` (this process), ``ray`` (tasks of
            a Ray cluster), or an executor object (:mod:`merge_kernels.executors`).
        ray_address: the Ray cluster ``ray`` connects to (None: ``RAY_ADDRESS``, else a
            cluster started on this machine, else a new local one).
    """

    max_shard_bytes: int = DEFAULT_SHARD_BYTES
    out_dtype: str | None = None
    device: str = "cpu"
    chunk_elements: int = DEFAULT_CHUNK_ELEMENTS
    whole_trim_elements: int = DEFAULT_WHOLE_TRIM_ELEMENTS
    allowed_roots: tuple[Path, ...] | None = None
    allow_pickle: bool = False
    base_dir: Path | None = None
    overwrite: bool = False
    space_reserve_bytes: int = DEFAULT_RESERVE_BYTES
    keep_commit_record: bool = False
    executor: str | ShardExecutor = "local"
    ray_address: str | None = None


@dataclass(frozen=True)
class Progress:
    """How far a merge has come."""

    tensors_done: int
    tensors_total: int
    bytes_done: int
    bytes_total: int
    current: str | None = None
    phase: str = "merging"


@dataclass
class MergeResult:
    """What a finished merge produced."""

    out_dir: Path
    files: list[str]
    bytes_written: int
    tensors: int
    shards_resumed: int
    seconds: float
    provenance: list[dict[str, object]] = field(default_factory=list)


ProgressCallback = Callable[[Progress], None]
CancelCheck = Callable[[], bool]


def open_inputs(recipe: Recipe, options: MergeOptions) -> list[PlannedInput]:
    """Open every checkpoint the recipe names (configs and headers only)."""

    def opened(reference: ModelReference) -> Checkpoint:
        return open_checkpoint(
            reference,
            allowed_roots=options.allowed_roots,
            allow_pickle=options.allow_pickle,
            base_dir=options.base_dir,
        )

    inputs: list[PlannedInput] = []
    try:
        for role, index, reference in input_references(recipe):
            inputs.append(PlannedInput(role, index, opened(reference)))
    except BaseException:
        close_inputs(inputs)
        raise
    return inputs


def close_inputs(inputs: Sequence[PlannedInput]) -> None:
    """Close every opened checkpoint."""
    for item in inputs:
        item.checkpoint.close()


def plan_merge(recipe: Recipe, options: MergeOptions) -> tuple[MergePlan, list[PlannedInput]]:
    """Open the inputs and plan the merge; the caller closes the inputs.

    Hub inputs are first checked against the others from the Hub's metadata, so that
    incompatible checkpoints fail before any weights are downloaded.
    """
    check_hub_inputs(recipe, options)
    inputs = open_inputs(recipe, options)
    try:
        plan = plan_inputs(recipe, inputs, options)
        if recipe.base_only():
            plan.notes.append(base_only_note(inputs[0].checkpoint))
        check_tokenizer_source(recipe, inputs, options)
    except BaseException:
        close_inputs(inputs)
        raise
    return plan, inputs


def plan_inputs(recipe: Recipe, inputs: list[PlannedInput], options: MergeOptions) -> MergePlan:
    """The plan of already opened inputs, under ``options``' shard, chunk and dtype settings
    (the driver's and every Ray node's plan alike)."""
    return build_plan(
        recipe,
        inputs,
        max_shard_bytes=options.max_shard_bytes,
        chunk_elements=options.chunk_elements,
        whole_trim_elements=options.whole_trim_elements,
        out_dtype=options.out_dtype,
        vocabulary=plan_vocabulary(recipe, inputs, options),
    )


def base_only_note(base: Checkpoint) -> str:
    """The plan's note for a merge of the base alone (see ``Recipe.base_only``)."""
    if isinstance(base, LoraCheckpoint):
        return (
            f"the only input is the base {base.display_name}: the output is the adapter "
            "merged into its base model (a LoRA bake-in), as mergekit writes it"
        )
    return (
        f"the only input is the base {base.display_name}: the output is the base itself, "
        "unchanged but for the output dtype, as mergekit writes it"
    )


def fingerprint(plan: MergePlan, options: MergeOptions) -> str:
    """A hash of everything that determines the output bytes, for resuming."""
    identity = {
        "recipe": plan.recipe.fingerprint(),
        "shards": [(s.filename, hashlib.sha256(s.header).hexdigest()) for s in plan.shards],
        "inputs": [
            {
                "ref": item.checkpoint.display_name,
                "revision": item.checkpoint.revision,
                "files": [
                    (str(p), p.stat().st_size, p.stat().st_mtime_ns)
                    for p in item.checkpoint.files()
                ],
            }
            for item in plan.inputs
        ],
    }
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()


def committed_result(
    recipe: Recipe, out_dir: Path, options: MergeOptions | None = None
) -> MergeResult | None:
    """What a merge by ``recipe`` published in ``out_dir``, if it did, else None.

    Plans the merge from headers and compares the output folder with the commit record left
    beside it (:meth:`StagingDir.committed`): for a run that crashed after publishing its
    output but before its caller recorded the success. Nothing is written.

    Raises:
        RecipeError, CheckpointFileError, CheckpointNotFoundError: the inputs cannot be read.
    """
    options = options or MergeOptions()
    started = time.monotonic()
    plan, inputs = plan_merge(recipe, options)
    try:
        staging = StagingDir(Path(out_dir), fingerprint(plan, options))
        return _already_committed(plan, staging, started)
    finally:
        close_inputs(inputs)


def _already_committed(plan: MergePlan, staging: StagingDir, started: float) -> MergeResult | None:
    files = staging.committed()
    if files is None:
        return None
    out_dir = staging.out_dir
    return MergeResult(
        out_dir=out_dir,
        files=files,
        bytes_written=sum((out_dir / f).stat().st_size for f in files),
        tensors=len(plan.tensors),
        shards_resumed=len(plan.shards),
        seconds=time.monotonic() - started,
        provenance=_provenance(plan),
    )


def _provenance(plan: MergePlan) -> list[dict[str, object]]:
    with InputHashes([item.checkpoint for item in plan.inputs]) as hashes:
        return [input_provenance(i.role, i.checkpoint, hashes.sha256) for i in plan.inputs]


def run_merge(
    recipe: Recipe,
    out_dir: Path,
    options: MergeOptions | None = None,
    *,
    progress: ProgressCallback | None = None,
    should_cancel: CancelCheck | None = None,
    card: CardExtras | None = None,
) -> MergeResult:
    """Merge by ``recipe`` into ``out_dir``, atomically and resumably.

    Args:
        recipe: the validated recipe.
        out_dir: the output folder; it appears only once complete.
        options: how to run (shard size, device, allowed roots...).
        progress: called after every piece of work.
        should_cancel: polled between pieces of work; True stops the merge.
        card: what the model card shows besides the recipe and inputs (an evaluation).

    Returns:
        What was written.

    Raises:
        IncompatibleCheckpointsError: the plan found problems (nothing is written).
        MergeCancelledError: cancelled; the partial output is removed.
        RecipeError, CheckpointFileError, CheckpointNotFoundError: bad input.
    """
    options = options or MergeOptions()
    if recipe.method.needs_evaluation:
        raise RecipeError(
            "merge_method",
            f"{recipe.merge_method} chooses its ingredients by evaluating candidates; run it "
            "with an evaluator (the soup command or the service), not as a plain merge",
        )
    started = time.monotonic()
    plan, inputs = plan_merge(recipe, options)
    try:
        plan.raise_for_problems()
        return _execute(
            plan, Path(out_dir), options, progress, should_cancel, started, card or CardExtras()
        )
    except OSError as error:
        if is_disk_full(error):  # the disk filled after all: a clear error, not a crash
            raise disk_full_error(error, Path(out_dir).parent) from error
        raise
    finally:
        close_inputs(inputs)


def _execute(
    plan: MergePlan,
    out_dir: Path,
    options: MergeOptions,
    progress: ProgressCallback | None,
    should_cancel: CancelCheck | None,
    started: float,
    card: CardExtras,
) -> MergeResult:
    staging = StagingDir(out_dir, fingerprint(plan, options))
    # A run of this very merge published the output, then stopped before its caller could
    # record it: the output is complete, so this run is done too.
    published = _already_committed(plan, staging, started)
    if published is not None:
        if not options.keep_commit_record:
            staging.forget_commit()
        if progress is not None:
            progress(
                Progress(
                    len(plan.tensors),
                    len(plan.tensors),
                    plan.output_bytes,
                    plan.output_bytes,
                    None,
                    "done",
                )
            )
        return published
    done = staging.prepare()
    kept = sum(shard.size for shard in plan.shards if shard.filename in done)
    try:
        # The staging folder becomes the output by a rename: the output's size is all it takes.
        require_space(staging.path, plan.output_bytes - kept, options.space_reserve_bytes)
    except InsufficientSpaceError:
        if not done:
            staging.discard()  # nothing worth resuming
        raise
    tensors_total = len(plan.tensors)
    bytes_total = plan.output_bytes
    counters = {"tensors": 0, "bytes": 0}

    def report(current: str | None, phase: str = "merging") -> None:
        if progress is not None:
            progress(
                Progress(
                    counters["tensors"],
                    tensors_total,
                    counters["bytes"],
                    bytes_total,
                    current,
                    phase,
                )
            )

    def cancelled() -> bool:
        return should_cancel is not None and should_cancel()

    def check_cancel() -> None:
        if cancelled():
            staging.discard()
            raise MergeCancelledError("the merge was cancelled; no output was written")

    # The model card's input hashes are computed beside the merge, not after it.
    with InputHashes([item.checkpoint for item in plan.inputs]) as hashes:
        report(None, "trim thresholds")
        work = ShardWork(plan, staging, done, options, check_cancel, cancelled, counters, report)
        executor_for(options).merge_shards(work)
        check_cancel()
        _write_companions(plan, staging.path, options)
        provenance = [
            input_provenance(item.role, item.checkpoint, hashes.sha256) for item in plan.inputs
        ]
        for entry in provenance:
            entry["reference"] = card.references.get(entry["reference"], entry["reference"])
        evaluation = None
        if card.evaluate is not None:
            report(None, "evaluating")
            evaluation = card.evaluate(staging.path)
            check_cancel()
        recipe = card.recipe or plan.recipe
        write_model_card(staging.path, recipe, provenance, out_dir.name, evaluation)
        final = staging.commit(overwrite=options.overwrite, keep_record=options.keep_commit_record)
    report(None, "done")
    files = sorted(p.name for p in final.iterdir())
    return MergeResult(
        out_dir=final,
        files=files,
        bytes_written=sum((final / f).stat().st_size for f in files),
        tensors=tensors_total,
        shards_resumed=len(done),
        seconds=time.monotonic() - started,
        provenance=provenance,
    )


def _write_companions(plan: MergePlan, folder: Path, options: MergeOptions) -> None:
    if len(plan.shards) > 1:
        write_json_atomic(folder / "model.safetensors.index.json", plan.index())
    source = plan.inputs[0].checkpoint
    dtype = next((t.dtype for t in plan.tensors if t.params is not None), None)
    vocab_size = plan.vocabulary.vocab_size if plan.vocabulary is not None else None
    write_config(source, folder, dtype, vocab_size, plan.config_updates)
    write_tokenizer(plan, folder, options)
