"""Resolving Hugging Face Hub references to local snapshot folders.

``org/name@revision`` is resolved with ``huggingface_hub`` (an optional extra, imported only
here, inside functions): the repository's files at that revision are listed, then only what
a merge needs is downloaded into the standard Hugging Face cache: config, tokenizer and
generation config, and the weights ``LocalCheckpoint`` will read (``model.safetensors``, or
the index and then exactly the shards it names; pickle weights only when there are no
safetensors weights and pickle is allowed). With ``HF_HUB_OFFLINE=1`` (read through
``huggingface_hub.constants``) nothing is contacted and the cached snapshot is used. The
resolved commit SHA is recorded as the checkpoint's ``revision``. Tokens come from
``HF_TOKEN`` or the ``huggingface_hub`` login, handled by the library; tureen never logs them.

Before anything is downloaded, :func:`describe_from_metadata` describes a repository from the
Hub's metadata alone: ``config.json``, the shard index, and each safetensors header read with
an HTTP range request (``parse_safetensors_file_metadata``), so that a merge of incompatible
checkpoints fails at once, with the plan's list of problems, instead of after gigabytes.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any, Literal

import torch

from merge_kernels.checkpoints.base import Checkpoint, load_json_object
from merge_kernels.checkpoints.local import (
    PICKLE_INDEX_NAME,
    PICKLE_NAME,
    SAFETENSORS_INDEX_NAME,
    SAFETENSORS_NAME,
)
from merge_kernels.checkpoints.pickle_import import PICKLE_SUFFIXES, refuse_pickle
from merge_kernels.checkpoints.reference import CheckpointRef, HubRef
from merge_kernels.errors import CheckpointFileError, CheckpointNotFoundError, TureenError
from merge_kernels.io.dtypes import is_supported
from merge_kernels.io.safetensors_header import TensorEntry

#: Files fetched beside the weights of a full model: configuration and tokenizer.
MODEL_SIDE_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
)
#: Files fetched for a PEFT adapter (tokenizer files too: adapters may add tokens).
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors", *MODEL_SIDE_FILES[2:])

Kind = Literal["model", "adapter"]


@dataclass(frozen=True)
class HubSnapshot:
    """A repository revision resolved to a folder in the local Hugging Face cache."""

    folder: Path
    commit: str


def _hub() -> Any:
    try:
        import huggingface_hub
        import huggingface_hub.constants
        import huggingface_hub.errors
    except ImportError:
        raise TureenError(
            "checkpoints on the Hugging Face Hub need the 'huggingface_hub' package; install "
            "tureen with the 'hub' extra (pip install 'tureen[hub]')",
            details={"missing_package": "huggingface_hub"},
        ) from None
    return huggingface_hub


def is_offline() -> bool:
    """Whether huggingface_hub is in offline mode (``HF_HUB_OFFLINE=1``)."""
    constants = _hub().constants
    check = getattr(constants, "is_offline_mode", None)
    return bool(check() if callable(check) else constants.HF_HUB_OFFLINE)


def choose_files(
    repo_files: list[str], kind: Kind, *, allow_pickle: bool, ref: HubRef
) -> list[str]:
    """Pick the repository files a merge needs, before any shard index is read.

    Only top-level files are considered. Weights are chosen as ``LocalCheckpoint`` reads
    them: ``model.safetensors``, else ``model.safetensors.index.json`` (its shards are
    fetched once the index is read), else, only with ``allow_pickle``, ``pytorch_model.bin``,
    its index, or a single other pickle file.

    Args:
        repo_files: every file path in the repository at the revision.
        kind: ``"model"`` for a full model, ``"adapter"`` for a PEFT adapter.
        allow_pickle: accept pickle weights when there are no safetensors ones.
        ref: the reference, for messages.

    Returns:
        The file names to download first.

    Raises:
        UnsafeCheckpointError: only pickle weights exist and ``allow_pickle`` is false.
        CheckpointNotFoundError: the repository has no weights of the expected kind.
    """
    top = [name for name in repo_files if "/" not in name]
    if kind == "adapter":
        wanted = [name for name in top if name in ADAPTER_FILES]
        if "adapter_model.safetensors" in wanted:
            return wanted
        if "adapter_model.bin" in top:
            if not allow_pickle:
                raise refuse_pickle(Path(str(ref)), ["adapter_model.bin"])
            return [*wanted, "adapter_model.bin"]
        raise CheckpointNotFoundError(
            f"Hub repository {ref} has no adapter_model.safetensors; it is not a PEFT adapter",
            details={"reference": str(ref)},
        )
    wanted = [name for name in top if name in MODEL_SIDE_FILES]
    for name in (SAFETENSORS_NAME, SAFETENSORS_INDEX_NAME):
        if name in top:
            return [*wanted, name]
    pickles = [n for n in top if n.endswith(PICKLE_SUFFIXES) or n == PICKLE_INDEX_NAME]
    if pickles:
        if not allow_pickle:
            raise refuse_pickle(Path(str(ref)), pickles)
        for name in (PICKLE_NAME, PICKLE_INDEX_NAME):
            if name in top:
                return [*wanted, name]
        if len(pickles) == 1:
            return [*wanted, *pickles]
    hint = (
        " It is a PEFT adapter: reference it as 'base+adapter'."
        if "adapter_config.json" in top
        else ""
    )
    raise CheckpointNotFoundError(
        f"Hub repository {ref} has no model weights: expected {SAFETENSORS_NAME} or "
        f"{SAFETENSORS_INDEX_NAME} at its top level.{hint}",
        details={"reference": str(ref)},
    )


def _shards_named_in(index_path: Path) -> list[str]:
    weight_map = load_json_object(index_path).get("weight_map")
    if not isinstance(weight_map, dict):
        return []  # LocalCheckpoint reports the malformed index
    return sorted({f for f in weight_map.values() if isinstance(f, str)})


def _not_found(ref: HubRef, message: str, reason: str) -> CheckpointNotFoundError:
    return CheckpointNotFoundError(
        f"Hub checkpoint {ref}: {message}", details={"reference": str(ref), "reason": reason}
    )


def _translate(exc: Exception, ref: HubRef) -> TureenError:
    errors = _hub().errors
    if isinstance(exc, errors.GatedRepoError):
        return _not_found(
            ref,
            f"the repository is gated; accept its terms at https://huggingface.co/{ref.repo} "
            "and provide a token of that account (HF_TOKEN or `hf auth login`)",
            "gated",
        )
    if isinstance(exc, errors.RevisionNotFoundError):
        return _not_found(
            ref,
            f"revision {ref.revision!r} does not exist; use a branch, tag or commit of "
            f"https://huggingface.co/{ref.repo}",
            "revision_not_found",
        )
    if isinstance(exc, errors.RepositoryNotFoundError):
        return _not_found(
            ref,
            "the repository does not exist, or it is private and no token with access was "
            "given (set HF_TOKEN); check the name",
            "repo_not_found",
        )
    if isinstance(exc, errors.LocalEntryNotFoundError):
        offline = is_offline()
        return _not_found(
            ref,
            (
                "HF_HUB_OFFLINE is set and the files are not in the local Hugging Face cache; "
                f"download them first (e.g. `hf download {ref.repo}"
                + (f" --revision {ref.revision}" if ref.revision else "")
                + "`) or unset HF_HUB_OFFLINE"
                if offline
                else "the Hub could not be reached and the files are not cached; check the "
                "network connection and retry"
            ),
            "offline_not_cached" if offline else "unreachable",
        )
    if isinstance(exc, errors.HfHubHTTPError):
        status = getattr(getattr(exc, "response", None), "status_code", None)
        if status in (401, 403):
            return _not_found(
                ref,
                "access was refused; provide a token with read access (HF_TOKEN)",
                "unauthorized",
            )
        return TureenError(
            f"Hub checkpoint {ref}: the Hub answered with an error (HTTP {status}); retry later",
            details={"reference": str(ref), "reason": "hub_error"},
        )
    return _not_found(ref, f"could not be resolved ({type(exc).__name__})", "unreachable")


def _list_files(ref: HubRef) -> list[str] | None:
    """List the repo's files online, or None when the Hub is unreachable (use the cache)."""
    hub = _hub()
    try:
        info = hub.HfApi().model_info(ref.repo, revision=ref.revision)
    except hub.errors.HfHubHTTPError:
        raise
    except (OSError, ConnectionError, TimeoutError):  # includes OfflineModeIsEnabled
        return None
    except Exception as exc:
        # httpx transport errors (connection refused, DNS, timeouts) are not OSErrors.
        if type(exc).__module__.startswith(("httpx", "httpcore")):
            return None
        raise
    return [sibling.rfilename for sibling in (info.siblings or [])]


