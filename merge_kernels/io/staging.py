"""Atomic, resumable publication of an output folder.

A merge writes its output folder ``OUT`` inside a hidden sibling staging folder
``OUT.parent / ".{OUT.name}.tureen-partial"`` (same filesystem, so the final rename is atomic)
and renames it into place only when every file is complete. A crash, a kill or a full disk can
therefore never leave a half-written ``OUT``.

The staging folder holds a manifest, ``tureen-manifest.json``, recording the caller's
fingerprint of the job (recipe, inputs, output options) and the checksum of every shard finished
so far. Re-running the same job finds the staging folder, re-verifies the recorded shards
against the bytes on disk and skips them; anything else in the folder is deleted. A different
job's staging folder is wiped.

Publishing and recording the success are two steps, and a crash can fall between them. So
just before the rename, :meth:`StagingDir.commit` writes a *commit record* beside the output,
``OUT.parent / ".{OUT.name}.tureen-committed"``: the fingerprint and the checksum of every file.
A caller that finds the output folder present after a crash asks :meth:`StagingDir.committed`
whether it is exactly what this job publishes, instead of running the job again; once it has
recorded the success it drops the record with :meth:`StagingDir.forget_commit`.

Also here: :func:`write_bytes_atomic` and :func:`write_json_atomic` for small files
(index, config) that must never be seen half-written.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
from pathlib import Path

from merge_kernels.io.checksum import file_checksum

MANIFEST_NAME = "tureen-manifest.json"
_MANIFEST_VERSION = 3  # 3: CRC-32 (2: SHA-256 of blocks, 1: whole-file SHA-256)
STAGING_SUFFIX = ".tureen-partial"
COMMITTED_SUFFIX = ".tureen-committed"
_ASIDE_SUFFIX = ".tureen-old"


def fsync_dir(directory: Path) -> None:
    """Make a directory's entries (created, renamed files) durable, where the filesystem can."""
    fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    except OSError:
        # Some filesystems cannot fsync a directory; nothing more can be done there.
        pass
    finally:
        os.close(fd)


def write_bytes_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see the old file or the new one, never a mix.

    The bytes go to a temporary file in the same directory, which is fsynced and renamed over
    ``path``; the directory is then fsynced so the rename survives a crash.

    Args:
        path: the destination file; its directory must exist.
        data: the complete new contents.

    Raises:
        OSError: the write, sync or rename failed; ``path`` is then unchanged.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o644)
    try:
        try:
            view = memoryview(data)
            done = 0
            while done < len(view):
                done += os.write(fd, view[done:])
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def write_json_atomic(
    path: Path, obj: object, *, indent: int | None = 2, sort_keys: bool = False
) -> None:
    """Write ``obj`` as UTF-8 JSON (plus a final newline) to ``path`` atomically.

    With ``sort_keys=True`` an index from :func:`~merge_kernels.io.shard_plan.index_json` comes
    out byte-identical to the one transformers writes.

    Args:
        path: the destination file; its directory must exist.
        obj: a JSON-serializable object.
        indent: JSON indentation, as :func:`json.dumps` takes it.
        sort_keys: sort object keys.

    Raises:
        TypeError: ``obj`` is not JSON-serializable.
        OSError: the write failed; ``path`` is then unchanged.
    """
    text = json.dumps(obj, indent=indent, sort_keys=sort_keys, ensure_ascii=False) + "\n"
    write_bytes_atomic(path, text.encode("utf-8"))


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


