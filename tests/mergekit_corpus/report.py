"""Print how tureen fares on the mergekit config corpus: acceptance and worst differences.

Run from the repository root: ``python -m tests.mergekit_corpus.report [NAME ...]`` (names
are config file stems; all configs when none are given). mergekit 0.1.5 must be installed.
"""

from __future__ import annotations

import logging
import sys
import tempfile
import time
from pathlib import Path

from tests.mergekit_corpus.harness import CorpusResult, config_paths, evaluate


def _line(result: CorpusResult, seconds: float) -> str:
    if result.mergekit_error:
        status = "MERGEKIT-FAILS"
    elif not result.accepted:
        status = "REFUSED"
    elif result.ok:
        status = "OK"
    else:
        status = "DIFFERS"
    worst = ""
    if result.comparison is not None:
        worst = f"{result.comparison.rule}: worst {result.comparison.worst:.3g}"
        worst += f" ({result.comparison.worst_tensor})"
    methods = "+".join(result.methods)
    return f"{status:15} {result.name:48} {methods:30} {seconds:5.1f}s {worst}"


def main(names: list[str]) -> int:
    """Evaluate the named configs (all when empty) and print one line each, then totals."""
    logging.disable(logging.WARNING)
    paths = [p for p in config_paths() if not names or p.stem in names]
    results = []
    with tempfile.TemporaryDirectory() as folder:
        for path in paths:
            started = time.monotonic()
            result = evaluate(path, Path(folder))
            results.append(result)
            print(_line(result, time.monotonic() - started), flush=True)
            if result.summary():
                print("    " + result.summary().replace("\n", "\n    ")[:1500], flush=True)
    accepted = sum(r.accepted and r.mergekit_error is None for r in results)
    matching = sum(r.ok for r in results)
    print(f"\n{len(results)} configs: {accepted} accepted by tureen, {matching} match mergekit")
    return 0 if matching == len(results) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
