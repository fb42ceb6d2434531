"""Keeping every file an input opens inside the folders it may be read from.

A service reads local checkpoints only under its allowed roots. Checking the folder a
reference names is not enough: a file inside it (``config.json``, a weight shard, a tokenizer
file) may be a symbolic link, or sit under a linked sub-folder, that leads anywhere on the
server's disk. A :class:`Confinement` resolves every file to its real path before it is
used, refuses one that resolves outside the roots, opens it without following a last-moment
link (``O_NOFOLLOW``), and checks again, on Linux, where the opened descriptor really points
(``/proc/self/fd``), so a link swapped in between the check and the open is caught too.

Links that stay inside the roots are fine: model folders are often assembled from links
(the Hugging Face cache links each snapshot file to a blob of the same repository).
"""

from __future__ import annotations

import os
import shutil
import stat
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from merge_kernels.errors import CheckpointFileError, CheckpointNotFoundError

_PROC_FD = Path("/proc/self/fd")
_OPEN_FLAGS = os.O_RDONLY | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NOFOLLOW", 0)


class PathOutsideRootsError(CheckpointNotFoundError):
    """A path, or a file inside a checkpoint folder, resolves outside the allowed roots.

    ``details['reason']`` is ``outside_allowed_roots``. The message never says whether the
    path exists, so a request cannot use it to probe the disk.
    """

    code = "path_not_allowed"


def outside_roots_error(path: Path | str) -> PathOutsideRootsError:
    """The error for a referenced path outside the allowed roots, saying how to allow it."""
    return PathOutsideRootsError(
        f"path {path} is outside the folders this service may read from (its data "
        "directory's inputs folder and any --allow-root folders); move the checkpoint there, "
        "start the service with --allow-root FOLDER (or TUREEN_ALLOW_ROOTS) to allow its "
        "folder, or reference a Hub repository",
        details={"path": str(path), "reason": "outside_allowed_roots"},
    )


def unusable_text(text: str) -> str | None:
    """What makes ``text`` unusable as a path or name, or None: a NUL character, or an
    unpaired UTF-16 surrogate (which cannot be encoded as UTF-8)."""
    if "\x00" in text:
        return "a NUL character (\\u0000)"
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as error:
        return f"an unpaired UTF-16 surrogate ({text[error.start]!r})"
    return None


def check_path_text(text: str, field: str) -> None:
    """Refuse path text that no file system can hold (see :func:`unusable_text`).

    Raises:
        CheckpointNotFoundError: with ``details['field']`` naming ``field``.
    """
    problem = unusable_text(text)
    if problem is not None:
        raise CheckpointNotFoundError(
            f"{field}: the path {text!r} holds {problem}; give a valid file or folder name",
            details={"field": field, "reason": "invalid_path"},
        )


@dataclass(frozen=True)
class Confinement:
    """The folders files may be read from; ``roots=None`` allows every path.

    Attributes:
        roots: the allowed folders, with symlinks resolved, or None for no limit (the
            command line, where the user reads their own disk).
    """

    roots: tuple[Path, ...] | None = None

    @classmethod
    def of(cls, roots: Sequence[Path] | None) -> Confinement:
        """A confinement to ``roots`` (resolved here), or an unlimited one for None."""
        if roots is None:
            return UNCONFINED
        return cls(tuple(Path(root).expanduser().resolve(strict=False) for root in roots))

    def contains(self, path: Path) -> bool:
        """Whether ``path``, with links and ``..`` resolved, lies inside a root."""
        try:
            return self._inside(Path(os.path.realpath(path)))
        except (OSError, ValueError):  # a NUL byte, a loop of links
            return False

    def _inside(self, resolved: Path) -> bool:
        return self.roots is None or any(resolved.is_relative_to(root) for root in self.roots)

    def resolve(self, path: Path) -> Path:
        """The real path of ``path``, which must lie inside a root.

        Args:
            path: a file or folder (it need not exist).

        Returns:
            ``path`` with every link and ``..`` resolved (as given when unconfined).

        Raises:
            PathOutsideRootsError: it resolves outside every root.
        """
        if self.roots is None:
            return Path(path)
        resolved = Path(os.path.realpath(path))
        if self._inside(resolved):
            return resolved
        raise PathOutsideRootsError(
            f"{Path(path).name} links to a place outside the folders this service may read "
            "from; replace the link with the file itself, or allow its folder with "
            "--allow-root",
            details={"file": Path(path).name, "reason": "outside_allowed_roots"},
        )

    def check_tree(self, folder: Path, *, max_entries: int = 10_000) -> None:
        """Check that every file and folder under ``folder`` resolves inside the roots.

        For readers that open a folder's files themselves (``from_pretrained``).

        Raises:
            PathOutsideRootsError: an entry links outside the roots, or the folder holds
                more than ``max_entries`` entries (too many to check).
        """
        if self.roots is None:
            return
        seen = 0
        for directory, folders, files in os.walk(self.resolve(folder)):
            for name in (*folders, *files):
                seen += 1
                if seen > max_entries:
                    raise PathOutsideRootsError(
                        f"{Path(folder).name} holds more than {max_entries} files and folders; "
                        "reference a model folder, not a folder of many models",
                        details={"reason": "too_many_entries"},
                    )
                self.resolve(Path(directory) / name)

    def open_fd(self, path: Path) -> int:
        """Open ``path`` for reading, confined; the caller closes the descriptor.

        Raises:
            PathOutsideRootsError: the file resolves outside the roots.
            FileNotFoundError, IsADirectoryError, OSError: as ``os.open``.
        """
        if self.roots is None:
            return os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        real = self.resolve(path)
        fd = os.open(real, _OPEN_FLAGS)
        try:
            self._check_descriptor(fd, path)
        except BaseException:
            os.close(fd)
            raise
        return fd

    def _check_descriptor(self, fd: int, path: Path) -> None:
        # A folder on the way may have been swapped for a link after resolve(): ask the
        # kernel where the descriptor really points.
        link = _PROC_FD / str(fd)
        if not link.exists():
            return  # no /proc: the resolve() check and O_NOFOLLOW are what we have
        if not self._inside(Path(os.readlink(link))):
            raise PathOutsideRootsError(
                f"{Path(path).name} changed into a link to a place outside the folders this "
                "service may read from while it was being opened",
                details={"file": Path(path).name, "reason": "outside_allowed_roots"},
            )

    def read_bytes(self, path: Path) -> bytes:
        """Read a whole (small) file, confined.

        Raises:
            PathOutsideRootsError: the file resolves outside the roots.
            FileNotFoundError, OSError: as ``open``.
        """
        fd = self.open_fd(path)
        with os.fdopen(fd, "rb") as handle:
            return handle.read()

    def is_file(self, path: Path) -> bool:
        """Whether ``path`` is a regular file (following links); links out raise.

        Raises:
            PathOutsideRootsError: it is a link that resolves outside the roots.
        """
        if not path.is_file():
            return False
        self.resolve(path)
        return True

    def copy_file(self, source: Path, target: Path) -> None:
        """Copy ``source`` (confined) to ``target`` (a path this process writes).

        Raises:
            PathOutsideRootsError: ``source`` resolves outside the roots.
            OSError: as reading or writing fails.
        """
        fd = self.open_fd(source)
        with os.fdopen(fd, "rb") as reader:
            if not stat.S_ISREG(os.fstat(reader.fileno()).st_mode):
                raise CheckpointFileError(
                    f"{source.name} is not a regular file", details={"file": source.name}
                )
            with open(target, "wb") as writer:
                shutil.copyfileobj(reader, writer, 1 << 20)


UNCONFINED = Confinement(None)
