"""A stand-in for the Hugging Face Hub's HTTP API, for tests only; it is not the Hub.

The tests cannot reach huggingface.co, so this small server answers the requests that the
real ``huggingface_hub`` client makes when tureen publishes a merge and downloads its inputs,
with the Hub's URLs, headers, status codes and ``X-Error-Code`` values:

- ``POST /api/repos/create`` (409 when the repository exists),
- ``GET /api/models/{repo}`` and ``/api/models/{repo}/revision/{rev}`` (model info with the
  resolved ``sha`` and ``siblings``), ``GET /api/models/{repo}/tree/{rev}[/{path}]``,
- ``POST /api/models/{repo}/preupload/{rev}`` (regular or LFS upload mode per file),
- ``POST /{repo}.git/info/lfs/objects/batch`` (the git-LFS batch API, ``basic`` transfer),
  then ``PUT`` of each object and its ``verify`` call,
- ``POST /api/models/{repo}/commit/{rev}`` (the NDJSON commit, ``create_pr=1`` opening
  ``refs/pr/N``), ``POST /api/models/{repo}/branch/{branch}``, ``POST /api/validate-yaml``,
- ``HEAD``/``GET /{repo}/resolve/{rev}/{file}`` with ``X-Repo-Commit``, ``ETag``,
  ``X-Linked-Etag``, ``X-Linked-Size`` and HTTP Range (used for safetensors headers),
- errors: 401/404 with ``X-Error-Code`` ``RepoNotFound``, ``RevisionNotFound`` or
  ``EntryNotFound``; 401 without a valid token, 403 for another namespace.

Uploads through Xet storage are not implemented (they go to a separate content-addressed
store): clients must set ``HF_HUB_DISABLE_XET``. Repository contents live in a temporary
folder (blobs by sha256) and in memory (commits and branches). Run it with :meth:`FakeHub.start`
on 127.0.0.1 and an ephemeral port.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import socket
import tempfile
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import uvicorn
import yaml
from fastapi import FastAPI, Request, Response
from fastapi.responses import JSONResponse

LFS_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".model", ".h5", ".msgpack", ".gguf")
REGULAR_MAX_BYTES = 10 * 1024 * 1024
_REPO_PART = r"[A-Za-z0-9_](?:[A-Za-z0-9_.\-]{0,94}[A-Za-z0-9_])?"
_REPO_ID = re.compile(rf"(?:{_REPO_PART}/)?{_REPO_PART}")
_BASE_MODEL_RELATIONS = {"adapter", "merge", "quantized", "finetune"}
_GITATTRIBUTES = b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n"


class HubError(Exception):
    """An error answered the way the Hub does: status, ``X-Error-Code``, JSON ``error``."""

    def __init__(
        self,
        status: int,
        message: str,
        code: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.headers = dict(headers or {})


@dataclass(frozen=True)
class StoredFile:
    """One file of a commit: its content is the blob named by ``sha256``."""

    sha256: str
    size: int
    git_oid: str
    lfs: bool


@dataclass
class Commit:
    """One commit: every file of the tree at that point."""

    sha: str
    parent: str | None
    files: dict[str, StoredFile]
    title: str
    description: str = ""


@dataclass
class Repo:
    """A model repository."""

    repo_id: str
    private: bool
    branches: dict[str, str] = field(default_factory=dict)
    commits: dict[str, Commit] = field(default_factory=dict)
    pull_requests: int = 0


@dataclass(frozen=True)
class SeenRequest:
    """A request the server received (for assertions)."""

    method: str
    path: str
    range: str | None
    authorization: str | None


def _git_blob_oid(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _lfs_pointer_oid(sha256: str, size: int) -> str:
    pointer = f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n"
    return _git_blob_oid(pointer.encode())


def _split_revision(rest: str) -> tuple[str, str]:
    """``rev/path/in/repo`` into (rev, path); ``refs/pr/N`` revisions keep their slashes."""
    match = re.match(r"^(refs/(?:pr|convert)/[^/]+)(?:/(.*))?$", rest)
    if match:
        return match.group(1), match.group(2) or ""
    rev, _, path = rest.partition("/")
    return rev, path


def _parse_range(header: str, size: int) -> tuple[int, int] | None:
    match = re.fullmatch(r"\s*bytes=(\d*)-(\d*)\s*", header)
    if not match or (not match.group(1) and not match.group(2)):
        return None
    if match.group(1):
        start = int(match.group(1))
        end = int(match.group(2)) if match.group(2) else size - 1
    else:
        start, end = max(0, size - int(match.group(2))), size - 1
    if start >= size or start > end:
        raise HubError(
            416, "Requested Range Not Satisfiable", headers={"Content-Range": f"bytes */{size}"}
        )
    return start, min(end, size - 1)


class FakeHub:
    """A Hub-compatible HTTP server on loopback, for tests.

    Args:
        tokens: token -> namespaces it may write to (and read private repositories of).
        root: folder for blobs (default: a new temporary folder).
    """

    def __init__(self, tokens: Mapping[str, Sequence[str]], root: Path | None = None) -> None:
        self.tokens = {token: tuple(spaces) for token, spaces in tokens.items()}
        self._tempdir = tempfile.TemporaryDirectory(prefix="fake-hub-") if root is None else None
        self.root = Path(self._tempdir.name) if self._tempdir is not None else Path(root)  # type: ignore[arg-type]
        self.blobs = self.root / "blobs"
        self.blobs.mkdir(parents=True, exist_ok=True)
        self.repos: dict[str, Repo] = {}
        self.requests: list[SeenRequest] = []
        self.fail_commits = 0  # the next N commit requests answer 500
        self._lock = threading.RLock()
        self._counter = 0
        self.url = ""
        self.app = self._build_app()
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self._socket: socket.socket | None = None

    # -- life cycle ----------------------------------------------------------------------

    def start(self) -> FakeHub:
        """Serve on 127.0.0.1 and an ephemeral port, in a background thread."""
        self._socket = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._socket.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self._socket.getsockname()[1]}"
        config = uvicorn.Config(self.app, log_level="warning", lifespan="off")
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(
            target=self._server.run, kwargs={"sockets": [self._socket]}, daemon=True
        )
        self._thread.start()
        deadline = time.monotonic() + 30
        while not self._server.started:
            if time.monotonic() > deadline or not self._thread.is_alive():
                raise RuntimeError("the fake Hub did not start")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        """Stop serving and remove the blobs."""
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(10)
        if self._socket is not None:
            self._socket.close()
        if self._tempdir is not None:
            self._tempdir.cleanup()

    # -- helpers for tests ---------------------------------------------------------------

    def create_repo(self, repo_id: str, *, private: bool = False) -> Repo:
        """Create a repository with the Hub's initial commit (``.gitattributes``)."""
        with self._lock:
            if repo_id in self.repos:
                raise HubError(409, "You already created this model repo")
            repo = Repo(repo_id=repo_id, private=private)
            initial = self._new_commit(
                repo, None, {".gitattributes": self._store(_GITATTRIBUTES, lfs=False)}, "initial"
            )
            repo.branches["main"] = initial.sha
            self.repos[repo_id] = repo
            return repo

    def commit_folder(self, repo_id: str, folder: Path, *, branch: str = "main") -> str:
        """Commit every file of ``folder`` onto ``branch`` directly; returns the commit SHA."""
        with self._lock:
            repo = self.repos.get(repo_id) or self.create_repo(repo_id)
            head = repo.commits[repo.branches.get(branch, repo.branches["main"])]
            files = dict(head.files)
            for path in sorted(folder.rglob("*")):
                if path.is_file():
                    data = path.read_bytes()
                    name = path.relative_to(folder).as_posix()
                    files[name] = self._store(data, lfs=self._is_lfs(name, len(data), data[:512]))
            commit = self._new_commit(repo, head.sha, files, f"Upload {folder.name}")
            repo.branches[branch] = commit.sha
            return commit.sha

    def file_bytes(self, repo_id: str, revision: str, path: str) -> bytes:
        """The content of ``path`` at ``revision``."""
        with self._lock:
            stored = self._commit_of(self.repos[repo_id], revision).files[path]
        return (self.blobs / stored.sha256).read_bytes()

    def files_at(self, repo_id: str, revision: str) -> dict[str, StoredFile]:
        """Every file at ``revision``."""
        with self._lock:
            return dict(self._commit_of(self.repos[repo_id], revision).files)

    # -- storage -------------------------------------------------------------------------

    def _store(self, data: bytes, *, lfs: bool) -> StoredFile:
        sha = hashlib.sha256(data).hexdigest()
        blob = self.blobs / sha
        if not blob.exists():
            blob.write_bytes(data)
        oid = _lfs_pointer_oid(sha, len(data)) if lfs else _git_blob_oid(data)
        return StoredFile(sha256=sha, size=len(data), git_oid=oid, lfs=lfs)

    @staticmethod
    def _is_lfs(path: str, size: int, sample: bytes) -> bool:
        return path.endswith(LFS_SUFFIXES) or size > REGULAR_MAX_BYTES or b"\0" in sample

    def _new_commit(
        self,
        repo: Repo,
        parent: str | None,
        files: dict[str, StoredFile],
        title: str,
        description: str = "",
    ) -> Commit:
        self._counter += 1
        identity = json.dumps(
            [
                repo.repo_id,
                parent,
                sorted((p, f.git_oid) for p, f in files.items()),
                title,
                self._counter,
            ]
        )
        sha = hashlib.sha1(identity.encode()).hexdigest()
        commit = Commit(sha=sha, parent=parent, files=files, title=title, description=description)
        repo.commits[sha] = commit
        return commit

    def _commit_of(self, repo: Repo, revision: str) -> Commit:
        revision = unquote(revision)
        if revision in repo.branches:
            return repo.commits[repo.branches[revision]]
        if re.fullmatch(r"[0-9a-f]{7,40}", revision):
            found = [c for sha, c in repo.commits.items() if sha.startswith(revision)]
            if len(found) == 1:
                return found[0]
        raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")

    # -- access control ------------------------------------------------------------------

    def _user(self, request: Request) -> tuple[str, ...] | None:
        header = request.headers.get("authorization", "")
        if not header.lower().startswith("bearer "):
            return None
        token = header[7:].strip()
        if token not in self.tokens:
            raise HubError(401, "Invalid credentials in Authorization header")
        return self.tokens[token]

    def _readable(self, repo_id: str, request: Request) -> Repo:
        user = self._user(request)
        repo = self.repos.get(repo_id)
        namespace = repo_id.split("/", 1)[0]
        if repo is None or (repo.private and (user is None or namespace not in user)):
            status = 401 if user is None else 404
            raise HubError(status, "Repository Not Found", "RepoNotFound")
        return repo

    def _writable(self, repo_id: str, request: Request) -> Repo:
        user = self._user(request)
        if user is None:
            raise HubError(401, "You must be authenticated to access this resource")
        repo = self._readable(repo_id, request)
        if repo_id.split("/", 1)[0] not in user:
            raise HubError(403, f"You don't have the rights to write to {repo_id}")
        return repo

    # -- the app -------------------------------------------------------------------------

    def _build_app(self) -> FastAPI:
        app = FastAPI()
        hub = self

        @app.middleware("http")
        async def record(request: Request, call_next: Any) -> Response:
            hub.requests.append(
                SeenRequest(
                    request.method,
                    request.url.path,
                    request.headers.get("range"),
                    request.headers.get("authorization"),
                )
            )
            return await call_next(request)  # type: ignore[no-any-return]

        @app.exception_handler(HubError)
        async def hub_error(request: Request, exc: Exception) -> Response:
            assert isinstance(exc, HubError)
            headers = {"X-Error-Message": exc.message, **exc.headers}
            if exc.code is not None:
                headers["X-Error-Code"] = exc.code
            if request.method == "HEAD":
                return Response(status_code=exc.status, headers=headers)
            return JSONResponse({"error": exc.message}, status_code=exc.status, headers=headers)

        @app.get("/api/whoami-v2")
        def whoami(request: Request) -> dict[str, Any]:
            user = hub._user(request)
            if user is None:
                raise HubError(401, "You must be authenticated")
            return {
                "type": "user",
                "name": user[0] if user else "anonymous",
                "orgs": [{"name": space} for space in user[1:]],
                "auth": {"type": "access_token", "accessToken": {"role": "write"}},
            }

        @app.post("/api/repos/create")
        async def create(request: Request) -> Response:
            payload = await request.json()
            user = hub._user(request)
            if user is None:
                raise HubError(401, "You must be authenticated to create a repository")
            namespace = payload.get("organization") or (user[0] if user else None)
            repo_id = f"{namespace}/{payload['name']}"
            if payload.get("type") not in (None, "model"):
                raise HubError(400, "only model repositories are implemented")
            if namespace not in user:
                raise HubError(403, f"You don't have the rights to create a repo in {namespace}")
            private = payload.get("visibility") == "private" or payload.get("private") is True
            with hub._lock:
                if repo_id in hub.repos:
                    return JSONResponse(
                        {"error": "You already created this model repo", "url": hub._url(repo_id)},
                        status_code=409,
                    )
                hub.create_repo(repo_id, private=private)
            return JSONResponse({"url": hub._url(repo_id), "name": repo_id, "id": repo_id})

        def model_info(request: Request, repo_id: str, revision: str) -> dict[str, Any]:
            with hub._lock:
                repo = hub._readable(repo_id, request)
                commit = hub._commit_of(repo, revision)
                return {
                    "_id": hashlib.md5(repo_id.encode()).hexdigest()[:24],
                    "id": repo_id,
                    "modelId": repo_id,
                    "sha": commit.sha,
                    "private": repo.private,
                    "disabled": False,
                    "gated": False,
                    "downloads": 0,
                    "likes": 0,
                    "tags": [],
                    "lastModified": "2026-01-01T00:00:00.000Z",
                    "createdAt": "2026-01-01T00:00:00.000Z",
                    "siblings": [{"rfilename": path} for path in sorted(commit.files)],
                }

        @app.get("/api/models/{ns}/{name}")
        def info_default(ns: str, name: str, request: Request) -> dict[str, Any]:
            return model_info(request, f"{ns}/{name}", "main")

        @app.get("/api/models/{ns}/{name}/revision/{revision:path}")
        def info_revision(ns: str, name: str, revision: str, request: Request) -> dict[str, Any]:
            return model_info(request, f"{ns}/{name}", revision)

        @app.get("/api/models/{ns}/{name}/tree/{rest:path}")
        def tree(ns: str, name: str, rest: str, request: Request) -> list[dict[str, Any]]:
            revision, prefix = _split_revision(rest)
            recursive = request.query_params.get("recursive", "false").lower() == "true"
            with hub._lock:
                repo = hub._readable(f"{ns}/{name}", request)
                commit = hub._commit_of(repo, revision)
                entries: list[dict[str, Any]] = []
                folders: set[str] = set()
                for path, stored in sorted(commit.files.items()):
                    if prefix and not path.startswith(prefix.rstrip("/") + "/"):
                        continue
                    relative = path[len(prefix.rstrip("/")) + 1 :] if prefix else path
                    if not recursive and "/" in relative:
                        top = relative.split("/", 1)[0]
                        folder = f"{prefix.rstrip('/')}/{top}" if prefix else top
                        if folder not in folders:
                            folders.add(folder)
                            entries.append(
                                {"type": "directory", "oid": "0" * 40, "size": 0, "path": folder}
                            )
                        continue
                    entry: dict[str, Any] = {
                        "type": "file",
                        "oid": stored.git_oid,
                        "size": stored.size,
                        "path": path,
                    }
                    if stored.lfs:
                        entry["lfs"] = {
                            "oid": stored.sha256,
                            "size": stored.size,
                            "pointerSize": 134,
                        }
                    entries.append(entry)
                return entries

        @app.post("/api/models/{ns}/{name}/preupload/{revision:path}")
        async def preupload(ns: str, name: str, revision: str, request: Request) -> dict[str, Any]:
            payload = await request.json()
            with hub._lock:
                repo = hub._writable(f"{ns}/{name}", request)
                current = hub._commit_of(repo, revision).files
                answers = []
                for item in payload["files"]:
                    sample = base64.b64decode(item["sample"])
                    lfs = hub._is_lfs(item["path"], int(item["size"]), sample)
                    existing = current.get(item["path"])
                    oid = None
                    if existing is not None:
                        oid = existing.sha256 if existing.lfs else existing.git_oid
                    answers.append(
                        {
                            "path": item["path"],
                            "uploadMode": "lfs" if lfs else "regular",
                            "shouldIgnore": False,
                            "oid": oid,
                        }
                    )
            return {"files": answers, "commitOid": None}

        @app.post("/{ns}/{name}.git/info/lfs/objects/batch")
        async def lfs_batch(ns: str, name: str, request: Request) -> Response:
            payload = await request.json()
            hub._writable(f"{ns}/{name}", request)
            if payload.get("operation") != "upload":
                raise HubError(400, "only uploads are implemented")
            objects = []
            for item in payload["objects"]:
                oid, size = item["oid"], int(item["size"])
                answer: dict[str, Any] = {"oid": oid, "size": size, "authenticated": True}
                if not (hub.blobs / oid).exists():
                    answer["actions"] = {
                        "upload": {"href": f"{hub.url}/_lfs/{oid}?size={size}"},
                        "verify": {"href": f"{hub.url}/_lfs/{oid}/verify"},
                    }
                objects.append(answer)
            return JSONResponse(
                {"transfer": "basic", "objects": objects, "hash_algo": "sha256"},
                media_type="application/vnd.git-lfs+json",
            )

        @app.put("/_lfs/{oid}")
        async def lfs_put(oid: str, request: Request) -> Response:
            digest = hashlib.sha256()
            partial = hub.blobs / f".{oid}.incoming"
            size = 0
            with partial.open("wb") as handle:
                async for chunk in request.stream():
                    digest.update(chunk)
                    handle.write(chunk)
                    size += len(chunk)
            expected = int(request.query_params.get("size", size))
            if digest.hexdigest() != oid or size != expected:
                partial.unlink()
                raise HubError(400, "the uploaded content does not match its oid and size")
            partial.replace(hub.blobs / oid)
            return Response(status_code=200, headers={"ETag": f'"{oid}"'})

        @app.post("/_lfs/{oid}/verify")
        async def lfs_verify(oid: str, request: Request) -> dict[str, Any]:
            payload = await request.json()
            blob = hub.blobs / oid
            if payload.get("oid") != oid or not blob.exists():
                raise HubError(404, "object not found")
            if blob.stat().st_size != payload.get("size"):
                raise HubError(400, "object size mismatch")
            return {"success": True}

        @app.post("/api/models/{ns}/{name}/branch/{branch:path}")
        async def branch(ns: str, name: str, branch: str, request: Request) -> dict[str, Any]:
            body = await request.body()
            payload = json.loads(body) if body else {}
            with hub._lock:
                repo = hub._writable(f"{ns}/{name}", request)
                branch = unquote(branch)
                if branch in repo.branches:
                    raise HubError(409, "Reference already exists")
                start = hub._commit_of(repo, payload.get("startingPoint") or "main")
                repo.branches[branch] = start.sha
            return {"success": True}

        @app.post("/api/validate-yaml")
        async def validate_yaml(request: Request) -> Response:
            payload = await request.json()
            errors = _card_errors(str(payload.get("content", "")))
            status = 400 if errors else 200
            return JSONResponse(
                {"errors": [{"message": e} for e in errors], "warnings": []}, status_code=status
            )

        @app.post("/api/models/{ns}/{name}/commit/{revision:path}")
        async def commit(ns: str, name: str, revision: str, request: Request) -> Response:
            repo_id = f"{ns}/{name}"
            lines = [json.loads(line) for line in (await request.body()).splitlines() if line]
            with hub._lock:
                repo = hub._writable(repo_id, request)
                if hub.fail_commits > 0:
                    hub.fail_commits -= 1
                    raise HubError(500, "Internal Error - the commit could not be created")
                revision = unquote(revision)
                if revision not in repo.branches:
                    raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")
                head = repo.commits[repo.branches[revision]]
                header = next((line["value"] for line in lines if line["key"] == "header"), {})
                parent = header.get("parentCommit")
                if parent is not None and parent != head.sha:
                    raise HubError(412, "A commit has happened since the parent commit")
                files = dict(head.files)
                for line in lines:
                    key, value = line["key"], line["value"]
                    if key == "file":
                        data = base64.b64decode(value["content"])
                        files[value["path"]] = hub._store(data, lfs=False)
                    elif key == "lfsFile":
                        blob = hub.blobs / value["oid"]
                        if not blob.exists():
                            raise HubError(
                                422,
                                "Your push was rejected because an LFS pointer pointed to a "
                                "file that does not exist",
                            )
                        files[value["path"]] = StoredFile(
                            sha256=value["oid"],
                            size=blob.stat().st_size,
                            git_oid=_lfs_pointer_oid(value["oid"], blob.stat().st_size),
                            lfs=True,
                        )
                    elif key == "deletedFile":
                        if files.pop(value["path"], None) is None:
                            raise HubError(
                                404, "A file with this name doesn't exist", "EntryNotFound"
                            )
                    elif key == "deletedFolder":
                        folder = value["path"].rstrip("/") + "/"
                        files = {p: f for p, f in files.items() if not p.startswith(folder)}
                new = hub._new_commit(
                    repo, head.sha, files, header.get("summary", ""), header.get("description", "")
                )
                answer: dict[str, Any] = {
                    "success": True,
                    "commitOid": new.sha,
                    "commitUrl": f"{hub._url(repo_id)}/commit/{new.sha}",
                }
                if request.query_params.get("create_pr") in ("1", "true"):
                    repo.pull_requests += 1
                    number = repo.pull_requests
                    repo.branches[f"refs/pr/{number}"] = new.sha
                    answer["pullRequestUrl"] = f"{hub._url(repo_id)}/discussions/{number}"
                else:
                    repo.branches[revision] = new.sha
            return JSONResponse(answer)

        @app.api_route("/{ns}/{name}/resolve/{rest:path}", methods=["GET", "HEAD"])
        def resolve(ns: str, name: str, rest: str, request: Request) -> Response:
            revision, path = _split_revision(rest)
            with hub._lock:
                repo = hub._readable(f"{ns}/{name}", request)
                commit = hub._commit_of(repo, revision)
                stored = commit.files.get(unquote(path))
            if stored is None:
                raise HubError(
                    404,
                    "Entry not found",
                    "EntryNotFound",
                    headers={"X-Repo-Commit": commit.sha},
                )
            headers = {
                "X-Repo-Commit": commit.sha,
                "Accept-Ranges": "bytes",
                "ETag": f'"{stored.sha256 if stored.lfs else stored.git_oid}"',
                "Content-Type": "application/octet-stream",
            }
            if stored.lfs:
                headers["X-Linked-Etag"] = f'"{stored.sha256}"'
                headers["X-Linked-Size"] = str(stored.size)
            byte_range = _parse_range(request.headers.get("range", ""), stored.size)
            start, end = byte_range if byte_range is not None else (0, stored.size - 1)
            length = max(0, end - start + 1)
            headers["Content-Length"] = str(length)
            status = 200
            if byte_range is not None:
                status = 206
                headers["Content-Range"] = f"bytes {start}-{end}/{stored.size}"
            if request.method == "HEAD":
                return Response(status_code=status, headers=headers)
            with (hub.blobs / stored.sha256).open("rb") as handle:
                handle.seek(start)
                data = handle.read(length)
            return Response(content=data, status_code=status, headers=headers)

        return app

    def _url(self, repo_id: str) -> str:
        return f"{self.url}/{repo_id}"


