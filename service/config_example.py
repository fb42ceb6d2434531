"""``tureen config example``: a config file listing every service setting with its default.

The file is generated from :class:`service.settings.ServiceSettings` itself (each setting's
description comes from the class's ``Attributes`` documentation), so it cannot fall behind
the settings; ``tureen.example.toml`` at the repository root is its output.
"""

from __future__ import annotations

import argparse
import inspect
import json
import re
import sys
import textwrap
from pathlib import Path
from typing import Any

from pydantic import SecretStr

_ENTRY = re.compile(r"^    (\w+): (.*)$")

HEADER = """\
# tureen service settings, each with its default value.
# Use it with `tureen serve --config FILE` (or TUREEN_CONFIG=FILE). Every setting can also be
# given as an environment variable, TUREEN_ plus its name in capitals (TUREEN_DATA_DIR), which
# wins over this file; `tureen serve`'s options win over both. Lists from the environment are
# comma separated. Settings shown commented out have no value by default.
# Regenerate: tureen config example > tureen.example.toml
"""


def setting_descriptions(cls: type[Any]) -> dict[str, str]:
    """Each setting's description from the ``Attributes:`` section of ``cls``'s docstring."""
    doc = inspect.cleandoc(cls.__doc__ or "")
    _, _, section = doc.partition("Attributes:\n")
    descriptions: dict[str, str] = {}
    name: str | None = None
    for line in section.splitlines():
        entry = _ENTRY.match(line)
        if entry:
            name = entry.group(1)
            descriptions[name] = entry.group(2).strip()
        elif line.startswith("        ") and name is not None:
            descriptions[name] += " " + line.strip()
        elif line.strip():
            break  # the section is over
    return descriptions


def _toml_value(value: object) -> str:
    if isinstance(value, SecretStr):
        value = value.get_secret_value()
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, Path):
        value = str(value)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml_value(item) for item in value) + "]"
    return json.dumps(str(value))  # a TOML basic string is a JSON string


def example_config() -> str:
    """The example config file (TOML): every setting, its description and its default."""
    from service.settings import ServiceSettings

    descriptions = setting_descriptions(ServiceSettings)
    parts = [HEADER]
    for name, info in ServiceSettings.model_fields.items():
        text = (info.description or descriptions.get(name, "")).replace("``", "`")
        comment = textwrap.fill(text, width=98, initial_indent="# ", subsequent_indent="# ")
        default = info.get_default(call_default_factory=True)
        line = f"{name} = {_toml_value(default)}" if default is not None else f"# {name} ="
        parts.append(f"{comment}\n{line}\n")
    return "\n".join(parts)


def cmd_config(args: argparse.Namespace) -> int:
    """Print the example config file."""
    sys.stdout.write(example_config())
    return 0


def add_config_command(commands: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add ``tureen config example`` to the ``tureen`` command's subparsers."""
    config = commands.add_parser(
        "config",
        help="print an example service config file",
        description="Print a TOML config file for `tureen serve --config` listing every "
        "setting with its default and what it does.",
    )
    config.add_argument("action", choices=["example"], help="what to print")
    config.set_defaults(handler=cmd_config)
