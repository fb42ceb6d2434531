"""The web console at ``/`` and its assets, and ``/v1/roots``, the checkpoint picker's data.

The console is a static page (``service/console/static``: HTML, one script module, one
style sheet, written by hand, no build step) that talks to the API like any client: it holds
no data itself, so serving it needs no token, and every request it makes sends the bearer
token the user typed. Everything comes from this service; the Content-Security-Policy
forbids other hosts, inline scripts and inline styles.

``GET /v1/roots`` lists the folders local checkpoints may be read from, and
``GET /v1/roots/{index}/entries`` one folder's entries under one of them, confined with the
engine's own path guard (:class:`merge_kernels.checkpoints.confinement.Confinement`): ``..``,
absolute paths and links that resolve outside the root are refused, and entries that link
outside it are left out.
"""

from __future__ import annotations

import hashlib
from functools import cache
from pathlib import Path, PurePosixPath
from typing import Annotated

from fastapi import APIRouter, Header, Query
from fastapi import Path as PathParam
from fastapi.responses import HTMLResponse, Response
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool

from merge_kernels.checkpoints.confinement import Confinement, PathOutsideRootsError
from service.api.deps import Authenticated, SettingsDep
from service.api.routes.docs import CONTENT_SECURITY_POLICY
from service.console import STATIC_DIR, STATIC_FILES
from service.errors import ApiError, error_responses
from service.settings import ServiceSettings

#: Most entries one listing returns; a folder with more says so (``truncated``).
MAX_ENTRIES = 1000

_PAGE_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}
_MEDIA_TYPES = {".html": "text/html", ".js": "text/javascript", ".css": "text/css"}

page_router = APIRouter(include_in_schema=False)
roots_router = APIRouter(prefix="/v1/roots", tags=["roots"], dependencies=[Authenticated])


@page_router.get("/")
async def console_page() -> HTMLResponse:
    """The console's page; it holds no data, so it needs no token."""
    html = (STATIC_DIR / "index.html").read_text(encoding="utf-8")
    return HTMLResponse(html, headers={**_PAGE_HEADERS, "Cache-Control": "no-store"})


@cache
def _asset(name: str) -> tuple[bytes, str]:
    # Read once: the assets are part of the installed package and never change while it runs.
    body = (STATIC_DIR / name).read_bytes()
    return body, '"' + hashlib.sha256(body).hexdigest()[:32] + '"'


@page_router.get("/console/static/{name}")
async def console_asset(
    name: str,
    if_none_match: Annotated[str | None, Header(alias="If-None-Match")] = None,
) -> Response:
    """One of the console's assets, shipped in the package (never a path from the request)."""
    if name not in STATIC_FILES:
        raise ApiError(404, "not_found", f"the console has no asset {name!r}")
    body, etag = _asset(name)
    headers = {**_PAGE_HEADERS, "Cache-Control": "no-cache", "ETag": etag}
    if if_none_match == etag:
        return Response(status_code=304, headers=headers)
    media_type = _MEDIA_TYPES.get(Path(name).suffix, "application/octet-stream")
    return Response(body, media_type=media_type, headers=headers)


class Root(BaseModel):
    """A folder local checkpoints may be read from."""

    index: int = Field(description="Its position, for `/v1/roots/{index}/entries`.")
    name: str = Field(description="How recipes name paths in it: `inputs` or its absolute path.")
    prefix: str = Field(
        description="What a recipe puts before a path inside it: empty for the inputs folder "
        "(relative paths are relative to it), the folder and a slash for the others."
    )


class RootEntry(BaseModel):
    """A file or folder inside an allowed root."""

    name: str
    kind: str = Field(description="`folder` or `file`.")
    bytes: int | None = Field(None, description="A file's size.")
    checkpoint: bool = Field(
        False, description="A folder holding a config.json or safetensors weights."
    )
    reference: str = Field(description="The entry as a recipe names it.")


