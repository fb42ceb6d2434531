"""The service's settings: defaults, then a config file, then ``TUREEN_*`` variables, then code.

Every setting can be given in an optional TOML, YAML or JSON config file (keys are the field
names, e.g. ``data_dir = "/srv/tureen"``), overridden by an environment variable named
``TUREEN_`` plus the field name in capitals (``TUREEN_DATA_DIR``), overridden in turn by
keyword arguments to :func:`load_settings`. List settings read from the environment are
comma-separated (``TUREEN_API_TOKENS="a,b"``, ``TUREEN_ALLOW_ROOTS="/models,/scratch"``) or a
JSON array. API tokens are kept out of ``repr()`` and validation errors, so logging the
settings never reveals them.
"""

from __future__ import annotations

import json
import os
import tomllib
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import Field, SecretStr, field_validator
from pydantic.fields import FieldInfo
from pydantic_settings import (
    BaseSettings,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

from merge_kernels.errors import TureenError
from merge_kernels.io.safetensors_header import MAX_HEADER_BYTES, HeaderLimits

#: Environment variable naming a config file when ``load_settings`` is given none.
CONFIG_ENV = "TUREEN_CONFIG"

# The config file of the ``load_settings`` call in progress; a context variable rather than a
# class attribute so concurrent loads (tests, threads) cannot see each other's files.
_CONFIG_VALUES: ContextVar[dict[str, Any] | None] = ContextVar("_CONFIG_VALUES", default=None)


class ConfigFileError(TureenError):
    """The config file is missing, unreadable or not a mapping of settings."""

    code = "invalid_config"


def _split_list(value: object) -> object:
    """A comma-separated string (or JSON array string) as a list; other values unchanged."""
    if not isinstance(value, str):
        return value
    text = value.strip()
    if text.startswith("["):
        try:
            return json.loads(text)
        except json.JSONDecodeError:
            pass  # not JSON after all: fall through to commas, and let validation speak
    return [part.strip() for part in text.split(",") if part.strip()]


class _ConfigFileSource(PydanticBaseSettingsSource):
    """Settings from the config file :func:`load_settings` read, if any."""

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        values = _CONFIG_VALUES.get() or {}
        return values.get(field_name), field_name, False

    def __call__(self) -> dict[str, Any]:
        return dict(_CONFIG_VALUES.get() or {})


class ServiceSettings(BaseSettings):
    """Everything the tureen service needs to know to run.

    Attributes:
        host: address the HTTP server binds to.
        port: port the HTTP server listens on.
        data_dir: folder holding the job database, the outputs and ``inputs/``; made
            absolute when loaded, so worker processes see the same folder.
        allow_roots: folders local checkpoints may be read from (resolved); besides these,
            only ``data_dir/inputs`` is readable. Empty: only ``data_dir/inputs``.
        workers: how many merge jobs run at once, each in its own worker process.
        api_tokens: bearer tokens the API accepts; never shown by ``repr()``.
        max_body_bytes: largest request body the API accepts.
        memory_budget_bytes: refuse a job whose plan estimates more peak memory (None: no
            limit).
        device: where merge kernels run, ``cpu`` or ``cuda``.
        log_level: how much the service and its worker processes log.
        public_url: the address at which evaluators reach this service (e.g.
            ``http://10.0.0.5:8000``); given, HTTP evaluators receive a download URL for each
            greedy-soup candidate besides its local path.
        standby_worker: keep one worker process started ahead of time (engine imported,
            about 250 MB) and reuse workers after small jobs, so that a small job starts in
            milliseconds rather than seconds. Off: one fresh process per job.
        evaluator_hosts: hosts a recipe's HTTP evaluator may be on (loopback by default;
            ``*`` allows any), so that a request cannot make the service call anywhere.
        hf_token: the Hugging Face Hub token that publishes outputs when a request gives
            none (default: ``HF_TOKEN`` or the ``hf auth login`` token of the server's user);
            never shown by ``repr()``, never passed to worker processes. The Hub's address
            is ``huggingface_hub``'s own ``HF_ENDPOINT``, for inputs and publishing alike.
        max_header_bytes: largest safetensors header the service reads, per file; a larger
            one is refused before it is parsed (real checkpoints need a few MB at most).
        max_header_tensors: most tensors one safetensors file may list.
        docs: serve a documentation page at ``/docs`` (self-contained: nothing loaded from
            other hosts). The page asks for a token to read ``/openapi.json``, which needs
            one whenever ``api_tokens`` is set, docs on or off.
        executor: where a merge job's output shards are merged: ``local`` (in the job's
            worker process) or ``ray`` (one task per shard on a Ray cluster that shares the
            input and output folders; needs ``pip install 'tureen[ray]'``).
        ray_address: with ``executor = "ray"``, the cluster to connect to (e.g.
            ``10.0.0.5:6379``); None: ``RAY_ADDRESS``, else a cluster started on this
            machine, else a new local one.
    """

    model_config = SettingsConfigDict(
        env_prefix="TUREEN_",
        extra="forbid",
        hide_input_in_errors=True,
        validate_default=True,
    )

    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    data_dir: Path = Path("tureen-data")
    allow_roots: Annotated[list[Path], NoDecode] = Field(default_factory=list)
    workers: int = Field(1, ge=1)
    api_tokens: Annotated[list[str], NoDecode] = Field(default_factory=list, repr=False)
    max_body_bytes: int = Field(1_048_576, ge=1)
    memory_budget_bytes: int | None = Field(None, ge=1)
    device: str = "cpu"
    standby_worker: bool = True
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    public_url: str | None = Field(None, pattern=r"^https?://[^\s/]+(/[^\s]*)?$")
    evaluator_hosts: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: ["127.0.0.1", "localhost", "::1"]
    )
    hf_token: SecretStr | None = Field(None, repr=False)  # publishing to the Hub
    max_header_bytes: int = Field(16 * 1024 * 1024, ge=1, le=MAX_HEADER_BYTES)
    max_header_tensors: int = Field(200_000, ge=1)
    docs: bool = False
    executor: Literal["local", "ray"] = "local"
    ray_address: str | None = None

    @field_validator("allow_roots", "api_tokens", "evaluator_hosts", mode="before")
    @classmethod
    def _comma_separated(cls, value: object) -> object:
        return _split_list(value)

    @field_validator("api_tokens")
    @classmethod
    def _no_blank_tokens(cls, value: list[str]) -> list[str]:
        return [token for token in value if token.strip()]

    @field_validator("data_dir")
    @classmethod
    def _absolute_data_dir(cls, value: Path) -> Path:
        # Absolute so that worker processes, whatever their working folder, agree with us.
        return value.expanduser().resolve(strict=False)

    @field_validator("allow_roots")
    @classmethod
    def _resolved_roots(cls, value: list[Path]) -> list[Path]:
        return [root.expanduser().resolve(strict=False) for root in value]

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        """Keyword arguments win over the environment, which wins over the config file."""
        return (init_settings, env_settings, _ConfigFileSource(settings_cls))

    @property
    def database_path(self) -> Path:
        """The SQLite job database, ``data_dir / "tureen.sqlite3"``."""
        return self.data_dir / "tureen.sqlite3"

    @property
    def outputs_dir(self) -> Path:
        """Where merge outputs are written, ``data_dir / "outputs"``."""
        return self.data_dir / "outputs"

    @property
    def inputs_dir(self) -> Path:
        """``data_dir / "inputs"``: always readable, and where relative references point."""
        return self.data_dir / "inputs"

    @property
    def input_roots(self) -> tuple[Path, ...]:
        """Every folder local checkpoints may be read from: ``allow_roots`` and ``inputs_dir``."""
        return (*self.allow_roots, self.inputs_dir)

    def header_limits(self) -> HeaderLimits:
        """The limits on safetensors headers, naming the settings that raise them."""
        return HeaderLimits(
            max_bytes=self.max_header_bytes,
            max_tensors=self.max_header_tensors,
            bytes_setting="the max_header_bytes setting (TUREEN_MAX_HEADER_BYTES)",
            tensors_setting="the max_header_tensors setting (TUREEN_MAX_HEADER_TENSORS)",
        )

    def redacted(self) -> dict[str, Any]:
        """The settings as JSON-able data with the tokens masked, for logs and diagnostics."""
        data = self.model_dump(mode="json")
        data["api_tokens"] = ["***"] * len(self.api_tokens)
        return data


