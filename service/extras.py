"""Which optional dependencies (pyproject's extras) each command needs, and a clear error
naming the ``pip install`` line when one is missing."""

from __future__ import annotations

import importlib.util

from merge_kernels.errors import TureenError

#: The import name of each optional package, and the extra that installs it.
EXTRA_OF_MODULE = {
    "transformers": "training",
    "peft": "training",
    "trl": "training",
    "accelerate": "training",
    "tokenizers": "training",
    "datasets": "training",
    "bitsandbytes": "qlora",
    "gguf": "gguf",
    "matplotlib": "bench",
}


class MissingExtraError(TureenError):
    """An optional dependency the command needs is not installed."""

    code = "missing_dependency"


def install_hint(extra: str) -> str:
    """The command that installs ``extra`` into a checkout of tureen."""
    return f"pip install -e '.[{extra}]'"


def missing_extra_error(command: str, module: str) -> MissingExtraError | None:
    """The error for ``command`` failing to import ``module``; None if no extra provides it."""
    extra = EXTRA_OF_MODULE.get(module.partition(".")[0])
    if extra is None:
        return None
    return MissingExtraError(
        f"`{command}` needs the optional '{extra}' dependencies ({module.partition('.')[0]} "
        f"is not installed); install them with: {install_hint(extra)}",
        details={"extra": extra, "module": module},
    )


def require_extra(command: str, extra: str) -> None:
    """Check that every package of ``extra`` is importable, before ``command`` starts work.

    Raises:
        MissingExtraError: one is missing; the message names it and the install command.
    """
    for module, needed_by in EXTRA_OF_MODULE.items():
        if needed_by == extra and importlib.util.find_spec(module) is None:
            error = missing_extra_error(command, module)
            assert error is not None
            raise error
