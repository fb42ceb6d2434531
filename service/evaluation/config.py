"""The ``evaluator`` section of a recipe, validated, and the evaluator it builds.

Two evaluators are built in::

    evaluator: {type: held_out, data: heldout.jsonl, metric: loss}
    evaluator: {type: http, url: "http://127.0.0.1:9000/score", timeout_s: 600}

Data files are local paths under the allowed roots (relative ones are relative to the
recipe's folder, or the service's inputs folder). HTTP evaluators may only be on hosts the
operator allowed (loopback by default), so a recipe cannot make the service call anywhere.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

from merge_kernels.candidates import Evaluator
from merge_kernels.checkpoints.confinement import Confinement, PathOutsideRootsError
from merge_kernels.checkpoints.opening import resolve_local_path
from merge_kernels.errors import CheckpointNotFoundError, RecipeError

DEFAULT_EVALUATOR_HOSTS = ("127.0.0.1", "localhost", "::1")
_STRICT = ConfigDict(frozen=True, extra="forbid")


class HeldOutEvaluatorConfig(BaseModel):
    """Score causal LMs on a held-out JSONL file of prompt/completion or text records."""

    model_config = _STRICT

    type: Literal["held_out"]
    data: str = Field(description="JSONL file: {prompt, completion} or {text} per line.")
    metric: Literal["loss", "exact_match", "token_accuracy"] = Field(
        "loss",
        description="The score: mean completion-token loss (lower is better), exact match "
        "of greedy generation, or teacher-forced token accuracy.",
    )
    batch_size: int = Field(16, ge=1, le=1024)
    max_records: int | None = Field(None, ge=1, description="Use only the first N records.")
    max_length: int = Field(512, ge=8, description="Longest sequence in tokens (prompt cut).")
    max_new_tokens: int | None = Field(
        None, ge=1, description="Generation length for exact match (default: longest answer)."
    )
    device: str | None = Field(None, description="cpu or cuda (default: the merge's device).")


class HttpEvaluatorConfig(BaseModel):
    """Ask an HTTP server: POST {candidate, ingredients, step}, read back {score}."""

    model_config = _STRICT

    type: Literal["http"]
    url: str = Field(description="http(s) URL on a host the service allows.")
    timeout_s: float = Field(600.0, gt=0, description="Seconds to wait for one answer.")
    retries: int = Field(2, ge=0, le=10, description="Retries after a timeout or 5xx answer.")
    higher_is_better: bool = Field(True, description="Whether a larger score is better.")


EvaluatorConfig = Annotated[
    HeldOutEvaluatorConfig | HttpEvaluatorConfig, Field(discriminator="type")
]
_ADAPTER: TypeAdapter[HeldOutEvaluatorConfig | HttpEvaluatorConfig] = TypeAdapter(EvaluatorConfig)


def parse_evaluator_config(
    document: Mapping[str, Any] | None,
) -> HeldOutEvaluatorConfig | HttpEvaluatorConfig:
    """Validate a recipe's ``evaluator`` section.

    Raises:
        RecipeError: missing or invalid, naming the field (``evaluator.metric``...).
    """
    if document is None:
        raise RecipeError(
            "evaluator",
            "this merge needs an evaluator, e.g. {type: held_out, data: heldout.jsonl} or "
            "{type: http, url: ...}",
        )
    try:
        return _ADAPTER.validate_python(dict(document))
    except ValidationError as error:
        first = error.errors()[0]
        location = ".".join(str(part) for part in first["loc"] if part not in ("held_out", "http"))
        field = f"evaluator.{location}" if location else "evaluator"
        problems = [f"{e['loc']}: {e['msg']}" for e in error.errors()]
        raise RecipeError(field, first["msg"], details={"errors": problems}) from None


def check_url_host(url: str, allowed_hosts: Sequence[str]) -> None:
    """Refuse URLs that are not http(s) or whose host the operator has not allowed."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise RecipeError("evaluator.url", f"{url!r} is not an http(s) URL")
    if "*" not in allowed_hosts and parts.hostname not in allowed_hosts:
        raise RecipeError(
            "evaluator.url",
            f"host {parts.hostname!r} is not allowed for evaluators; allowed: "
            f"{', '.join(allowed_hosts)} (the operator can add hosts with evaluator_hosts)",
        )


def build_evaluator(
    document: Mapping[str, Any] | None,
    *,
    base_dir: Path | None = None,
    allowed_roots: Sequence[Path] | None = None,
    allowed_hosts: Sequence[str] = DEFAULT_EVALUATOR_HOSTS,
    device: str = "cpu",
    candidate_url: Callable[[Path], str] | None = None,
) -> Evaluator:
    """The evaluator a recipe's ``evaluator`` section describes.

    Args:
        document: the section.
        base_dir: folder relative data paths are relative to.
        allowed_roots: data files must lie under one of these (None: anywhere).
        allowed_hosts: hosts HTTP evaluators may be on (``*``: any).
        device: default device of the held-out evaluator.
        candidate_url: for HTTP evaluators, the download URL of a candidate folder.

    Raises:
        RecipeError: invalid section, a data file outside the roots or missing, or a host
            not allowed.
    """
    config = parse_evaluator_config(document)
    if isinstance(config, HttpEvaluatorConfig):
        from service.evaluation.http_evaluator import HttpEvaluator

        check_url_host(config.url, allowed_hosts)
        return HttpEvaluator(
            config.url,
            timeout_s=config.timeout_s,
            retries=config.retries,
            higher_is_better=config.higher_is_better,
            candidate_url=candidate_url,
        )
    from service.evaluation.held_out import HeldOutEvaluator
    from service.evaluation.records import load_records

    try:
        path = resolve_local_path(Path(config.data), base_dir=base_dir, allowed_roots=allowed_roots)
    except PathOutsideRootsError:
        raise RecipeError(
            "evaluator.data",
            f"{config.data} is outside the folders this service may read from; put the data "
            "file inside an allowed folder",
        ) from None
    except CheckpointNotFoundError as error:
        raise RecipeError("evaluator.data", error.message) from None
    if not path.is_file():
        raise RecipeError("evaluator.data", f"no such file: {config.data}")
    records = load_records(
        path, max_records=config.max_records, confinement=Confinement.of(allowed_roots)
    )
    return HeldOutEvaluator(
        records,
        metric=config.metric,
        batch_size=config.batch_size,
        max_length=config.max_length,
        max_new_tokens=config.max_new_tokens,
        device=config.device or device,
    )
