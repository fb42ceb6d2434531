"""Opening any checkpoint reference: local folder, Hub repository, or base + LoRA adapter."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from merge_kernels.checkpoints.base import Checkpoint
from merge_kernels.checkpoints.confinement import (
    Confinement,
    PathOutsideRootsError,
    check_path_text,
    outside_roots_error,
)
from merge_kernels.checkpoints.hub import Kind, resolve_snapshot
from merge_kernels.checkpoints.local import LocalCheckpoint
from merge_kernels.checkpoints.lora import LoraCheckpoint
from merge_kernels.checkpoints.reference import (
    CheckpointRef,
    HubRef,
    LocalRef,
    LoraRef,
    parse_reference,
)


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
        PathOutsideRootsError: the resolved path is outside every allowed root
            (``details['reason'] == 'outside_allowed_roots'``). The check runs before any
            existence check, so it does not reveal whether the path exists.
        CheckpointNotFoundError: the path holds a NUL character or a lone surrogate.
    """
    check_path_text(str(path), "model")
    candidate = Path(path).expanduser()
    if not candidate.is_absolute():
        candidate = (base_dir if base_dir is not None else Path.cwd()) / candidate
    if allowed_roots is None:
        return candidate
    try:
        return Confinement.of(allowed_roots).resolve(candidate)
    except PathOutsideRootsError:
        raise outside_roots_error(path) from None


def _resolve_side(
    ref: LocalRef | HubRef,
    kind: Kind,
    *,
    allowed_roots: Sequence[Path] | None,
    allow_pickle: bool,
    base_dir: Path | None,
) -> tuple[Path, str | None, Confinement]:
    if isinstance(ref, LocalRef):
        folder = resolve_local_path(ref.path, base_dir=base_dir, allowed_roots=allowed_roots)
        return folder, None, Confinement.of(allowed_roots)
    snapshot = resolve_snapshot(ref, kind=kind, allow_pickle=allow_pickle)
    # A snapshot's files link to blobs of the same repository in the cache: its folder
    # (``models--org--name``) is the one root they may resolve into.
    repository = snapshot.folder.parent.parent
    confinement = Confinement.of(None if allowed_roots is None else [repository])
    return snapshot.folder, snapshot.commit, confinement


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
        allowed_roots: when given, every local path (model or adapter), and every file
            read inside it, must resolve, with symlinks followed, inside one of these
            folders; a Hub snapshot's files must resolve inside its repository's cache.
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

    def side(part: LocalRef | HubRef, kind: Kind) -> tuple[Path, str | None, Confinement]:
        return _resolve_side(
            part, kind, allowed_roots=allowed_roots, allow_pickle=allow_pickle, base_dir=base_dir
        )

    if isinstance(ref, LoraRef):
        base_folder, base_revision, base_confinement = side(ref.base, "model")
        base = LocalCheckpoint(
            base_folder,
            ref=ref.base,
            revision=base_revision,
            allow_pickle=allow_pickle,
            confinement=base_confinement,
        )
        try:
            adapter_folder, adapter_revision, adapter_confinement = side(ref.adapter, "adapter")
            return LoraCheckpoint(
                base,
                adapter_folder,
                ref=ref,
                adapter_revision=adapter_revision,
                allow_pickle=allow_pickle,
                confinement=adapter_confinement,
            )
        except BaseException:
            base.close()
            raise
    if isinstance(ref, LocalRef | HubRef):
        folder, revision, confinement = side(ref, "model")
        return LocalCheckpoint(
            folder, ref=ref, revision=revision, allow_pickle=allow_pickle, confinement=confinement
        )
    raise TypeError(f"not a checkpoint reference: {ref!r}")
