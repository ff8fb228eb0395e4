"""Counted links ([audience] count_clicks): a click on base_url/l/ISSUE/N adds one to that
link's count of the day and leads on. Nothing names who clicked: no reader, no cookie, no
address, no device; only the number of times each link of each issue was followed."""

from __future__ import annotations

import datetime as dt
import re

from qant_mail.app.context import Context
from qant_mail.store.clicks import Clicks, LinkCount

# What an issue's key and a link's number look like; anything else is not looked up.
_ISSUE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,99}")
_MAX_LINKS = 10_000


def follow(ctx: Context, issue: str, number: int, *, count: bool = True) -> str | None:
    """Return where link `number` of `issue` leads, counted as followed today (UTC)
    unless `count` is false (a HEAD: a link checker, not a reader); None if there is
    no such link."""
    if not _ISSUE.fullmatch(issue) or not 0 < number <= _MAX_LINKS:
        return None
    day = dt.datetime.fromtimestamp(ctx.clock(), dt.UTC).date().isoformat()
    with ctx.db() as db:
        clicks = Clicks(db)
        return clicks.follow(issue, number, day) if count else clicks.target(issue, number)


def counts(ctx: Context, since: dt.date | None = None) -> list[LinkCount]:
    """Return every counted link with its clicks (since `since`, if given)."""
    with ctx.db() as db:
        return Clicks(db).counts(since.isoformat() if since else "")
