"""The ``tureen`` command's argument parser class: defaults in every option's help, and a
"did you mean" suggestion for a misspelled subcommand or choice."""

from __future__ import annotations

import argparse
from collections.abc import Iterator
from typing import Any

from merge_kernels.suggestions import closest


class DefaultsHelpFormatter(argparse.HelpFormatter):
    """Appends ``(default: …)`` to an option's help when it has a meaningful default.

    Unlike :class:`argparse.ArgumentDefaultsHelpFormatter` it says nothing for flags and
    for options whose default is None (their help says what happens when they are left out),
    and nothing when the help already names its default.
    """

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if (
            not action.option_strings
            or default is None
            or default is argparse.SUPPRESS
            or isinstance(default, bool)
            or action.nargs == 0
            or "default" in text
        ):
            return text
        return f"{text} (default: %(default)s)"


class CommandParser(argparse.ArgumentParser):
    """An :class:`argparse.ArgumentParser` that suggests the closest valid choice.

    Subcommand parsers made by :meth:`add_subparsers` are of this class too, and every
    parser uses :class:`DefaultsHelpFormatter` unless told otherwise.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", DefaultsHelpFormatter)
        super().__init__(*args, **kwargs)

    def _check_value(self, action: argparse.Action, value: Any) -> None:
        choices = action.choices
        if choices is None or value in choices or not isinstance(value, str):
            super()._check_value(action, value)
            return
        names = [str(choice) for choice in choices]
        suggestion = closest(value, names)
        hint = f"; did you mean {suggestion!r}?" if suggestion else ""
        raise argparse.ArgumentError(
            action, f"invalid choice: {value!r}{hint} (choose from {', '.join(names)})"
        )


def walk_parsers(parser: argparse.ArgumentParser) -> Iterator[argparse.ArgumentParser]:
    """``parser`` and every subcommand parser under it, depth first."""
    yield parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            seen: set[int] = set()
            for sub in action.choices.values():
                if id(sub) not in seen:  # aliases map several names to one parser
                    seen.add(id(sub))
                    yield from walk_parsers(sub)
