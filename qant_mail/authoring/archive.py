"""The web archive: a static site of every published issue, with an Atom feed."""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote
from xml.etree import ElementTree as ET

from qant_mail.authoring import prose
from qant_mail.authoring.load import load
from qant_mail.authoring.render import PLACEHOLDER, Asset, RenderedIssue, Renderer, Slot
from qant_mail.base.config import Settings
from qant_mail.base.errors import IssueError, OutputError

ATOM = "http://www.w3.org/2005/Atom"
INDEX_TEMPLATE = "archive.html.j2"
_BODY = re.compile(r"<body[^>]*>(.*)</body>", re.DOTALL | re.IGNORECASE)


@dataclass(frozen=True)
class Entry:
    """One published issue."""

    key: str
    date: dt.date
    date_long: str
    subject: str
    intro: str
    url: str
    html: str


@dataclass
class ArchiveReport:
    """What a build published, and what it left out and why."""

    folder: Path
    entries: list[Entry] = field(default_factory=list)
    left_out: list[tuple[Path, str]] = field(default_factory=list)


def build_archive(settings: Settings, folder: Path) -> ArchiveReport:
    """Write the archive of `settings.issues_dir` into `folder`, replacing it whole: the
    main newsletter's at its root, each other newsletter's in its own folder
    (`archive_path`), each with its index and its feed."""
    base = Renderer(settings)
    report = ArchiveReport(folder)
    folder = folder.resolve()
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
    folders = {s.archive_path for s in (e.newsletter for e in settings.editions.values())}
    try:
        published: dict[str, list[Entry]] = {key: [] for key in settings.editions}
        for path in sorted(settings.issues_dir.glob("*.yaml")):
            if path.stem in folders:
                report.left_out.append((path, "its name is that of a newsletter's folder"))
                continue
            entry, key = _publish(path, base, staging, report)
            if entry is not None:
                published[key].append(entry)
        for key, entries in published.items():
            newsletter = settings.for_newsletter(key)
            renderer = base.for_newsletter(key)
            entries.sort(key=lambda e: (e.date, e.key), reverse=True)
            home = staging / (newsletter.newsletter.archive_path or "")
            home.mkdir(parents=True, exist_ok=True)
            index = renderer.render_page(INDEX_TEMPLATE, entries=entries)
            (home / "index.html").write_text(index, encoding="utf-8")
            (home / "feed.xml").write_bytes(_feed(newsletter, entries))
            report.entries += entries
        _swap(staging, folder)
    except OSError as err:
        shutil.rmtree(staging, ignore_errors=True)
        raise OutputError(f"{folder}: cannot write the archive: {err.strerror}") from err
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return report


def _publish(
    path: Path, renderer: Renderer, staging: Path, report: ArchiveReport
) -> tuple[Entry | None, str]:
    """Write one issue's page and images in its newsletter's folder; return its entry
    and newsletter, or None (and a reason) when it is left out."""
    main = renderer.settings.main_id
    try:
        document = load(path)
    except IssueError as err:
        count = len(err.problems)
        first = err.problems[0].short()
        plural = "s; the first" if count > 1 else ""
        report.left_out.append((path, f"{count} problem{plural}: {first} (see `qant-mail check`)"))
        return None, main
    issue = document.issue
    newsletter = issue.newsletter or main
    if newsletter not in renderer.settings.editions:
        report.left_out.append((path, f"no newsletter {newsletter!r} in the settings"))
        return None, main
    if issue.draft:
        report.left_out.append((path, "a draft (draft: true)"))
        return None, newsletter
    renderer = renderer.for_newsletter(newsletter)
    key = document.key
    rendered = renderer.render(issue, key=key, web=True)
    target = staging / (renderer.settings.newsletter.archive_path or "") / key
    target.mkdir(parents=True)
    base_url = renderer.settings.archive_url
    # The images readers get (resized), where hosted messages link them.
    for asset in rendered.assets:
        (target / "images").mkdir(exist_ok=True)
        shutil.copyfile(asset.path, target / "images" / asset.name)
    page = _page(rendered, lambda a: f"images/{quote(a.name)}")
    (target / "index.html").write_text(page, encoding="utf-8")
    # The feed is read elsewhere: its images need absolute addresses.
    absolute = _page(rendered, lambda a: f"{base_url}/{key}/images/{quote(a.name)}")
    body = _BODY.search(absolute)
    entry = Entry(
        key=key,
        date=issue.date,
        date_long=renderer.format_date(issue.date),
        subject=rendered.subject,
        intro=renderer.typeset_text(_plain(issue.summary)),
        url=f"{base_url}/{key}/",
        html=body.group(1) if body else absolute,
    )
    return entry, newsletter


