"""Dependencies shared by the routes: settings, the job manager, auth and the recipe body."""

from __future__ import annotations

import hashlib
import json
import logging
import re
from dataclasses import dataclass
from typing import Annotated, Any

import yaml
from fastapi import Depends, Header, Query, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import ValidationError
from pydantic_core import ErrorDetails

from merge_kernels.errors import RecipeError, TureenError
from merge_kernels.recipe import Recipe
from service.api.multi_recipe import MultiRecipeRequest, parse_multi_request
from service.api.schemas import merge_request_adapter
from service.api.text_fields import check_text_fields
from service.auth import token_accepted
from service.errors import ApiError
from service.jobs.manager import JobManager
from service.jobs.models import OutputOptions
from service.jobs.stages import MERGES_KEY
from service.settings import ServiceSettings

log = logging.getLogger(__name__)

_JSON_TYPES = ("application/json",)
_YAML_TYPES = ("application/yaml", "application/x-yaml", "text/yaml", "text/x-yaml")


def get_settings(request: Request) -> ServiceSettings:
    """The settings the app was created with."""
    settings = request.app.state.settings
    assert isinstance(settings, ServiceSettings)
    return settings


def get_manager(request: Request) -> JobManager:
    """The running job manager."""
    manager = getattr(request.app.state, "manager", None)
    if manager is None:
        raise ApiError(503, "unavailable", "the service is starting or stopping; retry shortly")
    assert isinstance(manager, JobManager)
    return manager


SettingsDep = Annotated[ServiceSettings, Depends(get_settings)]
ManagerDep = Annotated[JobManager, Depends(get_manager)]

_bearer = HTTPBearer(auto_error=False, description="A token from TUREEN_API_TOKENS.")


