"""The rendered email in a real browser: it fits a phone and is 600 px on a desktop."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from qant_mail.authoring.load import load
from qant_mail.authoring.render import RenderedIssue, Renderer, Slot
from tests.browser import needs_chromium
from tests.test_corpus import IDS, ISSUES

if TYPE_CHECKING:
    from playwright.sync_api import Browser

pytestmark = [pytest.mark.browser, needs_chromium]

# Elements wider than the viewport, or reaching past its right edge.
OVERFLOW = """() => {
  const width = document.documentElement.clientWidth;
  const wide = [];
  for (const el of document.body.querySelectorAll('*')) {
    const box = el.getBoundingClientRect();
    if (box.width > 0 && box.right > width + 0.5) wide.push(el.tagName + '.' + el.className);
  }
  return {width, scroll: document.documentElement.scrollWidth, wide: wide.slice(0, 5)};
}"""


def write_page(rendered: RenderedIssue, folder: Path) -> Path:
    values = {
        Slot.NAME: "Camille Lecteur",
        Slot.EMAIL: "camille.lecteur-avec-une-adresse-longue@example.com",
        Slot.UNSUBSCRIBE_URL: "https://lettre.qant.example/unsubscribe/AQ.abcdefghijklmnopqrstuv",
        Slot.PREFERENCES_URL: "https://lettre.qant.example/subscriptions/AQ.abcdefghijklmnopqrstuv",
        Slot.BROWSER_URL: rendered.web_url,
    }
    html, _ = rendered.fill(values, asset_url=lambda asset: asset.path.as_uri())
    page = folder / "email.html"
    page.write_text(html, encoding="utf-8")
    return page


@pytest.fixture(scope="module")
def email_page(sample_rendered: RenderedIssue, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_page(sample_rendered, tmp_path_factory.mktemp("email"))


@pytest.mark.parametrize("path", ISSUES, ids=IDS)
@pytest.mark.parametrize("width", [375, 600])
def test_nothing_overflows_the_width(
    browser: Browser, renderer: Renderer, tmp_path: Path, path: Path, width: int
) -> None:
    document = load(path)
    email_page = write_page(renderer.render(document.issue, key=document.key), tmp_path)
    page = browser.new_page(viewport={"width": width, "height": 800})
    page.goto(email_page.as_uri())
    found = page.evaluate(OVERFLOW)
    page.close()
    assert found["scroll"] <= width
    assert found["wide"] == []


def test_single_column_on_a_phone_and_600_px_on_a_desktop(
    browser: Browser, email_page: Path
) -> None:
    widths = {}
    for viewport in (375, 1024):
        page = browser.new_page(viewport={"width": viewport, "height": 800})
        page.goto(email_page.as_uri())
        widths[viewport] = page.evaluate(
            """() => [...document.querySelectorAll('.paper')].map(
                 el => Math.round(el.getBoundingClientRect().width))"""
        )
        columns = page.evaluate(
            """() => [...document.querySelectorAll('[class*=mj-column-per]')].map(
                 el => Math.round(el.getBoundingClientRect().width))"""
        )
        images = page.evaluate(
            """() => [...document.images].map(
                 img => [img.naturalWidth > 0, img.getBoundingClientRect().width])"""
        )
        page.close()
        assert all(loaded for loaded, _ in images)
        if viewport == 375:
            assert set(columns) == {375}
            assert all(width <= 375 - 2 * 24 for _, width in images)
    assert set(widths[1024]) == {600}
    assert set(widths[375]) == {375}


def test_dark_mode_changes_the_paper_colour(browser: Browser, email_page: Path) -> None:
    colours = {}
    for scheme in ("light", "dark"):
        page = browser.new_page(viewport={"width": 600, "height": 800}, color_scheme=scheme)
        page.goto(email_page.as_uri())
        colours[scheme] = page.evaluate(
            """() => [getComputedStyle(document.querySelector('.paper')).backgroundColor,
                      getComputedStyle(document.querySelector('.prose p')).color]"""
        )
        page.close()
    assert colours["light"] == ["rgb(255, 255, 255)", "rgb(31, 35, 40)"]
    assert colours["dark"] == ["rgb(28, 31, 34)", "rgb(232, 230, 227)"]


def test_dark_mode_swaps_the_logo_and_keeps_muted_texts_muted(
    browser: Browser, email_page: Path
) -> None:
    found = {}
    for scheme in ("light", "dark"):
        page = browser.new_page(viewport={"width": 600, "height": 800}, color_scheme=scheme)
        page.goto(email_page.as_uri())
        found[scheme] = page.evaluate(
            """() => {
                const shown = el => el && el.getBoundingClientRect().height > 0
                    && getComputedStyle(el).display !== 'none';
                const colour = sel => getComputedStyle(document.querySelector(sel)).color;
                return {
                    light_logo: shown(document.querySelector('.logo-light img')),
                    dark_logo: shown(document.querySelector('.logo-dark img')),
                    caption: colour('p.caption'), meta: colour('p.meta'),
                    masthead: colour('p.masthead'), text: colour('.prose p'),
                    tagline: colour('p.tagline'), footer: colour('p.footer'),
                    quote_author: colour('p.quote-author'),
                };
            }"""
        )
        page.close()
    assert (found["light"]["light_logo"], found["light"]["dark_logo"]) == (True, False)
    assert (found["dark"]["light_logo"], found["dark"]["dark_logo"]) == (False, True)
    muted = "rgb(169, 177, 186)"  # colours.dark_muted
    for name in ("caption", "meta", "masthead", "tagline", "footer", "quote_author"):
        assert found["dark"][name] == muted, name
    assert found["dark"]["text"] == "rgb(232, 230, 227)"
