"""The web console's static assets: a page, a few script modules and one style sheet.

Written by hand and served as they are by :mod:`service.api.routes.console` (no build step,
nothing loaded from other hosts), so the console works offline, from the installed package.
"""

from __future__ import annotations

from pathlib import Path

#: The folder holding the assets.
STATIC_DIR = Path(__file__).parent / "static"

#: The assets the console may serve, by file name; nothing else under any path is served.
STATIC_FILES = frozenset(
    {
        "index.html",
        "console.css",
        "console.js",  # the entry point: router and token prompt
        "api.js",
        "render.js",
        "plots.js",
        "editor.js",
        "jobs.js",
        "job.js",
        "evaluation.js",
        "compare.js",
        "service.js",  # readiness and metrics
    }
)
