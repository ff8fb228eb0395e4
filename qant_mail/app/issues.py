"""The use cases of an issue file: a new skeleton, its schema, check it, render it for the
sample reader, make it ready to send, publish the archive.

    load (YAML → Issue) → render (HTML, text) → lint (the email) → compose (MIME)
"""

from __future__ import annotations

import datetime as dt
import hashlib
import os
import zoneinfo
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import quote

from qant_mail.app.context import Context
from qant_mail.audience import tokens
from qant_mail.authoring import draft
from qant_mail.authoring.lint import lint
from qant_mail.authoring.load import Document, load, parse
from qant_mail.authoring.model import json_schema
from qant_mail.authoring.render import THEME, Asset, RenderedIssue, Renderer, Slot
from qant_mail.base.config import Settings
from qant_mail.base.errors import IssueError, Problem, SendError, Severity
from qant_mail.base.files import write_all
from qant_mail.delivery.compose import MessageTemplate, Prepared, Recipient, lone_ed25519

if TYPE_CHECKING:  # the archive is imported by the one use case that builds it
    from qant_mail.authoring.archive import ArchiveReport

# What the edges see of a render.
__all__ = ["THEME", "ArchiveReport", "Asset", "CheckReport", "RenderedIssue"]


def __getattr__(name: str) -> object:
    """Return the archive's report type, imported when first asked for (PEP 562)."""
    if name == "ArchiveReport":
        from qant_mail.authoring.archive import ArchiveReport

        return ArchiveReport
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@dataclass(frozen=True)
class CheckReport:
    """What `check` found in an issue file; the document and render when it loaded."""

    path: Path
    problems: list[Problem]
    document: Document | None = None
    rendered: RenderedIssue | None = None
    settings: Settings | None = None  # those of the issue's newsletter

    @property
    def errors(self) -> list[Problem]:
        """Return the problems that stop a render or a send."""
        return [p for p in self.problems if p.severity is Severity.ERROR]

    @property
    def warnings(self) -> list[Problem]:
        """Return the problems worth a look that stop nothing."""
        return [p for p in self.problems if p.severity is Severity.WARNING]


def new_issue(ctx: Context, day: dt.date | None = None) -> Path:
    """Write the commented skeleton of the issue of `day` (default: today); return it."""
    return draft.write_skeleton(ctx.settings, day or today(ctx))


def today(ctx: Context) -> dt.date:
    """Return today's date where the editors are (the newsletter's time zone)."""
    return day_in(ctx.settings.newsletter.timezone, ctx.clock())


def day_in(zone: str, moment: float) -> dt.date:
    """Return the date in time zone `zone` at `moment` (seconds since the epoch)."""
    return dt.datetime.fromtimestamp(moment, zoneinfo.ZoneInfo(zone)).date()


def schema() -> str:
    """Return the JSON Schema of an issue file, for editors' YAML plugins."""
    return json_schema()


def write_schema(path: Path) -> None:
    """Write the JSON Schema of an issue file to `path`."""
    draft.write_schema(path)


def check(
    ctx: Context,
    path: Path,
    *,
    renderer: Renderer | None = None,
    on: dt.date | None = None,
    raw: bytes | None = None,
) -> CheckReport:
    """Validate the issue at `path`, render it (with the settings of the newsletter it
    belongs to) and lint the email: every problem at once. `on`: the email of an
    occasion (a welcome), dated that day, with no page of its own in the archive. `raw`:
    the file's content at another time (a git revision), read as if it were there."""
    renderer = renderer or ctx.renderer
    try:
        document = load(path) if raw is None else parse(raw, path)
    except IssueError as err:
        return CheckReport(path, err.problems)
    wanted = document.issue.newsletter
    if wanted is not None and wanted not in renderer.settings.editions:
        known = ", ".join(renderer.settings.editions)
        problem = document.problem(
            ("newsletter",),
            f"no newsletter {wanted!r} in the settings (known: {known})",
            Severity.ERROR,
        )
        return CheckReport(path, [problem], document)
    if wanted is not None:  # else the renderer given: the main newsletter's, or a welcome's
        renderer = renderer.for_newsletter(wanted)
    issue = document.issue if on is None else document.issue.model_copy(update={"date": on})
    rendered = renderer.render(issue, key=document.key, archived=on is None)
    problems = lint(document, rendered, renderer.settings)
    if warning := lone_ed25519(renderer.settings):
        problems.append(document.problem(("(settings)",), warning, Severity.WARNING))
    return CheckReport(path, problems, document, rendered, renderer.settings)


