"""Shards uploaded to the Hub from the nodes that wrote them; one commit from the driver.

With :class:`ShardUpload` set, each Ray task pre-uploads every shard it writes
(``huggingface_hub``'s ``preupload_lfs_files`` with a ``CommitOperationAdd``: the file goes
to the Hub's large-file storage, not yet into any commit) and returns the operation's
metadata only, :class:`UploadedFile`. The driver records them beside the output, in
:data:`UPLOADS_NAME` (a hidden file: never published), and publishing the folder
(``service.hub.publish_folder``) then makes its one ``create_commit`` with those operations
marked as uploaded: the commit names them by SHA-256 and the driver sends no shard's bytes.
A shard changed since (other size or modification time), or pre-uploaded to another
repository, is uploaded by the driver as usual.

Tokens: the nodes upload with ``ShardUpload.token`` when given, else with their own
``HF_TOKEN`` or stored login (as a cluster is usually set up).
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from merge_kernels.io.staging import write_json_atomic

UPLOADS_NAME = ".tureen-preuploaded.json"


@dataclass(frozen=True)
class ShardUpload:
    """Where the tasks pre-upload the shards they write.

    Attributes:
        repo_id: the model repository the output will be published to.
        revision: its branch (None: main).
        token: the Hub token the nodes use (None: each node's own).
    """

    repo_id: str
    revision: str | None = None
    token: str | None = None


@dataclass(frozen=True)
class UploadedFile:
    """A file in the Hub's large-file storage, ready for a commit.

    Attributes:
        repo_id: the repository it was uploaded to.
        path_in_repo: its path in the commit.
        sha256: its SHA-256 (hex).
        size: its size in bytes.
        sample: its first 512 bytes, base64 (the Hub client keeps them with the operation).
        mtime_ns: the modification time of the file uploaded.
    """

    repo_id: str
    path_in_repo: str
    sha256: str
    size: int
    sample: str
    mtime_ns: int


def _hub() -> Any:
    import huggingface_hub

    return huggingface_hub


def prepare_repository(target: ShardUpload) -> None:
    """Create the repository (private) and branch when missing, before any pre-upload."""
    api = _hub().HfApi(token=target.token)
    api.create_repo(target.repo_id, repo_type="model", private=True, exist_ok=True)
    if target.revision not in (None, "main"):
        api.create_branch(target.repo_id, branch=target.revision, exist_ok=True)


def preupload_shard(path: Path, target: ShardUpload) -> UploadedFile | None:
    """Pre-upload the shard at ``path`` (named as in the output folder).

    Returns:
        What the commit needs, or None when the Hub takes the file as a regular (not
        large-file) one: such a file goes into the commit itself.
    """
    hub = _hub()
    stat = path.stat()
    operation = hub.CommitOperationAdd(path_in_repo=path.name, path_or_fileobj=str(path))
    api = hub.HfApi(token=target.token)
    api.preupload_lfs_files(target.repo_id, additions=[operation], revision=target.revision)
    if not operation._is_uploaded:  # the client's own record of the pre-upload
        return None
    info = operation.upload_info
    return UploadedFile(
        repo_id=target.repo_id,
        path_in_repo=path.name,
        sha256=info.sha256.hex(),
        size=info.size,
        sample=base64.b64encode(info.sample).decode(),
        mtime_ns=stat.st_mtime_ns,
    )


def record_uploads(folder: Path, uploads: Iterable[UploadedFile]) -> None:
    """Write the pre-uploaded files' metadata beside the output, after those recorded."""
    known = load_uploads(folder)
    known.update({upload.path_in_repo: upload for upload in uploads})
    write_json_atomic(folder / UPLOADS_NAME, [asdict(u) for u in known.values()])


def load_uploads(folder: Path) -> dict[str, UploadedFile]:
    """The pre-uploaded files recorded in ``folder``, by path (none when it has no record)."""
    try:
        rows = json.loads((folder / UPLOADS_NAME).read_text())
    except (OSError, ValueError):
        return {}
    found: dict[str, UploadedFile] = {}
    for row in rows if isinstance(rows, list) else []:
        try:
            upload = UploadedFile(**row)
        except TypeError:
            continue  # a record of another version: its files are uploaded again
        found[upload.path_in_repo] = upload
    return found


def uploaded_operations(folder: Path, files: Iterable[Path], repo_id: str) -> Mapping[Path, object]:
    """Commit operations for the files of ``folder`` that a node pre-uploaded to ``repo_id``
    and that have not changed since; the other files are not in the mapping.

    The operations are ``CommitOperationAdd`` marked as uploaded, built from the recorded
    metadata without reading the files.
    """
    hub = _hub()
    from huggingface_hub.lfs import UploadInfo

    uploads = load_uploads(folder)
    operations: dict[Path, object] = {}
    for path in files:
        name = path.relative_to(folder).as_posix()
        upload = uploads.get(name)
        if upload is None or upload.repo_id != repo_id:
            continue
        stat = path.stat()
        if (stat.st_size, stat.st_mtime_ns) != (upload.size, upload.mtime_ns):
            continue
        operation = hub.CommitOperationAdd(path_in_repo=name, path_or_fileobj=b"")
        operation.upload_info = UploadInfo(
            size=upload.size,
            sample=base64.b64decode(upload.sample),
            sha256=bytes.fromhex(upload.sha256),
        )
        # What preupload_lfs_files leaves on an operation it uploaded: create_commit then
        # sends only the pointer (path, SHA-256, size).
        operation._upload_mode = "lfs"
        operation._should_ignore = False
        operation._is_uploaded = True
        operations[path] = operation
    return operations
