"""The rendered email in a real browser: it fits a phone and is 600 px on a desktop."""

from __future__ import annotations

import io
import re
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import pytest
from PIL import Image, ImageChops
from PIL.ImageFilter import MaxFilter, MinFilter

from qant_mail.authoring.load import Document, load
from qant_mail.authoring.render import RenderedIssue, Renderer, Slot
from qant_mail.base.config import Settings
from tests.browser import force_dark, needs_chromium
from tests.test_corpus import IDS, ISSUES

if TYPE_CHECKING:
    from playwright.sync_api import Browser, Page

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
            # Those shown: a phone hides the top bar's.
            """() => [...document.querySelectorAll('[class*=mj-column-per]')]
                 .filter(el => el.getClientRects().length)
                 .map(el => Math.round(el.getBoundingClientRect().width))"""
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


# The logo shown (light or dark), and where it is.
SHOWN_LOGO = """() => {
  for (const img of document.querySelectorAll('.logo img')) {
    const box = img.getBoundingClientRect();
    if (box.width > 0 && box.height > 0)
      return {x: box.x, y: box.y, width: box.width, height: box.height};
  }
  return null;
}"""


def luminance(rgb: tuple[int, ...]) -> float:
    """Return the relative luminance of an sRGB colour, as WCAG 2 defines it."""

    def linear(channel: int) -> float:
        value = channel / 255
        return value / 12.92 if value <= 0.04045 else ((value + 0.055) / 1.055) ** 2.4

    red, green, blue = (linear(channel) for channel in rgb[:3])
    return 0.2126 * red + 0.7152 * green + 0.0722 * blue


def contrast(one: tuple[int, ...], other: tuple[int, ...]) -> float:
    """Return the WCAG contrast ratio of two colours (1 to 21)."""
    light, dark = sorted((luminance(one), luminance(other)), reverse=True)
    return (light + 0.05) / (dark + 0.05)


def logo_contrast(page: Page) -> float:
    """Return the contrast, on screen, of the logo's faintest ink with its background."""
    box = page.evaluate(SHOWN_LOGO)
    assert box is not None, "no logo shown"
    shot = Image.open(io.BytesIO(page.screenshot(clip=box))).convert("RGB")
    # Only pixels amid their own colour count: an edge blends ink and background into
    # colours of its own, which are no part of the design.
    spread = ImageChops.difference(shot.filter(MaxFilter(3)), shot.filter(MinFilter(3)))
    solid = Image.eval(spread.convert("L"), lambda level: 255 if level == 0 else 0)
    colours = Image.composite(shot, Image.new("RGB", shot.size), solid)
    found = colours.getcolors(shot.width * shot.height)
    assert found is not None
    # Black stands for the edges (composite's fill); the background is what most of the
    # box shows (the logo's margins, or its plate).
    counts = [(n, colour) for n, colour in found if isinstance(colour, tuple) and any(colour)]
    background = max(counts)[1]
    inks = [colour for count, colour in counts if colour != background and count >= 20]
    assert inks, "the logo's box shows one colour"
    return min(contrast(ink, background) for ink in inks)


@pytest.mark.parametrize(
    "darkening",
    # Forced dark: the light logo carries a white plate of its own, drawn in the picture
    # (a plate in CSS is darkened with the page): 1.19:1 without it, 8.86:1 with.
    ["dark mode", "forced dark"],
)
def test_the_logo_stands_out_from_its_background_when_the_email_is_darkened(
    browser: Browser, email_page: Path, darkening: str
) -> None:
    # WCAG asks 3:1 of the parts of a graphic one needs to make it out.
    scheme: Literal["dark", "light"] = "dark" if darkening == "dark mode" else "light"
    page = browser.new_page(viewport={"width": 600, "height": 800}, color_scheme=scheme)
    if darkening == "forced dark":
        force_dark(page)
    page.goto(email_page.as_uri())
    ratio = logo_contrast(page)
    page.close()
    assert ratio >= 3, f"{ratio:.2f}:1"


# How far below the logo the newsletter's title starts, and where the headline starts.
LOGO_GAP = """() => {
  const logo = [...document.querySelectorAll('.logo img')]
    .find(img => img.getBoundingClientRect().height > 0);
  const title = document.querySelector('p.brand-title');
  const headline = document.querySelector('h1.headline');
  return [title.getBoundingClientRect().top - logo.getBoundingClientRect().bottom,
          headline.getBoundingClientRect().top];
}"""


@pytest.mark.parametrize("width", [375, 600])
def test_the_dark_logo_keeps_the_gap_under_the_light_one(
    browser: Browser, email_page: Path, width: int
) -> None:
    found = {}
    for scheme in ("light", "dark"):
        page = browser.new_page(viewport={"width": width, "height": 800}, color_scheme=scheme)
        page.goto(email_page.as_uri())
        found[scheme] = page.evaluate(LOGO_GAP)
        page.close()
    assert found["dark"] == found["light"]
    if width == 600:
        assert found["light"][0] == 12


def shown_words(page: Page) -> set[str]:
    """Return the words the page shows (rendered text: what display:none hides is not)."""
    return set(re.findall(r"[\w’'-]+", page.evaluate("() => document.body.innerText")))


@pytest.mark.parametrize("scheme", ["light", "dark"])
def test_on_a_phone_the_headline_starts_in_the_first_200_px_and_nothing_is_lost(
    browser: Browser, email_page: Path, scheme: Literal["light", "dark"]
) -> None:
    found = {}
    for width in (375, 600):
        page = browser.new_page(viewport={"width": width, "height": 800}, color_scheme=scheme)
        page.goto(email_page.as_uri())
        top = page.evaluate(
            "() => document.querySelector('h1.headline').getBoundingClientRect().top"
        )
        found[width] = (top, shown_words(page), page.evaluate(SHOWN_LOGO))
        page.close()
    top, words, logo = found[375]
    assert top < 200
    # What the top bar, the byline and the share line say is still there on a phone,
    # in the header or (the browser link) in the footer.
    assert found[600][1] - words == set()
    assert {"Voir", "navigateur", "Par", "QANT", "novembre", "lire", "LinkedIn"} <= words
    assert logo is not None
    assert logo["height"] > 0


@pytest.mark.parametrize("width", [375, 600])
def test_the_compact_html_looks_the_same_as_mjmls_own(
    browser: Browser,
    settings: Settings,
    sample_document: Document,
    sample_rendered: RenderedIssue,
    tmp_path: Path,
    width: int,
) -> None:
    loose = Renderer(settings, compact=False).render(sample_document.issue)
    assert len(sample_rendered.html) < 0.9 * len(loose.html)
    shots = []
    for name, rendered in (("loose", loose), ("compact", sample_rendered)):
        folder = tmp_path / name
        folder.mkdir()
        page = browser.new_page(viewport={"width": width, "height": 800})
        page.goto(write_page(rendered, folder).as_uri())
        shots.append(Image.open(io.BytesIO(page.screenshot(full_page=True))).convert("RGB"))
        page.close()
    before, after = shots
    assert before.size == after.size
    # Pixels that differ by more than a rounding (8 levels of 255 in some channel).
    histogram = ImageChops.difference(before, after).convert("L").histogram()
    differing = sum(histogram[9:])
    assert differing <= before.width * before.height / 1000