def resolve_snapshot(
    ref: HubRef,
    *,
    kind: Kind = "model",
    allow_pickle: bool = False,
    cache_dir: Path | None = None,
) -> HubSnapshot:
    """Download (or find in the cache) what a merge needs from a Hub repository.

    Args:
        ref: the repository and optional revision.
        kind: ``"model"`` or ``"adapter"`` (decides which files are fetched).
        allow_pickle: fetch pickle weights when the repository has no safetensors ones.
        cache_dir: the Hugging Face hub cache; default ``huggingface_hub.constants.HF_HUB_CACHE``
            (``HF_HUB_CACHE`` / ``HF_HOME``).

    Returns:
        The snapshot folder and the resolved commit SHA.

    Raises:
        CheckpointNotFoundError: the repository or revision does not exist, is gated or
            private without a token, or is not cached while offline; ``details['reason']``
            says which.
        UnsafeCheckpointError: only pickle weights exist and ``allow_pickle`` is false.
        TureenError: ``huggingface_hub`` is not installed, or the Hub answered with an error.
    """
    hub = _hub()
    try:
        repo_files = None if is_offline() else _list_files(ref)
        if repo_files is None:
            # Offline or unreachable: the cached snapshot is all there is; LocalCheckpoint
            # and LoraCheckpoint say what is missing from it.
            folder = hub.snapshot_download(
                ref.repo, revision=ref.revision, cache_dir=cache_dir, local_files_only=True
            )
            snapshot = Path(folder)
        else:
            wanted = choose_files(repo_files, kind, allow_pickle=allow_pickle, ref=ref)
            folder = hub.snapshot_download(
                ref.repo, revision=ref.revision, cache_dir=cache_dir, allow_patterns=wanted
            )
            snapshot = Path(folder)
            indexes = [n for n in wanted if n in (SAFETENSORS_INDEX_NAME, PICKLE_INDEX_NAME)]
            for index_name in indexes:
                # Pinned to the commit just downloaded, so shards match their index.
                hub.snapshot_download(
                    ref.repo,
                    revision=snapshot.name,
                    cache_dir=cache_dir,
                    allow_patterns=_shards_named_in(snapshot / index_name),
                )
    except TureenError:
        raise
    except Exception as exc:
        if isinstance(exc, hub.errors.HfHubHTTPError | hub.errors.EntryNotFoundError):
            raise _translate(exc, ref) from None
        if type(exc).__module__.startswith(("httpx", "httpcore", "huggingface_hub")):
            raise _translate(exc, ref) from None
        raise
    return HubSnapshot(folder=snapshot, commit=snapshot.name)


