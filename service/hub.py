"""Publishing merged checkpoints to the Hugging Face Hub: the service's jobs and ``tureen push``.

A merge's output folder (weights, config, tokenizer, the model card ``README.md`` and the
recipe ``tureen_recipe.yaml`` the engine writes) is published with ``huggingface_hub`` in one
commit: the repository is created when missing (private unless asked otherwise), a missing
branch is created from ``main``, and every file goes into a single ``create_commit`` (large
files through the Hub's large-file storage, Xet when ``hf_xet`` is installed), optionally as
a pull request. One commit keeps the repository consistent: a reader never sees weights of
one merge with the card of another, and a failed upload leaves the repository unchanged and
the local output intact, ready for a retry.

Where tokens live. A token given with a request (the ``X-HF-Token`` header) stays in the API
process's memory only: the :class:`Publisher` publishes in a thread of the API process, and
forgets the token when the attempt ends. It is never written to the job database, never
logged, never returned, and never reaches a worker process (workers merge; they do not
publish). The record keeps only ``token_source`` (``request`` or ``server``), so that a
server restarted in the middle of a publication fails that publication with a clear message
rather than publishing it under the server's own identity. Without a request token, the
server's ``hf_token`` setting is used, else ``huggingface_hub``'s default (``HF_TOKEN`` or
the stored login).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from pydantic import SecretStr

from merge_kernels import __version__
from merge_kernels.errors import TureenError
from merge_kernels.executors.hub_upload import uploaded_operations
from service.jobs.models import (
    Job,
    JobError,
    JobPublish,
    JobStatus,
    PublishOptions,
    PublishState,
)
from service.jobs.sqlite_store import utcnow
from service.jobs.store import JobNotFoundError, JobStore
from service.settings import ServiceSettings

log = logging.getLogger(__name__)

POLL_INTERVAL_S = 0.5
MAX_CONCURRENT_PUBLISHES = 2
TOKEN_WAIT_S = 60.0  # a request's token arrives right after its job is stored


class PublishError(TureenError):
    """Publishing to the Hub failed; ``details['reason']`` says why."""

    code = "publish_failed"


class PublishConflictError(TureenError):
    """The job cannot be published now (not merged yet, or already publishing)."""

    code = "conflict"


@dataclass(frozen=True)
class PublishedCommit:
    """Where a publication landed.

    Attributes:
        repo_url: the repository's page.
        commit_url: the commit's page.
        commit_sha: the commit's SHA (on the pull request's branch with ``create_pr``).
        pr_url: the pull request's page, with ``create_pr``.
    """

    repo_url: str
    commit_url: str
    commit_sha: str
    pr_url: str | None


StepCallback = Callable[[str], None]


def _hub() -> Any:
    try:
        import huggingface_hub
        import huggingface_hub.errors
    except ImportError:
        raise PublishError(
            "publishing to the Hugging Face Hub needs the 'huggingface_hub' package; "
            "install it with pip install huggingface_hub",
            details={"reason": "missing_package"},
        ) from None
    return huggingface_hub


def _scrub(text: str, token: str | None) -> str:
    return text.replace(token, "***") if token else text


def _translate(exc: Exception, repo_id: str, token: str | None) -> PublishError:
    """A Hub or network failure as a PublishError that says what to do (never the token)."""
    errors = _hub().errors
    if isinstance(exc, PublishError):
        return exc
    status = getattr(getattr(exc, "response", None), "status_code", None)
    detail = _scrub(str(exc).splitlines()[0] if str(exc) else type(exc).__name__, token)
    if isinstance(exc, ValueError) and "Invalid metadata in README.md" in str(exc):
        return PublishError(
            f"the Hub refused the model card's metadata: {_scrub(str(exc), token)}",
            details={"reason": "invalid_model_card", "repo_id": repo_id},
        )
    if isinstance(exc, errors.HfHubHTTPError):
        if status == 401:
            return PublishError(
                f"the Hub refused the token for {repo_id} (HTTP 401); give a valid token with "
                "write access (the X-HF-Token header, the server's hf_token, or HF_TOKEN)",
                details={"reason": "unauthorized", "repo_id": repo_id, "status": 401},
            )
        if status == 403:
            return PublishError(
                f"the token may not write to {repo_id} (HTTP 403); use a token with write "
                "access to its namespace",
                details={"reason": "forbidden", "repo_id": repo_id, "status": 403},
            )
        if isinstance(exc, errors.RevisionNotFoundError):
            return PublishError(
                f"{repo_id}: the revision does not exist ({detail})",
                details={"reason": "revision_not_found", "repo_id": repo_id, "status": status},
            )
        if isinstance(exc, errors.RepositoryNotFoundError):
            return PublishError(
                f"{repo_id} does not exist and could not be created, or the token cannot see it",
                details={"reason": "repo_not_found", "repo_id": repo_id, "status": status},
            )
        return PublishError(
            f"the Hub answered HTTP {status} while publishing to {repo_id}: {detail}; the local "
            "output is kept, retry the publication",
            details={"reason": "hub_error", "repo_id": repo_id, "status": status},
        )
    return PublishError(
        f"publishing to {repo_id} failed ({type(exc).__name__}: {detail}); the local output "
        "is kept, retry the publication",
        details={"reason": "unreachable", "repo_id": repo_id},
    )


def output_files(folder: Path) -> list[Path]:
    """The files of an output folder to publish, sorted (hidden files are left out)."""
    return sorted(
        path
        for path in folder.rglob("*")
        if path.is_file()
        and not any(part.startswith(".") for part in path.relative_to(folder).parts)
    )


def publish_folder(
    folder: Path,
    options: PublishOptions,
    *,
    token: str | None = None,
    default_message: str | None = None,
    on_step: StepCallback | None = None,
) -> PublishedCommit:
    """Publish an output folder to a Hub model repository in one commit.

    Args:
        folder: the merge's output folder.
        options: the repository, visibility, branch, message and pull-request choice.
        token: the Hub token; None uses ``huggingface_hub``'s default (``HF_TOKEN`` or the
            stored login).
        default_message: the commit message when ``options`` gives none.
        on_step: called with a short description of each step.

    Returns:
        The commit.

    Raises:
        PublishError: the folder is empty or missing, or the Hub refused or failed;
            ``details['reason']`` says which (``unauthorized``, ``forbidden``,
            ``visibility``, ``invalid_model_card``, ``hub_error``, ``unreachable``...).
    """
    hub = _hub()
    step = on_step or (lambda _: None)
    repo_id = options.repo_id
    files = output_files(folder) if folder.is_dir() else []
    if not files:
        raise PublishError(
            f"{folder} holds no files to publish; publish the output folder of a finished merge",
            details={"reason": "no_output", "repo_id": repo_id},
        )
    api = hub.HfApi(token=token)
    try:
        step("checking the repository")
        try:
            existing = api.repo_info(repo_id, repo_type="model")
        except hub.errors.RepositoryNotFoundError as missing:
            if getattr(getattr(missing, "response", None), "status_code", None) == 401:
                raise
            existing = None
        if existing is None:
            step("creating the repository")
            private = True if options.private is None else options.private
            api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
        elif options.private is True and not existing.private:
            raise PublishError(
                f"{repo_id} exists and is public, but private publishing was asked for; make "
                "the repository private first, or publish with private false",
                details={"reason": "visibility", "repo_id": repo_id},
            )
        if options.revision is not None and options.revision != "main":
            step(f"making sure branch {options.revision} exists")
            api.create_branch(repo_id, branch=options.revision, repo_type="model", exist_ok=True)
        # Shards the merge's nodes pre-uploaded go in by reference (no bytes sent again).
        uploaded = uploaded_operations(folder, files, repo_id)
        operations = [
            uploaded.get(path)
            or hub.CommitOperationAdd(
                path_in_repo=path.relative_to(folder).as_posix(), path_or_fileobj=str(path)
            )
            for path in files
        ]
        total = sum(path.stat().st_size for path in files)
        step(f"uploading {len(files)} files ({total} bytes) in one commit")
        info = api.create_commit(
            repo_id,
            operations,
            commit_message=options.commit_message
            or default_message
            or f"Upload a merge made with tureen {__version__}",
            commit_description="Merged with tureen: the recipe is tureen_recipe.yaml, the "
            "inputs with their revisions and file hashes are in README.md.",
            repo_type="model",
            revision=options.revision,
            create_pr=options.create_pr,
        )
    except Exception as exc:
        raise _translate(exc, repo_id, token) from None
    step("published")
    return PublishedCommit(
        repo_url=f"{api.endpoint}/{repo_id}",
        commit_url=str(info.commit_url),
        commit_sha=str(info.oid),
        pr_url=str(info.pr_url) if info.pr_url else None,
    )


def _job_message(job: Job) -> str:
    method = job.recipe.get("merge_method", "merge")
    name = job.output.name or job.id
    return f"Upload {name}: a {method} merge made with tureen {__version__} (job {job.id})"


class Publisher:
    """Publishes jobs in state ``publishing``, in threads of the API process.

    Thread-safe. ``remember`` and ``request`` are called by the API routes; a background
    thread picks up jobs in state ``publishing`` (from a worker that finished a merge with
    publish options, from ``request``, or left by a previous server) and publishes them.

    Args:
        store: the job store.
        settings: the service settings (the server's Hub token).
        output_path: the output folder of a job.
    """

    def __init__(
        self, store: JobStore, settings: ServiceSettings, output_path: Callable[[Job], Path]
    ) -> None:
        self.store = store
        self.settings = settings
        self.output_path = output_path
        self._tokens: dict[str, SecretStr] = {}
        self._active: set[str] = set()
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._threads: list[threading.Thread] = []
        self._started_at = utcnow()

    # -- life cycle ---------------------------------------------------------------------

    def start(self) -> None:
        """Start picking up jobs to publish."""
        self._started_at = utcnow()
        self._stopping.clear()
        self._thread = threading.Thread(target=self._loop, name="tureen-publish", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop picking up jobs; wait up to ``timeout`` for publications in flight.

        A publication still running afterwards is abandoned with the process; its job stays
        ``publishing`` and the next server start publishes it again (or fails it, when its
        token came with the request and was lost).
        """
        deadline = time.monotonic() + timeout
        self._stopping.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(max(0.0, deadline - time.monotonic()))
            self._thread = None
        for thread in list(self._threads):
            thread.join(max(0.0, deadline - time.monotonic()))
        with self._lock:
            self._tokens.clear()

    # -- requests -----------------------------------------------------------------------

    @staticmethod
    def initial(options: PublishOptions, token: str | None) -> JobPublish:
        """The publication state of a job submitted with publish options."""
        return JobPublish(
            options=options,
            state=PublishState.PENDING,
            token_source="request" if token else "server",
            requested_at=utcnow(),
        )

    def remember(self, job_id: str, token: str | None) -> None:
        """Hold a request's Hub token in memory until the job's publication attempt ends."""
        if token:
            with self._lock:
                self._tokens[job_id] = SecretStr(token)
            self._wake.set()

    def request(self, job_id: str, options: PublishOptions | None, token: str | None) -> Job:
        """Publish a succeeded job's output now (again, after a failure or elsewhere).

        Args:
            job_id: the job.
            options: where to publish; None reuses the job's last publish options.
            token: a Hub token from the request, or None for the server's.

        Returns:
            The job, now ``publishing``.

        Raises:
            JobNotFoundError: no such job.
            PublishConflictError: the job has not succeeded, or is publishing already.
            PublishError: no options were given and the job never had any.
        """
        with self._lock:
            job = self.store.get(job_id)
            if job is None:
                raise JobNotFoundError(job_id)
            if job.status is JobStatus.PUBLISHING or job_id in self._active:
                raise PublishConflictError(
                    f"job {job_id} is being published; wait for it to finish, then retry",
                    details={"job_id": job_id, "status": job.status.value},
                )
            if job.status is not JobStatus.SUCCEEDED:
                raise PublishConflictError(
                    f"job {job_id} is {job.status.value}; only a succeeded merge can be published",
                    details={"job_id": job_id, "status": job.status.value},
                )
            chosen = options or (job.publish.options if job.publish else job.output.publish)
            if chosen is None:
                raise PublishError(
                    f"job {job_id} has no publish options; give at least repo_id",
                    details={"reason": "no_options", "field": "repo_id"},
                )
            attempts = job.publish.attempts if job.publish is not None else 0
            state = self.initial(chosen, token).model_copy(update={"attempts": attempts})
            if token:
                self._tokens[job_id] = SecretStr(token)
            job = self.store.update(
                job_id,
                status=JobStatus.PUBLISHING,
                publish=state,
                progress=job.progress.model_copy(update={"phase": "publishing"}),
            )
        self._wake.set()
        return job

    # -- the background work ------------------------------------------------------------

    def _loop(self) -> None:
        while not self._stopping.is_set():
            try:
                self.poll()
            except Exception:  # the loop must outlive a bad moment of the database
                log.exception("publisher error; retrying")
            self._wake.wait(POLL_INTERVAL_S)
            self._wake.clear()

    def poll(self) -> None:
        """Start publishing every job in state ``publishing`` that no thread handles yet.

        Also forgets the tokens of jobs that ended without publishing (failed or cancelled
        merges), so that no token outlives its job in memory.
        """
        with self._lock:  # ``request`` stores a token and its job's state under this lock
            for job_id in [j for j in self._tokens if j not in self._active]:
                held = self.store.get(job_id)
                if held is None or held.status.finished:
                    del self._tokens[job_id]
        jobs, _ = self.store.list(status=JobStatus.PUBLISHING, limit=500)
        for job in reversed(jobs):  # oldest first
            with self._lock:
                if job.id in self._active or len(self._active) >= MAX_CONCURRENT_PUBLISHES:
                    continue
                token = self._tokens.get(job.id)
                publish = job.publish or (
                    self.initial(job.output.publish, None) if job.output.publish else None
                )
                if publish is None:
                    self._finish_without(job, "the job has no publish options", "no_options")
                    continue
                if publish.token_source == "request" and token is None:
                    if not self._token_lost(publish):
                        continue  # the request that gave it is storing it now
                    self._finish_without(
                        job,
                        "the Hub token came with the request and was held only in the memory "
                        "of a server process that has stopped; publish again with POST "
                        f"/v1/merges/{job.id}/publish and the X-HF-Token header",
                        "token_lost",
                    )
                    continue
                self._active.add(job.id)
            thread = threading.Thread(
                target=self._publish,
                args=(job.id, publish, token),
                name=f"tureen-publish-{job.id[:8]}",
                daemon=True,
            )
            self._threads = [t for t in self._threads if t.is_alive()] + [thread]
            thread.start()

    def _token_lost(self, publish: JobPublish) -> bool:
        requested = publish.requested_at
        if requested is None or requested < self._started_at:
            return True  # requested of an earlier server process
        return (utcnow() - requested).total_seconds() > TOKEN_WAIT_S

    def _finish_without(self, job: Job, message: str, reason: str) -> None:
        publish = job.publish
        error = JobError(code=PublishError.code, message=message, details={"reason": reason})
        self.store.update(
            job.id,
            status=JobStatus.SUCCEEDED,
            publish=publish.model_copy(
                update={"state": PublishState.FAILED, "error": error, "finished_at": utcnow()}
            )
            if publish is not None
            else None,
        )
        log.warning("publication of job %s failed: %s", job.id, reason)

    def _publish(self, job_id: str, publish: JobPublish, token: SecretStr | None) -> None:
        try:
            self._run(job_id, publish, token)
        except Exception:
            log.exception("publication of job %s failed unexpectedly", job_id)
        finally:
            with self._lock:
                self._active.discard(job_id)
                self._tokens.pop(job_id, None)  # each attempt needs its token anew

    def _run(self, job_id: str, publish: JobPublish, token: SecretStr | None) -> None:
        job = self.store.get(job_id)
        if job is None:
            return
        state = publish.model_copy(
            update={
                "state": PublishState.PUBLISHING,
                "attempts": publish.attempts + 1,
                "started_at": utcnow(),
                "finished_at": None,
                "error": None,
                "step": "starting",
            }
        )
        self.store.update(
            job_id,
            publish=state,
            progress=job.progress.model_copy(update={"phase": "publishing"}),
        )

        def step(text: str) -> None:
            nonlocal state
            state = state.model_copy(update={"step": text})
            try:
                self.store.update(job_id, publish=state)
            except Exception:  # a lost step report must not fail the upload
                log.warning("could not record the publication step of job %s", job_id)

        secret = token.get_secret_value() if token is not None else None
        if secret is None and self.settings.hf_token is not None:
            secret = self.settings.hf_token.get_secret_value()
        log.info("job %s: publishing to %s", job_id, publish.options.repo_id)
        try:
            commit = publish_folder(
                self.output_path(job),
                publish.options,
                token=secret,
                default_message=_job_message(job),
                on_step=step,
            )
        except PublishError as failure:
            log.warning("job %s: publishing failed: %s", job_id, _scrub(failure.message, secret))
            error = JobError(
                code=failure.code,
                message=_scrub(failure.message, secret),
                details=dict(failure.details),
            )
            self._record(job_id, state, error=error)
            return
        log.info("job %s: published %s", job_id, commit.commit_url)
        self._record(job_id, state, commit=commit)

    def _record(
        self,
        job_id: str,
        state: JobPublish,
        *,
        commit: PublishedCommit | None = None,
        error: JobError | None = None,
    ) -> None:
        finished: datetime = utcnow()
        update: dict[str, object] = {"finished_at": finished, "error": error, "step": None}
        if commit is not None:
            update |= {
                "state": PublishState.PUBLISHED,
                "repo_url": commit.repo_url,
                "commit_url": commit.commit_url,
                "commit_sha": commit.commit_sha,
                "pr_url": commit.pr_url,
            }
        else:
            update["state"] = PublishState.FAILED
        job = self.store.get(job_id)
        progress = job.progress.model_copy(update={"phase": "done"}) if job else None
        fields: dict[str, object] = {
            "status": JobStatus.SUCCEEDED,
            "publish": state.model_copy(update=update),
        }
        if progress is not None:
            fields["progress"] = progress
        self.store.update(job_id, **fields)