def _read_config_file(path: Path) -> dict[str, Any]:
    """Parse a TOML (``.toml``), YAML (``.yaml``/``.yml``) or JSON (other) config file."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as error:
        raise ConfigFileError(
            f"cannot read config file {path}: {error.strerror or error}",
            details={"path": str(path)},
        ) from None
    suffix = path.suffix.lower()
    try:
        if suffix == ".toml":
            data: object = tomllib.loads(text)
        elif suffix in (".yaml", ".yml"):
            data = yaml.safe_load(text)
        else:
            data = json.loads(text)
    except (tomllib.TOMLDecodeError, yaml.YAMLError, json.JSONDecodeError) as error:
        raise ConfigFileError(
            f"config file {path} is not valid {suffix.lstrip('.') or 'JSON'}: {error}",
            details={"path": str(path)},
        ) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigFileError(
            f"config file {path} must hold a mapping of setting names to values",
            details={"path": str(path)},
        )
    return {str(key): value for key, value in data.items()}


@contextmanager
def _config_values(values: dict[str, Any]) -> Iterator[None]:
    token = _CONFIG_VALUES.set(values)
    try:
        yield
    finally:
        _CONFIG_VALUES.reset(token)


def load_settings(config_file: Path | None = None, **overrides: Any) -> ServiceSettings:
    """Load the settings from a config file, the environment and ``overrides``.

    Args:
        config_file: a TOML, YAML or JSON file of settings; when None, the file named by
            ``TUREEN_CONFIG`` if that is set, else none.
        **overrides: settings that win over every other source.

    Returns:
        The validated settings.

    Raises:
        ConfigFileError: the config file cannot be read or parsed.
        pydantic.ValidationError: a setting has an invalid value or an unknown name.
    """
    if config_file is None and os.environ.get(CONFIG_ENV):
        config_file = Path(os.environ[CONFIG_ENV])
    values = _read_config_file(Path(config_file)) if config_file is not None else {}
    with _config_values(values):
        return ServiceSettings(**overrides)