def render_sample(ctx: Context, path: Path, out_dir: Path | None = None) -> list[Path]:
    """Render the issue at `path` for the sample reader: write NAME.html, .txt and .eml
    into `out_dir` (default: the output folder), all of them or none."""
    document = load(path)
    settings = ctx.settings.for_newsletter(document.issue.newsletter)
    rendered = ctx.renderer.for_newsletter(settings.newsletter.id).render(
        document.issue, key=document.key
    )
    template = MessageTemplate(
        rendered, settings, secret=tokens.secret_or_sample(ctx.env), issue_key=document.key
    )
    recipient = Recipient(settings.preview.sample_email, settings.preview.sample_name)
    target = (out_dir or ctx.settings.output_dir).resolve()

    def local_url(asset: Asset) -> str:
        # The HTML file shows the images from where they are, so that it opens in a browser.
        return quote(Path(os.path.relpath(asset.source, target)).as_posix())

    page, text = rendered.fill(template.values(recipient), asset_url=local_url)
    files = {
        target / f"{document.key}.html": page.encode("utf-8"),
        target / f"{document.key}.txt": text.encode("utf-8"),
        target / f"{document.key}.eml": template.personalise(recipient),
    }
    write_all(files)
    return list(files)


def sample_fill(
    ctx: Context, rendered: RenderedIssue, asset_url: Callable[[Asset], str]
) -> tuple[str, str]:
    """Return the HTML and the text of a render as the preview shows them: filled for
    the sample reader, its own links going to example pages, the images at `asset_url`."""
    settings = ctx.settings.for_newsletter(rendered.issue.newsletter)
    sample, base_url = settings.preview, settings.newsletter.base_url
    values = {
        Slot.NAME: sample.sample_name,
        Slot.EMAIL: sample.sample_email,
        Slot.UNSUBSCRIBE_URL: f"{base_url}/unsubscribe/exemple",
        Slot.PREFERENCES_URL: f"{base_url}/subscriptions/exemple",
        Slot.BROWSER_URL: rendered.web_url,
    }
    return rendered.fill(values, asset_url=asset_url)


def sendable(
    ctx: Context,
    path: Path,
    *,
    test: bool = False,
    renderer: Renderer | None = None,
    on: dt.date | None = None,
    raw: bytes | None = None,
) -> CheckReport:
    """Check the issue at `path` (or `raw`, as if it were there); raise what keeps it
    from going out: its errors, or a draft (unless for a test)."""
    report = check(ctx, path, renderer=renderer, on=on, raw=raw)
    if report.document is None or report.rendered is None:
        raise IssueError(path, report.problems)
    if report.errors:
        raise IssueError(path, report.errors)
    if report.document.issue.draft and not test:
        raise SendError(
            f"{path}: the issue is marked `draft: true`; remove that line when it is ready "
            "(test sends with --to work on drafts)"
        )
    return report


def prepare(
    ctx: Context,
    path: Path,
    *,
    test: bool = False,
    occasion: bool = False,
    renderer: Renderer | None = None,
) -> Prepared:
    """Check, render and compose the issue at `path` for a send; refuse what must not go
    out (errors, a draft to the list). The list's messages are signed as they are
    personalised; a test's, and an `occasion`'s (a welcome: dated the day it is sent,
    with no page in the archive), go one at a time through the outbox, which signs them."""
    report = sendable(ctx, path, test=test, renderer=renderer, on=today(ctx) if occasion else None)
    assert report.document is not None
    assert report.rendered is not None
    assert report.settings is not None
    settings = report.settings
    key = report.document.key
    rendered = report.rendered
    template = ctx.outbox.template(
        rendered,
        settings.newsletter.id,
        secret=ctx.secret(),
        issue_key=key,
        test=test,
        unique=occasion,
        signed=not (test or occasion),
    )
    digest = hashlib.sha256()
    for part in (rendered.subject, rendered.html, rendered.text):
        digest.update(part.encode("utf-8"))
    notes = ctx.outbox.rules(settings.newsletter.id).notes
    # A warning about the settings that is also a note of the send is said once.
    warnings = [str(p) for p in report.warnings if p.message not in notes]
    if settings.images.mode == "host" and rendered.assets and not occasion:
        warnings.append(
            f"the pictures are linked from {settings.archive_url}/{key}/images/: "
            "publish the archive (`qant-mail archive`) before readers open the issue"
        )
    warnings += notes
    return Prepared(
        key, rendered, template, digest.hexdigest()[:16], warnings, settings.newsletter.id
    )


def build_archive(ctx: Context, folder: Path | None = None) -> ArchiveReport:
    """Write the web archive (an index of every issue, a page each, a feed per
    newsletter) into `folder` (default: the output folder's `archive`)."""
    from qant_mail.authoring import archive

    return archive.build_archive(ctx.settings, folder or ctx.settings.output_dir / "archive")
