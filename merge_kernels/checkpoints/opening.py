"""Opening any checkpoint reference: local folder, Hub repository, or base + LoRA adapter."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from merge_kernels.checkpoints.base import Checkpoint
from merge_kernels.checkpoints.hub import Kind, resolve_snapshot
from merge_kernels.checkpoints.local import LocalCheckpoint
from merge_kernels.checkpoints.lora import LoraCheckpoint
from merge_kernels.checkpoints.reference import (
    CheckpointRef,
    HubRef,
    LocalRef,
    LoraRef,
    parse_reference,
    within_roots,
)
from merge_kernels.errors import CheckpointNotFoundError


def resolve_local_path(
    path: Path, *, base_dir: Path | None = None, allowed_roots: Sequence[Path] | None = None
) -> Path:
    """Turn a local reference path into the folder to open, enforcing allowed roots.

    Args:
        path: the path as referenced; ``~`` is expanded, a relative path is taken relative
            to ``base_dir`` (else the working directory).
        base_dir: folder relative paths are relative to.
        allowed_roots: when given, the path with symlinks and ``..`` resolved must lie
            inside one of these folders (themselves resolved).

    Returns:
        The path to open: fully resolved when ``allowed_roots`` is given, else as joined.

    Raises:
        CheckpointNotFoundError: the resolved path is outside every allowed root
            (``details['reason'] == 'outside_allowed_roots'``). The check runs before any
            existence check, so it does not reveal whether the path exists.
    """
    candidate = Path(path).expanduser()
    if not candidate.is_absolute():
        candidate = (base_dir if base_dir is not None else Path.cwd()) / candidate
    if allowed_roots is None:
        return candidate
    if within_roots(candidate, allowed_roots):
        return candidate.resolve(strict=False)
    raise CheckpointNotFoundError(
        f"checkpoint path {path} is outside the folders this service may read from; "
        "reference a checkpoint inside an allowed model folder or a Hub repository",
        details={"path": str(path), "reason": "outside_allowed_roots"},
    )


def _resolve_side(
    ref: LocalRef | HubRef,
    kind: Kind,
    *,
    allowed_roots: Sequence[Path] | None,
    allow_pickle: bool,
    base_dir: Path | None,
) -> tuple[Path, str | None]:
    if isinstance(ref, LocalRef):
        return resolve_local_path(ref.path, base_dir=base_dir, allowed_roots=allowed_roots), None
    snapshot = resolve_snapshot(ref, kind=kind, allow_pickle=allow_pickle)
    return snapshot.folder, snapshot.commit


def open_checkpoint(
    ref: CheckpointRef | str | Path,
    *,
    allowed_roots: Sequence[Path] | None = None,
    allow_pickle: bool = False,
    base_dir: Path | None = None,
) -> Checkpoint:
    """Open a checkpoint for tensor-by-tensor reading.

    Args:
        ref: a reference, a string in mergekit's forms (see ``parse_reference``), or a
            ``Path`` to a local folder.
        allowed_roots: when given, every local path (model or adapter) must resolve, with
            symlinks followed, inside one of these folders. Hub references are unaffected.
        allow_pickle: accept pickle weights, loaded with torch's restricted weights-only
            unpickler; refused by default because unpickling can run arbitrary code.
        base_dir: folder that relative local paths are relative to.

    Returns:
        A ``LocalCheckpoint`` (local folders and Hub snapshots, ``revision`` set to the
        commit SHA for the Hub) or a ``LoraCheckpoint``. Close it when done (it is a
        context manager).

    Raises:
        CheckpointNotFoundError: a path, repository, revision, shard or adapter is missing,
            or a path is outside ``allowed_roots``.
        UnsafeCheckpointError: only pickle weights exist and ``allow_pickle`` is false.
        CheckpointFileError: a file is malformed, or the adapter is unsupported or does not
            fit the base.
        RecipeError: the reference string is malformed.
        TureenError: a Hub reference without ``huggingface_hub`` installed, or a Hub error.
    """
    if isinstance(ref, Path):
        ref = LocalRef(path=ref)
    elif isinstance(ref, str):
        ref = parse_reference(ref, base_dir=base_dir, allowed_roots=allowed_roots)

    def side(part: LocalRef | HubRef, kind: Kind) -> tuple[Path, str | None]:
        return _resolve_side(
            part, kind, allowed_roots=allowed_roots, allow_pickle=allow_pickle, base_dir=base_dir
        )

    if isinstance(ref, LoraRef):
        base_folder, base_revision = side(ref.base, "model")
        base = LocalCheckpoint(
            base_folder, ref=ref.base, revision=base_revision, allow_pickle=allow_pickle
        )
        try:
            adapter_folder, adapter_revision = side(ref.adapter, "adapter")
            return LoraCheckpoint(
                base,
                adapter_folder,
                ref=ref,
                adapter_revision=adapter_revision,
                allow_pickle=allow_pickle,
            )
        except BaseException:
            base.close()
            raise
    if isinstance(ref, LocalRef | HubRef):
        folder, revision = side(ref, "model")
        return LocalCheckpoint(folder, ref=ref, revision=revision, allow_pickle=allow_pickle)
    raise TypeError(f"not a checkpoint reference: {ref!r}")
