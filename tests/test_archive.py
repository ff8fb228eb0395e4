"""The static archive: every published issue, newest first, a page each, an Atom feed."""

from __future__ import annotations

import hashlib
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING
from xml.etree import ElementTree as ET

import feedparser
import pytest
from bs4 import BeautifulSoup
from typer.testing import Result

from qant_mail.app.context import Context
from qant_mail.authoring.archive import ATOM, build_archive
from qant_mail.authoring.render import RenderedIssue
from qant_mail.base.config import Settings
from qant_mail.web.serve import create_app
from qant_mail.web.webserver import BackgroundServer
from tests.browser import needs_chromium

if TYPE_CHECKING:
    from playwright.sync_api import Browser


@pytest.fixture
def issues(project_settings: Settings) -> Path:
    """The sample, an older copy, a draft and a broken file."""
    folder = project_settings.issues_dir
    older = (folder / "2023-11-20.yaml").read_text(encoding="utf-8")
    older = older.replace("date: 2023-11-20", "date: 2023-11-17").replace(
        "subject: \"D'OpenAI à Kyutai", 'subject: "Vendredi : Kyutai'
    )
    (folder / "2023-11-17.yaml").write_text(older, encoding="utf-8")
    (folder / "2023-11-21.yaml").write_text(
        "draft: true\nsubject: Brouillon\nsections: [text: T]\n"
    )
    (folder / "2023-11-22.yaml").write_text("subject: Cassé\nsections:\n- event: {titre: T}\n")
    return folder


def snapshot(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def test_index_lists_published_issues_newest_first(
    project_settings: Settings, issues: Path, tmp_path: Path
) -> None:
    report = build_archive(project_settings, tmp_path / "site")
    assert [e.key for e in report.entries] == ["2023-11-20", "2023-11-17"]
    left_out = {path.name: reason for path, reason in report.left_out}
    assert left_out["2023-11-21.yaml"] == "a draft (draft: true)"
    assert left_out["2023-11-22.yaml"].startswith(
        "2 problems; the first: 3:3: sections.0.event.title: required, but missing"
    )
    index = BeautifulSoup((tmp_path / "site" / "index.html").read_text(), "html.parser")
    links = [(a.get_text(), a["href"]) for a in index.select("ol.issues h2 a")]
    assert links == [
        ("D’OpenAI à Kyutai, une question de gouvernance", "2023-11-20/"),
        ("Vendredi\u00a0: Kyutai, une question de gouvernance", "2023-11-17/"),
    ]
    text = index.get_text(" ")
    assert "lundi 20 novembre 2023" in text
    assert "Pendant qu’OpenAI met Sam Altman dehors" in text
    assert not (tmp_path / "site" / "2023-11-21").exists()


def test_issue_page_holds_no_personal_data(
    project_settings: Settings, issues: Path, tmp_path: Path
) -> None:
    build_archive(project_settings, tmp_path / "site")
    html = (tmp_path / "site" / "2023-11-20" / "index.html").read_text()
    for personal in ("%%qant:", "unsubscribe", "lecteur@example.com", "Camille", "Se désinscrire"):
        assert personal not in html, personal
    soup = BeautifulSoup(html, "html.parser")
    sources = [img["src"] for img in soup.find_all("img")]
    assert all(str(src).startswith("images/") for src in sources)
    for src in sources:
        assert (tmp_path / "site" / "2023-11-20" / str(src)).is_file()
    assert "Vous lisez la version en ligne" in soup.get_text()


def test_email_view_in_browser_link_points_at_its_page(
    project_settings: Settings, issues: Path, tmp_path: Path, sample_rendered: RenderedIssue
) -> None:
    report = build_archive(project_settings, tmp_path / "site")
    assert sample_rendered.web_url == report.entries[0].url
    assert sample_rendered.web_url == "https://lettre.qant.example/2023-11-20/"


def test_feed_is_valid_atom_with_full_content(
    project_settings: Settings, issues: Path, tmp_path: Path
) -> None:
    build_archive(project_settings, tmp_path / "site")
    raw = (tmp_path / "site" / "feed.xml").read_bytes()
    parsed = feedparser.parse(raw)
    assert not parsed.bozo, parsed.get("bozo_exception")
    assert parsed.version == "atom10"
    assert parsed.feed.title == "Qant: Révolution cognitive et Avenir du numérique"
    assert [e.link for e in parsed.entries] == [
        "https://lettre.qant.example/2023-11-20/",
        "https://lettre.qant.example/2023-11-17/",
    ]
    content = parsed.entries[0].content[0]
    assert content.type == "text/html"
    assert "Sacré week-end pour OpenAI" in content.value
    assert "https://lettre.qant.example/2023-11-20/images/" in content.value
    # RFC 4287: the elements every feed and entry must have.
    root = ET.fromstring(raw)
    ns = {"a": ATOM}
    for name in ("id", "title", "updated", "author/a:name", "link[@rel='self']"):
        assert root.find(f"a:{name}", ns) is not None, name
    for entry in root.findall("a:entry", ns):
        for name in ("id", "title", "updated", "link[@rel='alternate']", "content"):
            assert entry.find(f"a:{name}", ns) is not None, name


def test_rebuilding_is_idempotent_and_leaves_nothing_stale(
    project_settings: Settings, issues: Path, tmp_path: Path
) -> None:
    site = tmp_path / "site"
    build_archive(project_settings, site)
    first = snapshot(site)
    build_archive(project_settings, site)
    assert snapshot(site) == first
    (issues / "2023-11-17.yaml").unlink()
    build_archive(project_settings, site)
    assert not (site / "2023-11-17").exists()
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(".site")]
    assert leftovers == []  # no staging or old folder left behind


def test_archive_command(cli: Callable[..., Result], project: Path) -> None:
    result = cli("archive", "-o", "site")
    assert result.exit_code == 0, result.output
    assert "archive of 1 issues in site" in result.stdout
    assert (project / "site" / "feed.xml").is_file()
    shutil.rmtree(project / "site")


@needs_chromium
def test_archive_index_in_a_browser(
    browser: Browser, project_settings: Settings, issues: Path, tmp_path: Path
) -> None:
    site = build_archive(project_settings, tmp_path / "site").folder
    with BackgroundServer(
        create_app(Context(project_settings, secret=b"a secret for the test"), site)
    ) as server:
        page = browser.new_page(viewport={"width": 375, "height": 700})
        page.goto(server.url)
        assert page.locator("ol.issues li").count() == 2
        assert page.evaluate("document.documentElement.scrollWidth") <= 375
        page.click("text=D’OpenAI à Kyutai, une question de gouvernance")
        page.wait_for_url("**/2023-11-20/")
        page.wait_for_load_state("load")
        assert page.evaluate("[...document.images].every(i => i.complete && i.naturalWidth > 0)")
        assert page.evaluate("document.documentElement.scrollWidth") <= 375
        page.close()


def test_an_issue_with_a_link_check_refuses_is_not_published(
    project_settings: Settings, tmp_path: Path
) -> None:
    folder = project_settings.issues_dir
    (folder / "2024-01-15.yaml").write_text(
        "subject: Piège\nsections:\n  - event:\n      title: T\n      links:\n"
        '        - {title: Clic, url: "javascript:alert(1)"}\n'
    )
    report = build_archive(project_settings, tmp_path / "site")
    reasons = {path.name: reason for path, reason in report.left_out}
    assert "a link is https://, http:// or mailto:" in reasons["2024-01-15.yaml"]
    assert not (tmp_path / "site" / "2024-01-15").exists()
    assert b"javascript:" not in (tmp_path / "site" / "feed.xml").read_bytes()
