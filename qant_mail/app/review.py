"""Reviewing an issue: what readers would see change between two versions of it (files,
a file at a git revision, or the version approved), and the message a send composes of
one, unsigned, which approvals name."""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path

from qant_mail.app import issues
from qant_mail.app.context import Context
from qant_mail.audience import tokens
from qant_mail.authoring.compare import Comparison as Comparison  # for the edges
from qant_mail.authoring.compare import Reading, compare, reading_of
from qant_mail.authoring.render import RenderedIssue
from qant_mail.base.config import Settings
from qant_mail.base.errors import ConfigError, QantError
from qant_mail.delivery.compose import MessageTemplate
from qant_mail.store.approvals import Approvals

APPROVED = "approved:"  # a version read from the store: `approved:ISSUE`


class ReviewError(QantError):
    """A version that cannot be read (no such revision, file or approval)."""


@dataclass(frozen=True)
class Composed:
    """An issue's message as a send composes it, unsigned."""

    key: str
    newsletter: str
    settings: Settings
    rendered: RenderedIssue
    template: MessageTemplate


def composed(
    ctx: Context, path: Path, *, drafts: bool = False, raw: bytes | None = None
) -> Composed:
    """Check, render and compose the issue at `path` (or `raw`, as if it were there) as
    a send to its list would, but unsigned and without the links' secret if it is not
    set: what a digest or a diff of the message needs (the signatures and each reader's
    links are left out of both). Errors are refused; a draft too, unless `drafts`."""
    report = issues.sendable(ctx, path, test=drafts, raw=raw)
    assert report.document is not None
    assert report.rendered is not None
    assert report.settings is not None
    try:
        secret = ctx.secret()
    except ConfigError:
        secret = tokens.SAMPLE_SECRET
    key = report.document.key
    template = MessageTemplate(report.rendered, report.settings, secret=secret, issue_key=key)
    newsletter = report.settings.newsletter.id
    return Composed(key, newsletter, report.settings, report.rendered, template)


def read(ctx: Context, spec: str) -> Reading:
    """Return what readers see of a version: `FILE`, `FILE@REV` (the file at git
    revision REV), or `approved:ISSUE` (the version last approved)."""
    if spec.startswith(APPROVED):
        return _approved(ctx, spec.removeprefix(APPROVED))
    path_text, at, revision = spec.rpartition("@")
    if at and path_text and revision and not Path(spec).exists():
        return _at_revision(ctx, Path(path_text), revision)
    path = Path(spec)
    if not path.is_file():
        raise ReviewError(f"{spec}: no such issue file")
    made = composed(ctx, path, drafts=True)
    return reading_of(made.rendered, made.template.size)


def diff(ctx: Context, a: str | Reading, b: str | Reading) -> Comparison:
    """Return what readers would see change from version `a` to version `b`."""
    before = read(ctx, a) if isinstance(a, str) else a
    after = read(ctx, b) if isinstance(b, str) else b
    return compare(before, after)


def _approved(ctx: Context, issue: str) -> Reading:
    key = Path(issue).stem
    with ctx.db() as db:
        found = [a for (_, name), a in Approvals(db).latest_of_each().items() if name == key]
    if not found:
        raise ReviewError(f"{APPROVED}{key}: {key} was never approved (`qant-mail approve`)")
    approval = max(found, key=lambda a: a.approved_at)
    return Reading(
        approval.subject, approval.preheader, approval.text, approval.html, approval.size
    )


def _at_revision(ctx: Context, path: Path, revision: str) -> Reading:
    """Return the reading of the file at `path` as it was at git `revision`, read as if
    it were there now (its pictures are relative to its folder, its name is its key)."""
    folder = path.resolve().parent
    if not folder.is_dir():
        raise ReviewError(f"{path}: no such folder")
    if not revision or revision.startswith("-"):
        raise ReviewError(f"{path}@{revision}: not a revision")
    top = Path(_git(folder, "rev-parse", "--show-toplevel").decode().strip()).resolve()
    try:
        relative = (folder / path.name).relative_to(top)
    except ValueError as err:
        raise ReviewError(f"{path}: not inside its git repository") from err
    raw = _git(top, "show", f"{revision}:{relative.as_posix()}")
    made = composed(ctx, folder / path.name, drafts=True, raw=raw)
    return reading_of(made.rendered, made.template.size)


def _git(folder: Path, *args: str) -> bytes:
    try:
        done = subprocess.run(
            ["git", "-C", str(folder), *args], capture_output=True, timeout=30, check=False
        )
    except FileNotFoundError as err:
        raise ReviewError("git is not installed: FILE@REV needs it") from err
    except subprocess.TimeoutExpired as err:
        raise ReviewError(f"git {args[0]} took too long in {folder}") from err
    if done.returncode != 0:
        why = done.stderr.decode(errors="replace").strip().splitlines()[-1:] or ["failed"]
        raise ReviewError(f"git {args[0]} in {folder}: {why[0]}")
    return done.stdout