def _card_errors(content: str) -> list[str]:
    """What the Hub would refuse in a model card's YAML front matter."""
    match = re.match(r"^---\n(.*?)\n---\n", content, re.DOTALL)
    if match is None:
        return []
    try:
        data = yaml.safe_load(match.group(1)) or {}
    except yaml.YAMLError as error:
        return [f"Invalid YAML: {error}"]
    if not isinstance(data, dict):
        return ["metadata must be a mapping"]
    errors = []
    base = data.get("base_model")
    bases = base if isinstance(base, list) else [base] if base is not None else []
    for value in bases:
        if not isinstance(value, str) or not _REPO_ID.fullmatch(value) or ".." in value:
            errors.append(f'"base_model" with value "{value}" is not a valid model id')
    relation = data.get("base_model_relation")
    if relation is not None and relation not in _BASE_MODEL_RELATIONS:
        errors.append(f'"base_model_relation" must be one of {sorted(_BASE_MODEL_RELATIONS)}')
    return errors


def use_fake_hub(hub: FakeHub, monkeypatch: Any, home: Path) -> Path:
    """Point ``huggingface_hub`` at ``hub``, here and in child processes; return the cache.

    ``huggingface_hub`` reads its environment once, at import, into
    ``huggingface_hub.constants``: this sets both the variables (for worker processes) and
    the constants (for this process). Uploads go through the LFS API (Xet is disabled), no
    stored login is read, and the cache is ``home/hub``.

    Args:
        hub: a started fake Hub.
        monkeypatch: pytest's ``monkeypatch`` fixture (undone after the test).
        home: an empty folder to use as ``HF_HOME``.
    """
    from urllib.parse import urlsplit

    from huggingface_hub import constants

    cache = home / "hub"
    cache.mkdir(parents=True, exist_ok=True)
    variables = {
        "HF_ENDPOINT": hub.url,
        "HF_HOME": str(home),
        "HF_HUB_CACHE": str(cache),
        "HF_HUB_OFFLINE": "0",
        "HF_HUB_DISABLE_XET": "1",
        "HF_HUB_DISABLE_PROGRESS_BARS": "1",
        "HF_HUB_DISABLE_TELEMETRY": "1",
    }
    for name, value in variables.items():
        monkeypatch.setenv(name, value)
    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_HUB_CACHE_DIR", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(constants, "ENDPOINT", hub.url)
    monkeypatch.setattr(
        constants,
        "HUGGINGFACE_CO_URL_TEMPLATE",
        hub.url + "/{repo_id}/resolve/{revision}/{filename}",
    )
    monkeypatch.setattr(
        constants, "HF_URL_HOSTS", constants.HF_URL_HOSTS | {urlsplit(hub.url).hostname}
    )
    monkeypatch.setattr(constants, "HF_HOME", str(home))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(home / "token"))
    monkeypatch.setattr(constants, "HF_STORED_TOKENS_PATH", str(home / "stored_tokens"))
    return cache
