"""The ``tureen`` parser: --version, help with defaults, "did you mean", shell completion."""

from __future__ import annotations

import argparse
import shutil
import subprocess
from pathlib import Path

import pytest

from merge_kernels import __version__
from service.cli import build_parser, main
from service.command_parser import walk_parsers
from service.completion import bash_script, zsh_script
from service.settings import ServiceSettings


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.strip() == f"tureen {__version__}"


@pytest.mark.parametrize(
    ("argv", "suggestion"),
    [
        (["mrege"], "did you mean 'merge'?"),
        (["exmaple", "x"], "did you mean 'example'?"),
        (["train", "lroa", "x"], "did you mean 'lora'?"),
        (["completion", "bsh"], "did you mean 'bash'?"),
    ],
)
def test_a_misspelled_choice_gets_a_suggestion(
    argv: list[str], suggestion: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    assert suggestion in capsys.readouterr().err


def test_no_suggestion_for_a_word_like_no_command(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["zzzzqqq"])
    err = capsys.readouterr().err
    assert "invalid choice: 'zzzzqqq'" in err and "did you mean" not in err


def _options() -> list[tuple[argparse.ArgumentParser, argparse.Action]]:
    return [
        (parser, action)
        for parser in walk_parsers(build_parser())
        for action in parser._actions
        if not isinstance(action, argparse._SubParsersAction)
    ]


def test_every_argument_has_help() -> None:
    missing = [
        f"{parser.prog} {action.option_strings or action.dest}"
        for parser, action in _options()
        if not action.help
    ]
    assert missing == []


def test_every_option_with_a_default_shows_it() -> None:
    hidden = []
    for parser, action in _options():
        if not action.option_strings or action.nargs == 0 or action.default is None:
            continue
        formatter = parser._get_formatter()
        text = formatter._expand_help(action)  # the help as --help prints it
        if "default" not in text:
            hidden.append(f"{parser.prog} {action.option_strings[0]}: {text}")
    assert hidden == []


def test_serve_help_states_the_settings_defaults() -> None:
    serve = next(p for p in walk_parsers(build_parser()) if p.prog == "tureen serve")
    helps = {action.dest: action.help or "" for action in serve._actions}
    defaults = ServiceSettings.model_fields
    for name in ("host", "port", "workers", "data_dir"):
        assert f"(default {defaults[name].default})" in helps[name], name


def test_every_subcommand_has_help_in_the_listing() -> None:
    parser = build_parser()
    listing = parser.format_help()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for choice in commands._choices_actions:
        assert choice.help, choice.dest
        assert choice.dest in listing


bash_only = pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")


def _complete(script: str, words: list[str]) -> list[str]:
    """What the script offers for ``words`` (the last one being completed), in a real bash."""
    quoted = " ".join("'" + word.replace("'", "'\\''") + "'" for word in words)
    program = (
        f"{script}\nCOMP_WORDS=({quoted}); COMP_CWORD={len(words) - 1}\n"
        "_tureen_complete; printf '%s\\n' \"${COMPREPLY[@]}\"\n"
    )
    done = subprocess.run(
        ["bash", "--norc", "--noprofile", "-c", program],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    return [line for line in done.stdout.splitlines() if line]


@bash_only
def test_the_bash_script_is_valid_bash(tmp_path: Path) -> None:
    path = tmp_path / "tureen.bash"
    path.write_text(bash_script(build_parser()))
    subprocess.run(["bash", "-n", str(path)], check=True, timeout=30)


@bash_only
def test_bash_completes_subcommands_options_and_choices() -> None:
    script = bash_script(build_parser())
    assert _complete(script, ["tureen", "me"]) == ["merge", "methods"]
    assert _complete(script, ["tureen", "train", "l"]) == ["lora"]
    assert "--overwrite" in _complete(script, ["tureen", "merge", "--o"])
    assert _complete(script, ["tureen", "merge", "r.yaml", "--out-dtype", "bf"]) == ["bfloat16"]
    # An option's value is not taken for a subcommand; a positional gets file names.
    assert _complete(script, ["tureen", "completion", ""]) == []  # choices of a positional: none
    assert _complete(script, ["tureen", "merge", "--device", "cpu", "--q"]) == ["--quiet"]
    assert _complete(script, ["tureen", "--version"]) == ["--version"]


@bash_only
def test_the_printed_script_loads_in_bash(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["completion", "bash"]) == 0
    script = capsys.readouterr().out
    assert "complete -o default -F _tureen_complete tureen" in script
    assert _complete(script, ["tureen", "pu"]) == ["push"]


def test_the_zsh_script_goes_through_bashcompinit() -> None:
    script = zsh_script(build_parser())
    assert "bashcompinit" in script and "complete -o default -F _tureen_complete" in script
