"""Debian's headless Chromium, driven by Playwright, for tests of pages."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from playwright.sync_api import Browser, Page

CHROMIUM = Path(os.environ.get("QANT_TEST_CHROMIUM", "/usr/bin/chromium"))
# Without the background-networking flags Chromium keeps dialling Google's hosts, which
# this sandbox refuses; --no-sandbox because CI runs as root.
FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]

needs_chromium = pytest.mark.skipif(
    not CHROMIUM.exists(),
    reason=f"no Chromium at {CHROMIUM}: `apt-get install chromium` to run the browser tests",
)


@pytest.fixture(scope="session")
def browser() -> Iterator[Browser]:
    """A headless Chromium shared by the session's browser tests."""
    if not CHROMIUM.exists():
        pytest.skip(f"no Chromium at {CHROMIUM}: `apt-get install chromium`")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        instance = playwright.chromium.launch(executable_path=str(CHROMIUM), args=FLAGS)
        yield instance
        instance.close()


def force_dark(page: Page) -> None:
    """Darken `page` as Chromium's forced dark mode does, before it loads anything."""
    # Auto Dark Mode (Chrome's flag, Android's WebView) darkens a page that did not ask
    # for it, as the Gmail apps and Outlook.com darken an email: the page still matches
    # `prefers-color-scheme: light`, so its own dark style does not apply. This DevTools
    # override draws the same pixels as launching with
    # `--blink-settings=forceDarkModeEnabled=true` (compared on the sample), in the
    # session's browser; `--force-dark-mode` would only switch the page to its own style.
    session = page.context.new_cdp_session(page)
    session.send("Emulation.setAutoDarkModeOverride", {"enabled": True})
