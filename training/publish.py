"""Writing a trained adapter folder atomically, with its training report."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from merge_kernels.io.staging import MANIFEST_NAME, StagingDir, write_json_atomic

REPORT_NAME = "training_report.json"


def publish_adapter(
    model: Any, out_dir: Path, report: dict[str, Any], *, overwrite: bool
) -> list[str]:
    """Save a PEFT model's adapter plus ``training_report.json``; ``out_dir`` appears complete.

    Args:
        model: the ``PeftModel`` whose adapter is saved (``adapter_config.json``,
            ``adapter_model.safetensors``).
        out_dir: the adapter folder.
        report: the training report (JSON-serializable).
        overwrite: replace an existing ``out_dir``.

    Returns:
        The names of the files written, sorted.
    """
    fingerprint = hashlib.sha256(
        json.dumps(report, sort_keys=True, default=str).encode()
    ).hexdigest()
    staging = StagingDir(out_dir, fingerprint)
    staging.discard()
    staging.prepare()
    try:
        model.save_pretrained(str(staging.path), safe_serialization=True)
        write_json_atomic(staging.path / REPORT_NAME, report)
        files = sorted(
            p.name for p in staging.path.iterdir() if p.is_file() and p.name != MANIFEST_NAME
        )
        staging.commit(overwrite=overwrite)
    except BaseException:
        staging.discard()
        raise
    return files