def _page(rendered: RenderedIssue, asset_url: Callable[[Asset], str]) -> str:
    # The web page carries no subscriber's data: whatever placeholder a custom template
    # left in it is emptied, never filled with somebody's address.
    values = dict.fromkeys(Slot, "") | {Slot.BROWSER_URL: rendered.web_url}
    html, _ = rendered.fill(values, asset_url=asset_url)
    return PLACEHOLDER.sub("", html)


def _plain(markdown: str) -> str:
    text = " ".join(prose.to_text(markdown, width=10_000).split())
    return re.sub(r" <[^>\s]+>", "", text)  # the written-out links belong to the email


def _feed(settings: Settings, entries: list[Entry]) -> bytes:
    """Return the Atom feed (RFC 4287) of the entries, with their full content."""
    ET.register_namespace("", ATOM)
    base = settings.archive_url
    feed = ET.Element(f"{{{ATOM}}}feed")
    _text(feed, "id", f"{base}/")
    _text(feed, "title", settings.newsletter.title)
    if settings.newsletter.tagline:
        _text(feed, "subtitle", settings.newsletter.tagline)
    # The newest issue's date, not the time of the build: a rebuild changes nothing.
    newest = entries[0].date if entries else dt.date(1970, 1, 1)
    _text(feed, "updated", _timestamp(newest))
    ET.SubElement(feed, f"{{{ATOM}}}link", rel="self", href=f"{base}/feed.xml")
    ET.SubElement(feed, f"{{{ATOM}}}link", rel="alternate", type="text/html", href=f"{base}/")
    author = ET.SubElement(feed, f"{{{ATOM}}}author")
    _text(author, "name", settings.newsletter.name)
    for entry in entries:
        item = ET.SubElement(feed, f"{{{ATOM}}}entry")
        _text(item, "id", entry.url)
        _text(item, "title", entry.subject)
        _text(item, "updated", _timestamp(entry.date))
        _text(item, "published", _timestamp(entry.date))
        ET.SubElement(item, f"{{{ATOM}}}link", rel="alternate", type="text/html", href=entry.url)
        if entry.intro:
            _text(item, "summary", entry.intro)
        content = _text(item, "content", entry.html)
        content.set("type", "html")
    ET.indent(feed)
    document: bytes = ET.tostring(feed, encoding="utf-8", xml_declaration=True)
    return document + b"\n"


def _text(parent: ET.Element, name: str, value: str) -> ET.Element:
    element = ET.SubElement(parent, f"{{{ATOM}}}{name}")
    element.text = value
    return element


def _timestamp(day: dt.date) -> str:
    return dt.datetime.combine(day, dt.time(6, 0), dt.UTC).isoformat().replace("+00:00", "Z")


def _swap(staging: Path, folder: Path) -> None:
    """Put the new site in place of the old one in two renames: never half a site."""
    staging.chmod(0o755)
    if not folder.exists():
        staging.rename(folder)
        return
    old = folder.with_name(f".{folder.name}-old-{os.getpid()}")
    folder.rename(old)
    try:
        staging.rename(folder)
    except OSError:
        old.rename(folder)
        raise
    with contextlib.suppress(OSError):
        shutil.rmtree(old)
