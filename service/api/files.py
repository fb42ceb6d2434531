"""Serving a job's output files: listing, confinement to the output folder, byte ranges."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from fastapi.responses import StreamingResponse

from service.api.schemas import OutputFile
from service.errors import ApiError, error_responses

CHUNK_BYTES = 1024 * 1024


class RangeNotSatisfiableError(Exception):
    """The Range header names no byte of the file."""


@dataclass(frozen=True)
class ByteRange:
    """Bytes ``start`` to ``end`` inclusive of a file of ``size`` bytes."""

    start: int
    end: int
    size: int

    @property
    def length(self) -> int:
        return self.end - self.start + 1

    def content_range(self) -> str:
        return f"bytes {self.start}-{self.end}/{self.size}"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        while chunk := stream.read(CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def list_output_files(root: Path, *, checksums: bool = False) -> list[OutputFile]:
    """Every regular file under ``root`` (symlinks skipped), by relative POSIX path."""
    files = []
    for path in sorted(root.rglob("*")):
        if path.is_symlink() or not path.is_file():
            continue
        files.append(
            OutputFile(
                name=path.relative_to(root).as_posix(),
                bytes=path.stat().st_size,
                sha256=_sha256(path) if checksums else None,
            )
        )
    return files


def resolve_output_file(root: Path, name: str) -> Path | None:
    """The file ``name`` inside ``root``, or None if it is absent or would leave ``root``.

    Absolute names, ``..`` parts, NUL bytes and symlinks resolving outside ``root`` are
    refused.
    """
    if not name or "\x00" in name or "\\" in name:
        return None
    relative = PurePosixPath(name)
    if relative.is_absolute() or any(part in ("..", "") for part in relative.parts):
        return None
    try:
        base = root.resolve(strict=True)
        resolved = (base / relative).resolve(strict=True)
    except (OSError, RuntimeError):
        return None
    if not resolved.is_relative_to(base) or not resolved.is_file():
        return None
    return resolved


def parse_range(header: str | None, size: int) -> ByteRange | None:
    """The single byte range of a ``Range`` header, or None to send the whole file.

    Headers that are malformed, in another unit or name several ranges are ignored (the
    whole file is sent, as RFC 9110 allows).

    Raises:
        RangeNotSatisfiableError: the range starts beyond the file, or asks for its last 0 bytes.
    """
    if not header:
        return None
    unit, _, spec = header.partition("=")
    if unit.strip().lower() != "bytes" or "," in spec:
        return None
    first, dash, last = spec.strip().partition("-")
    first, last = first.strip(), last.strip()
    if not dash or not (first.isdigit() or first == "") or not (last.isdigit() or last == ""):
        return None
    if first == "":
        if last == "":
            return None
        suffix = int(last)
        if suffix == 0 or size == 0:
            raise RangeNotSatisfiableError
        return ByteRange(max(0, size - suffix), size - 1, size)
    start = int(first)
    if last and int(last) < start:
        return None  # invalid: ignored
    if start >= size:
        raise RangeNotSatisfiableError
    end = int(last) if last else size - 1
    return ByteRange(start, min(end, size - 1), size)


def read_chunks(path: Path, start: int, length: int) -> Iterator[bytes]:
    """``length`` bytes of ``path`` from ``start``, in chunks."""
    with path.open("rb") as stream:
        stream.seek(start)
        remaining = length
        while remaining > 0:
            chunk = stream.read(min(CHUNK_BYTES, remaining))
            if not chunk:
                return
            remaining -= len(chunk)
            yield chunk


DOWNLOAD_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "The whole file.",
        "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}},
    },
    206: {
        "description": "The requested byte range (`Content-Range` says which).",
        "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}},
    },
    **error_responses(401, 404, 409, 416, 422),
}


def file_response(
    root: Path, path: str, range_header: str | None, missing: str
) -> StreamingResponse:
    """Stream file ``path`` under ``root``, whole or one byte range.

    Args:
        root: the folder the file must lie in.
        path: the file's name relative to ``root``.
        range_header: the request's ``Range`` header, if any.
        missing: the message of the 404 when there is no such file.

    Raises:
        ApiError: 404 (no such file under ``root``) or 416 (range outside the file).
    """
    file = resolve_output_file(root, path)
    if file is None:
        raise ApiError(404, "not_found", missing, details={"path": path})
    size = file.stat().st_size
    try:
        byte_range = parse_range(range_header, size)
    except RangeNotSatisfiableError:
        raise ApiError(
            416,
            "range_not_satisfiable",
            f"the range {range_header!r} lies outside the file ({size} bytes)",
            details={"size": size},
            headers={"Content-Range": f"bytes */{size}", "Accept-Ranges": "bytes"},
        ) from None
    headers = {
        "Accept-Ranges": "bytes",
        "Content-Disposition": f'attachment; filename="{file.name}"',
    }
    if byte_range is None:
        headers["Content-Length"] = str(size)
        return StreamingResponse(
            read_chunks(file, 0, size), media_type="application/octet-stream", headers=headers
        )
    headers["Content-Length"] = str(byte_range.length)
    headers["Content-Range"] = byte_range.content_range()
    return StreamingResponse(
        read_chunks(file, byte_range.start, byte_range.length),
        status_code=206,
        media_type="application/octet-stream",
        headers=headers,
    )