# -- compatibility from the Hub's metadata, before downloading -----------------------------


class HubMetadataCheckpoint(Checkpoint):
    """A Hub checkpoint known from its metadata only: config and safetensors headers.

    It has every tensor's name, dtype and shape, for planning; it has no tensor data
    (``read`` raises) and no local weight files. ``begin`` and ``end`` of its entries are
    offsets within the data section of each weight file.
    """

    def __init__(
        self,
        ref: CheckpointRef,
        *,
        folder: Path,
        commit: str,
        entries: Mapping[str, TensorEntry],
        weight_files: list[str],
    ) -> None:
        """Describe a checkpoint.

        Args:
            ref: the reference it stands for (for messages).
            folder: the cache folder holding its ``config.json`` (it need not exist).
            commit: the resolved commit SHA.
            entries: every tensor, in file order.
            weight_files: the repository's weight files the entries come from.
        """
        self.ref = ref
        self.folder = folder
        self.revision = commit
        self._entries = MappingProxyType(dict(entries))
        self.weight_files = weight_files

    def entries(self) -> Mapping[str, TensorEntry]:
        """See ``Checkpoint.entries``."""
        return self._entries

    def read(self, name: str) -> torch.Tensor:
        """Not available: only the metadata of this checkpoint is known."""
        raise RuntimeError(f"{self.display_name} is known from Hub metadata only; open it")

    def read_rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Not available: only the metadata of this checkpoint is known."""
        raise RuntimeError(f"{self.display_name} is known from Hub metadata only; open it")

    def files(self) -> list[Path]:
        """None: nothing was downloaded but the config and the index."""
        return []

    def close(self) -> None:
        """Nothing to release."""


def _is_network_error(exc: Exception) -> bool:
    return isinstance(exc, OSError | ConnectionError | TimeoutError) or type(
        exc
    ).__module__.startswith(("httpx", "httpcore", "requests", "urllib3"))


def describe_from_metadata(
    ref: HubRef, *, allow_pickle: bool = False, display: CheckpointRef | None = None
) -> HubMetadataCheckpoint | None:
    """Describe a Hub model repository from its metadata, downloading no weights.

    The revision is resolved to a commit first, and everything after is read at that commit.
    Only ``config.json`` and the shard index (both needed by the merge anyway) go into the
    Hugging Face cache; each safetensors header is read with HTTP range requests.

    Args:
        ref: the repository and optional revision.
        allow_pickle: passed on to :func:`choose_files` (refusal of pickle-only repositories).
        display: the reference to name the checkpoint by (a base + LoRA reference whose
            base this is); default ``ref``.

    Returns:
        The described checkpoint, or None when metadata cannot tell (offline, the Hub is
        unreachable, pickle weights, a dtype tureen does not read): the download path then
        decides, with its own errors.

    Raises:
        CheckpointNotFoundError: the repository, revision or a shard does not exist, or is
            gated or private without a token; ``details['reason']`` says which.
        UnsafeCheckpointError: only pickle weights exist and ``allow_pickle`` is false.
        CheckpointFileError: a safetensors header or the index is malformed.
        TureenError: the Hub answered with another error.
    """
    hub = _hub()
    if is_offline():
        return None
    try:
        api = hub.HfApi()
        info = api.model_info(ref.repo, revision=ref.revision)
        commit = str(info.sha)
        repo_files = [sibling.rfilename for sibling in (info.siblings or [])]
        wanted = choose_files(repo_files, "model", allow_pickle=allow_pickle, ref=ref)
        if SAFETENSORS_NAME in wanted:
            shards = [SAFETENSORS_NAME]
        elif SAFETENSORS_INDEX_NAME in wanted:
            index = hub.hf_hub_download(ref.repo, SAFETENSORS_INDEX_NAME, revision=commit)
            shards = _shards_named_in(Path(index))
            missing = sorted(set(shards) - set(repo_files))
            if missing or not shards:
                raise CheckpointFileError(
                    f"Hub checkpoint {ref}: {SAFETENSORS_INDEX_NAME} names shards the "
                    f"repository does not have: {', '.join(missing) or '(none named)'}",
                    details={"reference": str(ref), "files": missing},
                )
        else:
            return None  # pickle weights: described once downloaded
        folder = (  # where the snapshot will be; it has no config.json yet
            Path(hub.constants.HF_HUB_CACHE)
            / f"models--{ref.repo.replace('/', '--')}"
            / "snapshots"
            / commit
        )
        if "config.json" in wanted:
            folder = Path(hub.hf_hub_download(ref.repo, "config.json", revision=commit)).parent
        entries: dict[str, TensorEntry] = {}
        for shard in shards:
            header = api.parse_safetensors_file_metadata(ref.repo, shard, revision=commit)
            for name, tensor in sorted(
                header.tensors.items(), key=lambda item: item[1].data_offsets[0]
            ):
                if not is_supported(tensor.dtype):
                    return None  # the download path names the unsupported dtype
                if name in entries:
                    raise CheckpointFileError(
                        f"Hub checkpoint {ref}: tensor {name!r} appears in two weight files",
                        details={"reference": str(ref), "tensor": name},
                    )
                begin, end = tensor.data_offsets
                entries[name] = TensorEntry(name, tensor.dtype, tuple(tensor.shape), begin, end)
    except TureenError:
        raise
    except Exception as exc:
        if isinstance(exc, hub.errors.HfHubHTTPError | hub.errors.EntryNotFoundError):
            raise _translate(exc, ref) from None
        if isinstance(exc, hub.errors.SafetensorsParsingError):
            raise CheckpointFileError(
                f"Hub checkpoint {ref}: a safetensors header cannot be parsed ({exc})",
                details={"reference": str(ref)},
            ) from None
        if _is_network_error(exc) or isinstance(exc, hub.errors.OfflineModeIsEnabled):
            return None  # unreachable: the cache may still have it
        raise
    return HubMetadataCheckpoint(
        display if display is not None else ref,
        folder=folder,
        commit=commit,
        entries=entries,
        weight_files=shards,
    )


def fetch_file(ref: HubRef, filename: str, commit: str) -> Path:
    """Download one file of a repository at ``commit`` into the local Hugging Face cache.

    One ``hf_hub_download``, never a snapshot: for workers that need only some of a model's
    shards (the Ray executor's tasks). A file already cached at that commit is not fetched
    again.

    Args:
        ref: the repository (its revision is ignored: ``commit`` pins the file).
        filename: the file's path in the repository.
        commit: the commit SHA the driver resolved.

    Returns:
        The file's path in the cache's snapshot folder of ``commit``.

    Raises:
        CheckpointNotFoundError: the repository, commit or file is missing or not readable.
        TureenError: the Hub answered with another error.
    """
    hub = _hub()
    try:
        return Path(hub.hf_hub_download(ref.repo, filename, revision=commit))
    except Exception as exc:
        if isinstance(exc, hub.errors.HfHubHTTPError | hub.errors.EntryNotFoundError):
            raise _translate(exc, ref) from None
        if _is_network_error(exc) or isinstance(exc, hub.errors.LocalEntryNotFoundError):
            raise _translate(exc, ref) from None
        raise