class RootListing(BaseModel):
    """The entries of one folder inside an allowed root."""

    root: Root
    path: str = Field(description="The folder, relative to the root (empty: the root).")
    entries: list[RootEntry]
    truncated: bool = Field(
        False, description=f"More than {MAX_ENTRIES} entries; the rest are left out."
    )


def _roots(settings: ServiceSettings) -> list[Root]:
    roots = [Root(index=0, name="inputs", prefix="")]
    for index, folder in enumerate(settings.allow_roots, start=1):
        roots.append(Root(index=index, name=str(folder), prefix=str(folder).rstrip("/") + "/"))
    return roots


def _root_folder(settings: ServiceSettings, index: int) -> Path:
    return settings.inputs_dir if index == 0 else settings.allow_roots[index - 1]


@roots_router.get(
    "", response_model=list[Root], summary="List the allowed roots", responses=error_responses(401)
)
async def list_roots(settings: SettingsDep) -> list[Root]:
    """The folders local checkpoints may be read from: the inputs folder, then `allow_roots`."""
    return _roots(settings)


def _refuse(path: str) -> ApiError:
    # The same answer whether the folder exists or not, so a request cannot probe the disk.
    return ApiError(
        404,
        "not_found",
        f"{path!r} is not a folder inside this root; name one relative to it, without '..'",
        details={"field": "path"},
    )


def _is_checkpoint(folder: Path, confinement: Confinement) -> bool:
    try:
        return confinement.is_file(folder / "config.json") or any(
            confinement.contains(child) for child in folder.glob("*.safetensors")
        )
    except (OSError, PathOutsideRootsError):
        return False


def list_entries(settings: ServiceSettings, index: int, path: str) -> RootListing:
    """The entries of folder ``path`` inside root ``index``, confined to that root.

    Raises:
        ApiError: 404 when there is no such root, or ``path`` is absolute, has ``..``
            parts, leaves the root through a link or is not a folder.
    """
    roots = _roots(settings)
    if not 0 <= index < len(roots):
        raise ApiError(404, "not_found", f"there is no root {index}; GET /v1/roots lists them")
    root = _root_folder(settings, index)
    relative = PurePosixPath(path)
    if "\x00" in path or "\\" in path or relative.is_absolute() or ".." in relative.parts:
        raise _refuse(path)
    if not relative.parts and not root.is_dir():
        return RootListing(root=roots[index], path="", entries=[])  # not made yet: empty
    confinement = Confinement.of([root])
    try:
        folder = confinement.resolve(root / relative)
        children = sorted(folder.iterdir(), key=lambda child: child.name)
    except (PathOutsideRootsError, OSError):  # outside, missing, not a folder, name too long
        raise _refuse(path) from None
    entries: list[RootEntry] = []
    prefix = roots[index].prefix + (relative.as_posix() + "/" if relative.parts else "")
    for child in children[:MAX_ENTRIES]:
        if not confinement.contains(child):
            continue  # a link out of the root: not there, as far as clients can tell
        is_dir = child.is_dir()
        entries.append(
            RootEntry(
                name=child.name,
                kind="folder" if is_dir else "file",
                bytes=None if is_dir else child.stat().st_size,
                checkpoint=is_dir and _is_checkpoint(child, confinement),
                reference=prefix + child.name,
            )
        )
    shown = relative.as_posix() if relative.parts else ""
    return RootListing(
        root=roots[index], path=shown, entries=entries, truncated=len(children) > MAX_ENTRIES
    )


@roots_router.get(
    "/{index}/entries",
    response_model=RootListing,
    summary="List a folder inside an allowed root",
    responses=error_responses(401, 404, 422),
)
async def root_entries(
    settings: SettingsDep,
    index: Annotated[int, PathParam(ge=0, le=10_000, description="The root's index.")],
    path: Annotated[
        str, Query(max_length=4096, description="A folder relative to the root (default: it).")
    ] = "",
) -> RootListing:
    """Files and folders in one folder of a root, checkpoint folders marked, links out hidden."""
    return await run_in_threadpool(list_entries, settings, index, path)