class StagingDir:
    """The staging folder of one output folder, with its resume manifest.

    Typical use::

        staging = StagingDir(out_dir, fingerprint)
        done = staging.prepare()
        for spec in shards:
            if spec.filename in done:
                continue
            with ShardWriter(staging.path, spec) as writer:
                ...
                staging.mark_shard_done(spec.filename, writer.finish())
        write_json_atomic(staging.path / "model.safetensors.index.json", index_json(shards))
        staging.commit()

    Attributes:
        out_dir: the final output folder.
        fingerprint: the caller's hash of everything that determines the output.
        path: the staging folder, ``out_dir.parent / f".{out_dir.name}.tureen-partial"``.
    """

    def __init__(self, out_dir: Path, fingerprint: str) -> None:
        """Describe the staging folder of ``out_dir``; nothing is touched on disk yet.

        Args:
            out_dir: the output folder to publish.
            fingerprint: a hash of the recipe, inputs and output options, computed by the
                caller; a staging folder is resumed only by a job with the same fingerprint.

        Raises:
            ValueError: ``out_dir`` has no name (e.g. ``/``) or ``fingerprint`` is empty.
        """
        out_dir = Path(out_dir)
        if not out_dir.name or out_dir.name in (".", ".."):
            raise ValueError(f"output folder {str(out_dir)!r} needs a name of its own")
        if not fingerprint:
            raise ValueError("fingerprint must not be empty")
        self.out_dir = out_dir
        self.fingerprint = fingerprint
        self.path = out_dir.parent / f".{out_dir.name}{STAGING_SUFFIX}"
        self._aside = out_dir.parent / f".{out_dir.name}{_ASIDE_SUFFIX}"
        self.commit_record = out_dir.parent / f".{out_dir.name}{COMMITTED_SUFFIX}"
        self._manifest = self.path / MANIFEST_NAME
        self._done: dict[str, str] = {}

    def _write_manifest(self) -> None:
        write_json_atomic(
            self._manifest,
            {"version": _MANIFEST_VERSION, "fingerprint": self.fingerprint, "shards": self._done},
        )

    def _read_record(self, path: Path) -> dict[str, object] | None:
        """A manifest or commit record, if it is readable, of this version and fingerprint."""
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            return None
        if (
            not isinstance(data, dict)
            or data.get("version") != _MANIFEST_VERSION
            or data.get("fingerprint") != self.fingerprint
        ):
            return None
        return data

    def _read_manifest(self) -> dict[str, str] | None:
        """The recorded shards if the manifest is readable and ours, else None."""
        data = self._read_record(self._manifest)
        if data is None:
            return None
        shards = data.get("shards")
        if not isinstance(shards, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in shards.items()
        ):
            return None
        return shards

    def _recover_aside(self) -> None:
        # An aside folder exists only if a commit with overwrite crashed between its renames:
        # before the new result took OUT's place (restore the old result), or after (drop it).
        if not os.path.lexists(self._aside):
            return
        if os.path.lexists(self.out_dir):
            _remove(self._aside)
        else:
            os.rename(self._aside, self.out_dir)
            fsync_dir(self.out_dir.parent)

    def prepare(self) -> set[str]:
        """Create the staging folder, or resume the one a previous run of this job left.

        A staging folder whose manifest carries this fingerprint is kept: each recorded shard
        is re-hashed, and kept only if its checksum still matches; every other file in the folder
        (unrecorded, partial or corrupted) is deleted. A staging folder of another job, or one
        without a readable manifest, is wiped and recreated.

        Returns:
            The filenames of verified complete shards, which the caller can skip.

        Raises:
            OSError: the folder cannot be created, read or cleaned.
        """
        self._recover_aside()
        self.forget_commit()  # a new run publishes anew
        recorded = self._read_manifest() if self.path.is_dir() else None
        if recorded is None:
            if os.path.lexists(self.path):
                _remove(self.path)
            self.out_dir.parent.mkdir(parents=True, exist_ok=True)
            self.path.mkdir()
            self._done = {}
            self._write_manifest()
            fsync_dir(self.path.parent)
            return set()

        kept: dict[str, str] = {}
        for entry in self.path.iterdir():
            if entry.name == MANIFEST_NAME:
                continue
            expected = recorded.get(entry.name)
            if (
                expected is not None
                and entry.is_file()
                and not entry.is_symlink()
                and file_checksum(entry) == expected
            ):
                kept[entry.name] = expected
            else:
                _remove(entry)
        self._done = kept
        self._write_manifest()
        return set(kept)

    def mark_shard_done(self, filename: str, checksum: str) -> None:
        """Record a finished file in the manifest, durably, so a resumed run can skip it.

        Args:
            filename: the file's name inside the staging folder.
            checksum: its checksum (:mod:`merge_kernels.io.checksum`, as
                :meth:`ShardWriter.finish` returns it).

        Raises:
            ValueError: ``filename`` is not a plain file name in the staging folder, or is
                the manifest's own name.
            FileNotFoundError: no such file in the staging folder.
            OSError: the manifest cannot be written.
        """
        if Path(filename).name != filename or filename in ("", ".", "..", MANIFEST_NAME):
            raise ValueError(f"{filename!r} is not a file name the staging folder can record")
        if not (self.path / filename).is_file():
            raise FileNotFoundError(f"{self.path / filename} does not exist; write it first")
        self._done[filename] = checksum
        self._write_manifest()

    def recorded_shards(self) -> int:
        """How many finished files the staging folder's manifest lists, whatever its job.

        For a caller that does not know the fingerprint (a command that failed) and must
        decide whether the staging folder is worth keeping for a resume.
        """
        try:
            data = json.loads(self._manifest.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            return 0
        shards = data.get("shards") if isinstance(data, dict) else None
        return len(shards) if isinstance(shards, dict) else 0

    def completed(self) -> dict[str, str]:
        """The files recorded complete so far: filename -> checksum."""
        return dict(self._done)

    def commit(self, *, overwrite: bool = False, keep_record: bool = False) -> Path:
        """Publish the staging folder as the output folder.

        The manifest is removed and the folder synced, then the staging folder is renamed to
        ``out_dir`` in one atomic step. With ``overwrite``, an existing ``out_dir`` is first
        renamed aside and deleted only once the new one is in place; a crash in between is
        repaired by the next :meth:`prepare` or :meth:`commit` (the old output is restored if
        the new one never arrived).

        Args:
            overwrite: replace an existing ``out_dir`` instead of refusing.
            keep_record: leave the commit record beside ``out_dir`` for a caller that still
                has to record the success (then it calls :meth:`forget_commit`); otherwise
                it is deleted once ``out_dir`` is in place.

        Returns:
            ``out_dir``.

        Raises:
            FileExistsError: ``out_dir`` exists and ``overwrite`` is false. The staging folder
                and its manifest are left intact, so the finished work is not lost.
            FileNotFoundError: there is no staging folder to commit.
            OSError: a rename or sync failed.
        """
        self._recover_aside()
        if not self.path.is_dir():
            raise FileNotFoundError(f"staging folder {self.path} does not exist; nothing to commit")
        exists = os.path.lexists(self.out_dir)
        if exists and not overwrite:
            raise FileExistsError(
                f"output folder {self.out_dir} already exists; choose another output folder, "
                "remove it, or ask to overwrite it"
            )
        self._manifest.unlink(missing_ok=True)
        checksums = {
            entry.name: self._done.get(entry.name) or file_checksum(entry)
            for entry in self.path.iterdir()
        }
        write_json_atomic(
            self.commit_record,
            {"version": _MANIFEST_VERSION, "fingerprint": self.fingerprint, "files": checksums},
        )
        fsync_dir(self.path)
        if exists:
            os.rename(self.out_dir, self._aside)
        os.rename(self.path, self.out_dir)
        fsync_dir(self.out_dir.parent)
        if exists:
            _remove(self._aside)
        if not keep_record:
            self.forget_commit()
        self._done = {}
        return self.out_dir

    def committed(self) -> list[str] | None:
        """The output folder's files if a commit of this fingerprint published it, else None.

        True only while the commit record is there (see :meth:`forget_commit`) and carries
        this fingerprint, and the output folder holds exactly the recorded files with the
        recorded checksums: then the folder is this job's complete output, as if this job had
        just committed it.
        """
        data = self._read_record(self.commit_record)
        files = data.get("files") if data is not None else None
        if not isinstance(files, dict) or not self.out_dir.is_dir() or self.out_dir.is_symlink():
            return None
        present = {entry.name: entry for entry in self.out_dir.iterdir()}
        if set(present) != set(files):
            return None
        for name, entry in present.items():
            if not entry.is_file() or entry.is_symlink() or file_checksum(entry) != files[name]:
                return None
        return sorted(files)

    def forget_commit(self) -> None:
        """Delete the commit record, once the caller has recorded the commit's success."""
        self.commit_record.unlink(missing_ok=True)

    def discard(self) -> None:
        """Delete the staging folder and everything in it, if it exists."""
        if os.path.lexists(self.path):
            _remove(self.path)
            with contextlib.suppress(FileNotFoundError):
                fsync_dir(self.path.parent)
        self._done = {}
