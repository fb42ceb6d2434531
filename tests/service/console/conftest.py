"""The web console in a real browser: Chromium (Debian's package) driven by Playwright.

The browser is ``TUREEN_BROWSER`` or ``chromium`` on PATH; Playwright's own browser downloads
are never used. Without one the tests are skipped on a workstation and fail under ``CI=true``,
where the README's test command installs it.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from merge_kernels.synthetic import write_checkpoint
from tests.service.api.conftest import (  # _hub_offline: the Hub answers from an empty cache
    LARGER,
    TINY,
    TOKEN,
    LiveServer,
    _hub_offline,  # noqa: F401
    make_settings,
)

playwright_sync = pytest.importorskip("playwright.sync_api")


def browser_executable() -> str | None:
    """The Chromium the tests drive: ``TUREEN_BROWSER``, else ``chromium`` on PATH."""
    given = os.environ.get("TUREEN_BROWSER")
    if given:
        return given
    for name in ("chromium", "chromium-browser"):
        found = shutil.which(name)
        if found:
            return found
    return None


@pytest.fixture(scope="module")
def browser() -> Iterator[playwright_sync.Browser]:
    """One headless Chromium per test module. Not per session: Playwright's sync API keeps an
    asyncio loop running in the main thread while it is open, and later tests that call
    ``asyncio.run`` would fail."""
    executable = browser_executable()
    if executable is None:
        message = "no Chromium: install Debian's chromium package or set TUREEN_BROWSER"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    with playwright_sync.sync_playwright() as playwright:
        # --no-sandbox: CI containers run as root, where Chromium's sandbox cannot start.
        launched = playwright.chromium.launch(executable_path=executable, args=["--no-sandbox"])
        yield launched
        launched.close()


@pytest.fixture(scope="module")
def models_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An allowed root: tiny base, two fine-tunes, one of another vocabulary, a larger trio."""
    root = tmp_path_factory.mktemp("console-models")
    write_checkpoint(root / "base", TINY, seed=0)
    for index in (1, 2):
        write_checkpoint(root / f"ft{index}", TINY, seed=index, base_seed=0, delta_scale=0.05)
    write_checkpoint(root / "odd", replace(TINY, vocab_size=80), seed=9)
    write_checkpoint(root / "larger" / "base", LARGER, seed=0)
    for index in (1, 2):
        write_checkpoint(root / "larger" / f"ft{index}", LARGER, seed=index, base_seed=0)
    return root


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, models_root: Path) -> Iterator[LiveServer]:
    """A real server on loopback, auth on, one worker."""
    data_dir = tmp_path_factory.mktemp("console-data")
    live = LiveServer(make_settings(data_dir, [models_root], max_body_bytes=1024 * 1024)).start()
    yield live
    live.stop()


@pytest.fixture
def page(browser: playwright_sync.Browser, server: LiveServer) -> Iterator[playwright_sync.Page]:
    """A fresh tab that already holds the token (as the sign-in form leaves it)."""
    context = browser.new_context(base_url=server.url, accept_downloads=True)
    context.add_init_script(f"sessionStorage.setItem('tureen-token', {TOKEN!r});")
    tab = context.new_page()
    tab.set_default_timeout(15_000)
    yield tab
    context.close()


@pytest.fixture
def anonymous_page(
    browser: playwright_sync.Browser, server: LiveServer
) -> Iterator[playwright_sync.Page]:
    """A fresh tab without a token."""
    context = browser.new_context(base_url=server.url)
    tab = context.new_page()
    tab.set_default_timeout(15_000)
    yield tab
    context.close()
