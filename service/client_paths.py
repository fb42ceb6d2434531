"""Server paths as a client may see them: relative to the folder the client names paths in.

Errors raised deep in the engine name files by their absolute paths on the server
(``/srv/tureen/inputs/llama/model.safetensors``). A client names checkpoints relative to the
service's inputs folder, so that is how its errors name them (``llama/model.safetensors``);
paths elsewhere in the data directory are shown relative to it (``outputs/soup``), and files
in the Hugging Face cache as ``<hub cache>/…``. Folders given with ``--allow-root`` are
shown as they are: the client names them by their absolute paths anyway.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from merge_kernels.errors import DetailValue, TureenError

HUB_CACHE_LABEL = "<hub cache>"


def _hub_cache() -> Path | None:
    try:
        from huggingface_hub import constants
    except ImportError:
        return None
    return Path(constants.HF_HUB_CACHE)


@dataclass(frozen=True)
class ClientPaths:
    """Rewrites server paths in text for clients.

    Attributes:
        replacements: (server prefix, client form) pairs, longest prefix first.
    """

    replacements: tuple[tuple[str, str], ...]

    @classmethod
    def for_data_dir(cls, data_dir: Path) -> ClientPaths:
        """The rewriting for a service whose data directory is ``data_dir``."""
        pairs: dict[str, str] = {}
        labelled: list[tuple[Path, str]] = [(data_dir / "inputs", ""), (data_dir, "")]
        hub_cache = _hub_cache()
        if hub_cache is not None:
            labelled.append((hub_cache, HUB_CACHE_LABEL + "/"))
        for folder, label in labelled:
            for form in {str(folder), os.path.realpath(folder)}:
                pairs[form.rstrip("/") + "/"] = label
        ordered = sorted(pairs.items(), key=lambda pair: len(pair[0]), reverse=True)
        return cls(tuple(ordered))

    def text(self, text: str) -> str:
        """``text`` with every server prefix replaced by its client form."""
        for prefix, label in self.replacements:
            if prefix in text:
                text = text.replace(prefix, label)
            bare = prefix.rstrip("/")
            if bare and bare in text:
                # The folder itself, named without a trailing slash (e.g. the inputs folder),
                # not a longer name that starts the same way.
                shown = label.rstrip("/") or "."
                text = re.sub(re.escape(bare) + r"(?![\w.\-])", shown.replace("\\", r"\\"), text)
        return text

    def value(self, value: Any) -> Any:
        """A detail value (string, list or mapping of them) with its paths rewritten."""
        if isinstance(value, str):
            return self.text(value)
        if isinstance(value, list):
            return [self.value(item) for item in value]
        if isinstance(value, Mapping):
            return {key: self.value(item) for key, item in value.items()}
        return value

    def error(self, error: TureenError) -> tuple[str, dict[str, DetailValue]]:
        """The message and details of ``error`` as a client sees them."""
        details = {key: self.value(item) for key, item in error.details.items()}
        return self.text(error.message), details
