"""``tureen serve``: run the HTTP API with uvicorn.

:mod:`service.cli` calls :func:`add_serve_command` to add the subcommand. API
tokens are read from ``TUREEN_API_TOKENS`` or the config file only, never from the command
line (where other users could see them in the process list).
"""

from __future__ import annotations

import argparse
import ipaddress
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from service.settings import ServiceSettings

log = logging.getLogger(__name__)

GRACEFUL_SHUTDOWN_S = 5  # open event streams are closed after this long on shutdown


def add_serve_command(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``serve`` to ``subparsers`` (the result of ``add_subparsers``)."""
    serve: argparse.ArgumentParser = subparsers.add_parser(
        "serve",
        help="run the merge service (HTTP API)",
        description="Run the merge service. Settings come from --config, then TUREEN_* "
        "environment variables, then these options; API tokens only from "
        "TUREEN_API_TOKENS or the config file.",
    )
    serve.add_argument("--host", help="address to bind (default 127.0.0.1)")
    serve.add_argument("--port", type=int, help="port to listen on (default 8000)")
    serve.add_argument(
        "--data-dir", type=Path, help="job database and outputs folder (default tureen-data)"
    )
    serve.add_argument(
        "--allow-root",
        type=Path,
        action="append",
        metavar="PATH",
        help="folder local checkpoints may be read from (repeatable; default: only "
        "DATA_DIR/inputs)",
    )
    serve.add_argument(
        "--workers", type=int, help="merges run at once, in worker processes (default 1)"
    )
    serve.add_argument(
        "--config",
        type=Path,
        help="TOML, YAML or JSON settings file (default: TUREEN_CONFIG, else none; "
        "`tureen config example` prints one)",
    )
    serve.set_defaults(handler=cmd_serve)
    return serve


def settings_from_args(args: argparse.Namespace) -> ServiceSettings:
    """The settings for ``args``: the config file and environment, then the options.

    Raises:
        ConfigFileError: the config file is unreadable, or a setting is invalid.
    """
    # Imported here: every other command builds this parser, and none of them needs the
    # settings machinery (about 0.2 s of imports).
    from pydantic import ValidationError

    from service.settings import ConfigFileError, load_settings

    overrides = {
        "host": args.host,
        "port": args.port,
        "data_dir": args.data_dir,
        "allow_roots": args.allow_root,
        "workers": args.workers,
    }
    try:
        return load_settings(
            args.config, **{key: value for key, value in overrides.items() if value is not None}
        )
    except ValidationError as error:
        problems = "; ".join(
            f"{'.'.join(str(part) for part in e['loc'])}: {e['msg']}" for e in error.errors()
        )
        raise ConfigFileError(f"invalid settings: {problems}") from None


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def serve(settings: ServiceSettings) -> None:
    """Run the API until interrupted."""
    import uvicorn

    from service.access_log import uvicorn_log_config
    from service.app import create_app

    if not settings.api_tokens and not _is_loopback(settings.host):
        log.warning(
            "serving on %s without API tokens: anyone who can reach it can run merges; "
            "set TUREEN_API_TOKENS",
            settings.host,
        )
    uvicorn.run(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        log_config=uvicorn_log_config(),  # no query-string credentials in the access log
        server_header=False,
        timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S,
    )


def cmd_serve(args: argparse.Namespace) -> int:
    """Handler of ``tureen serve``."""
    from service.jobs.data_dir_lock import data_dir_locked
    from service.listen_check import check_can_listen

    settings = settings_from_args(args)
    check_can_listen(settings.host, settings.port)
    logging.basicConfig(
        level=settings.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
    )
    # Taken before anything touches the data dir; refused (DataDirLockedError) when another
    # server holds it, which the command reports and exits non-zero.
    with data_dir_locked(settings.data_dir):
        serve(settings)
    return 0