def require_token(
    settings: SettingsDep,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> None:
    """Refuse the request unless it carries one of the configured bearer tokens.

    Open when no token is configured.
    """
    if not settings.api_tokens:
        return
    given = credentials.credentials if credentials is not None else None
    if given is None or not token_accepted(given, settings.api_tokens):
        raise ApiError(
            401,
            "unauthorized",
            "missing or invalid bearer token; send 'Authorization: Bearer <token>'",
            headers={"WWW-Authenticate": "Bearer"},
        )


Authenticated = Depends(require_token)

#: SQLite's largest INTEGER: a larger page offset cannot even be sent to the job store.
MAX_PAGE_OFFSET = 2**63 - 1

PageOffset = Annotated[
    int,
    Query(ge=0, le=MAX_PAGE_OFFSET, description="Jobs to skip, newest first."),
]

IdempotencyKey = Annotated[
    str | None,
    Header(
        alias="Idempotency-Key",
        max_length=255,
        description="Retry-safe submission: the same key and body return the same job.",
    ),
]


@dataclass(frozen=True)
class RecipeRequest:
    """A parsed merge or plan request.

    Attributes:
        recipe: the validated recipe.
        output: the output options (defaults when the body gave none).
        body_hash: sha256 of the canonical document, for idempotency checks.
    """

    recipe: Recipe
    output: OutputOptions
    body_hash: str


class _NoAliasLoader(yaml.SafeLoader):
    """YAML without anchors and aliases, so a small body cannot expand into a huge one."""

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            mark = self.peek_event().start_mark  # type: ignore[no-untyped-call]
            raise yaml.composer.ComposerError(None, None, "YAML aliases are not accepted", mark)
        return super().compose_node(parent, index)


def _decode(body: bytes, content_type: str) -> object:
    media_type = content_type.split(";", 1)[0].strip().lower() or "application/json"
    try:
        if media_type in _JSON_TYPES or media_type.endswith("+json"):
            document: object = json.loads(body)
        elif media_type in _YAML_TYPES:
            documents = list(yaml.load_all(body, Loader=_NoAliasLoader))  # SafeLoader, no aliases
            documents = [item for item in documents if item is not None]
            # Several documents: a multi-document recipe (mergekit-multimerge), as JSON has it.
            document = (
                {MERGES_KEY: documents} if len(documents) > 1 else next(iter(documents), None)
            )
        else:
            raise ApiError(
                415,
                "unsupported_media_type",
                f"send the recipe as application/json or application/yaml, not {media_type}",
            )
    except (ValueError, yaml.YAMLError, RecursionError) as error:
        kind = "JSON" if "json" in media_type else "YAML"
        raise ApiError(
            422,
            "invalid_body",
            f"the body is not valid {kind}: {error}",
            details={"field": "body"},
        ) from None
    check_text_fields(document)
    return document


# Union branch names pydantic puts in error locations: types, not recipe keys.
_BRANCH = re.compile(
    r"^(str|int|float|bool|constrained-\w+|[A-Z]\w*(Ref|Filtered|Entry|Parameters|Slice|Source))$"
)


def _field_path(loc: tuple[int | str, ...]) -> str:
    path = ""
    for part in loc:
        if isinstance(part, int):
            path += f"[{part}]"
        elif "[" in part or _BRANCH.match(part):
            continue
        else:
            path += f".{part}" if path else part
    return path or "recipe"


def parse_service_recipe(document: dict[str, Any], settings: ServiceSettings) -> Recipe:
    """Validate a recipe as the service reads it.

    Relative local references are relative to ``data_dir/inputs``, and a path outside the
    allowed roots counts as not existing, so a request cannot probe the server's disk.

    Raises:
        RecipeError: the first problem, naming its field; ``details['errors']`` lists all.
        CheckpointNotFoundError: a reference is neither an allowed local folder nor a Hub id.
    """
    context = {
        "base_dir": str(settings.inputs_dir),
        "allowed_roots": [str(root) for root in settings.input_roots],
    }
    try:
        return Recipe.model_validate(document, context=context)
    except ValidationError as error:
        raise _recipe_error(error.errors(), skip=0) from None
    except TureenError:
        raise
    except Exception:
        # The engine's validator tripped over a malformed document: locate the problem
        # with the published request schema instead, so that the client still gets a 422.
        log.exception("recipe validation failed unexpectedly; checking the request schema")
        _check_request_schema(document)
        raise RecipeError("recipe", "the recipe is malformed") from None


def _recipe_error(errors: list[ErrorDetails], *, skip: int) -> RecipeError:
    problems = [f"{_field_path(e['loc'][skip:])}: {e['msg']}" for e in errors]
    first = errors[0]
    return RecipeError(_field_path(first["loc"][skip:]), first["msg"], details={"errors": problems})


def _check_request_schema(document: dict[str, Any]) -> None:
    try:
        merge_request_adapter().validate_python(document)
    except ValidationError as error:
        # The first location part is the union branch (the merge method).
        raise _recipe_error(error.errors(), skip=1) from None


def _output_options(value: object) -> OutputOptions:
    if value is None:
        return OutputOptions()
    try:
        return OutputOptions.model_validate(value)
    except ValidationError as error:
        first = error.errors()[0]
        field = ".".join(["output", *(str(part) for part in first["loc"])])
        raise RecipeError(field, first["msg"]) from None


async def read_recipe_request(
    request: Request, settings: SettingsDep
) -> RecipeRequest | MultiRecipeRequest:
    """Read and validate the recipe body (JSON or YAML) and its ``output`` options.

    Several YAML documents, or JSON ``{"merges": [...]}``, are a multi-document recipe
    (see :mod:`service.api.multi_recipe`).
    """
    body = await request.body()
    document = _decode(body, request.headers.get("content-type", ""))
    if not isinstance(document, dict):
        raise RecipeError(
            "recipe", "the body must be a mapping with merge_method, models, parameters..."
        )
    if MERGES_KEY in document and "merge_method" not in document:
        return _multi_request(document, settings)
    if "recipes" in document and "merge_method" not in document:
        raise RecipeError(
            "recipes",
            f"several merges in one request (mergekit-multimerge) go under `{MERGES_KEY}`: "
            f'{{"{MERGES_KEY}": [recipe, ...], "output": {{...}}}}, or send them as several '
            "YAML documents",
        )
    recipe_document = {key: value for key, value in document.items() if key != "output"}
    output = _output_options(document.get("output"))
    canonical = json.dumps(
        {"recipe": recipe_document, "output": output.model_dump(mode="json")},
        sort_keys=True,
        separators=(",", ":"),
        default=str,
    )
    recipe = parse_service_recipe(recipe_document, settings)
    return RecipeRequest(recipe, output, hashlib.sha256(canonical.encode()).hexdigest())


def _multi_request(document: dict[str, Any], settings: ServiceSettings) -> MultiRecipeRequest:
    documents = document[MERGES_KEY]
    unknown = sorted(str(key) for key in document if key not in (MERGES_KEY, "output"))
    if unknown:
        raise RecipeError(
            unknown[0],
            f"a request of several merges holds `{MERGES_KEY}` (the recipes) and `output` only",
        )
    if not isinstance(documents, list) or len(documents) < 2:
        raise RecipeError(
            MERGES_KEY, "give a list of two or more recipes (one merge is a recipe on its own)"
        )
    merges, output, recipes = parse_multi_request(
        documents,
        document.get("output"),
        settings,
        parse=lambda recipe: parse_service_recipe(dict(recipe), settings),
        read_output=_output_options,
    )
    canonical = json.dumps(
        {MERGES_KEY: recipes, "output": output.model_dump(mode="json")},
        sort_keys=True,
        separators=(",", ":"),
        default=str,
    )
    return MultiRecipeRequest(merges, output, hashlib.sha256(canonical.encode()).hexdigest())


RecipeRequestDep = Annotated[RecipeRequest | MultiRecipeRequest, Depends(read_recipe_request)]
