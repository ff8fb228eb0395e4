"""`qant-mail stats`: each newsletter's audience over a period (readers, joins by source,
leaves by way, bounces, complaints) and the outcome of each of its sends, from the counts
the store keeps; nothing here, or anywhere, follows a reader."""

from __future__ import annotations

import datetime as dt
import zoneinfo
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Literal

from qant_mail.app import issues
from qant_mail.app.context import Context
from qant_mail.base.errors import QantError
from qant_mail.store.clicks import Clicks, LinkCount
from qant_mail.store.stats import Figures, Moves, SendFigures

By = Literal["day", "week"]
# Where a reader came from: a signup form, the reader's page, an import, the command line.
SOURCES = ("form", "page", "import", "cli", "api", "other")
# How a reader left: the link's page, one-click (RFC 8058), the reader's page, an email
# to the unsubscribe address (the mail pipe), the command line; "other" is a reason given
# to `subscribers unsubscribe --reason`, or written by a version older than the roads.
WAYS = ("link", "one-click", "page", "mail", "cli", "api", "other")
STOPS = ("bounced", "complained")
# With no --since, the figures go back this far (or to the first reader, if later).
DEFAULT_DAYS = 84
# With no --by, a period longer than this is shown by week.
DAYS_BY_DAY = 62


class StatsError(QantError):
    """Figures that cannot be given as asked (a period that starts in the future)."""


@dataclass(frozen=True)
class Period:
    """One day or week of a newsletter's audience: its readers at the end, and what
    happened during it."""

    start: dt.date
    active: int  # readers at its end
    joined: dict[str, int]  # by source
    left: dict[str, int]  # by way
    bounced: int
    complained: int

    @property
    def joins(self) -> int:
        """Return everyone who joined in the period."""
        return sum(self.joined.values())

    @property
    def leaves(self) -> int:
        """Return everyone who left, bounced or complained in the period."""
        return sum(self.left.values()) + self.bounced + self.complained


@dataclass(frozen=True)
class SendStats:
    """What became of one send, and the unsubscriptions of its readers after it."""

    issue: str
    subject: str
    started_at: dt.datetime  # in the newsletter's time zone
    recipients: int
    delivered: int
    failed: int
    bounced: int
    soft_bounced: int
    complained: int
    unsubscribed: int  # in the seven days after it
    clicks: int = 0  # its counted links followed ([audience] count_clicks), in all

    @property
    def other(self) -> int:
        """Return the messages with no outcome yet (pending, deferred, unknown, skipped)."""
        return self.recipients - self.delivered - self.failed - self.bounced


@dataclass(frozen=True)
class NewsletterStats:
    """One newsletter's figures over the period."""

    key: str
    name: str
    timezone: str
    active: int  # readers now
    periods: list[Period]
    sends: list[SendStats]
    joined: dict[str, int] = field(default_factory=dict)  # over the period, by source
    left: dict[str, int] = field(default_factory=dict)  # over the period, by way
    bounced: int = 0
    complained: int = 0
    # Each counted link of the period's sends, and how often it was followed in all:
    # counts only, never who ([audience] count_clicks).
    links: list[LinkCount] = field(default_factory=list)

    @property
    def active_at_start(self) -> int:
        """Return the readers the period began with."""
        if not self.periods:
            return self.active
        first = self.periods[0]
        return first.active - first.joins + first.leaves


@dataclass(frozen=True)
class Stats:
    """The figures of one or every newsletter, from `since` to `until`, day by day or
    week by week."""

    since: dt.date
    until: dt.date
    by: By
    newsletters: list[NewsletterStats]

    def to_json(self) -> dict[str, Any]:
        """Return the figures as JSON values (dates in ISO 8601)."""
        return {
            "since": self.since.isoformat(),
            "until": self.until.isoformat(),
            "by": self.by,
            "newsletters": [_newsletter_json(n) for n in self.newsletters],
        }


def stats(
    ctx: Context,
    newsletter: str | None = None,
    since: dt.date | None = None,
    by: By | None = None,
) -> Stats:
    """Return the figures of `newsletter` (None: every newsletter) from `since` (None:
    twelve weeks ago, or the first reader's day) to today, by `by` (None: by day up to
    two months, else by week)."""
    settings = ctx.settings
    until = issues.today(ctx)
    if since is not None and since > until:
        raise StatsError(f"--since {since.isoformat()} is after today ({until.isoformat()})")
    keys = (
        [settings.for_newsletter(newsletter).newsletter.id]
        if newsletter
        else list(settings.editions)
    )
    with ctx.db() as db:
        figures = Figures(db)
        moves = {key: figures.moves(key) for key in keys}
        if since is None:
            firsts = [_first_day(moves[k], _zone(ctx, k)) for k in keys]
            first = min((day for day in firsts if day is not None), default=until)
            since = min(until, max(first, until - dt.timedelta(days=DEFAULT_DAYS)))
        if by is None:
            by = "day" if (until - since).days <= DAYS_BY_DAY else "week"
        if by == "week":
            since -= dt.timedelta(days=since.weekday())  # weeks begin on Mondays
        sends = {key: figures.sends(key, _stored_time(since, _zone(ctx, key))) for key in keys}
        counted = Clicks(db).counts()
    found = [
        _newsletter(ctx, key, moves[key], sends[key], since, until, by, counted) for key in keys
    ]
    return Stats(since, until, by, found)


def _newsletter(
    ctx: Context,
    key: str,
    moves: Moves,
    sends: list[SendFigures],
    since: dt.date,
    until: dt.date,
    by: By,
    counted: list[LinkCount],
) -> NewsletterStats:
    settings = ctx.settings.for_newsletter(key)
    issues_sent = {s.issue for s in sends}
    links = [c for c in counted if c.newsletter == key and c.issue in issues_sent]
    clicks: Counter[str] = Counter()
    for link in links:
        clicks[link.issue] += link.clicks
    zone = _zone(ctx, key)
    starts = _periods(since, until, by)
    joined: dict[dt.date, Counter[str]] = {start: Counter() for start in starts}
    ended: dict[dt.date, Counter[str]] = {start: Counter() for start in starts}
    before = 0  # readers at the start of the period
    for rows, into, sign in ((moves.joined, joined, 1), (moves.ended, ended, -1)):
        for hour, kind, number in rows:
            day = _local_day(hour, zone)
            if day < since:
                before += sign * number
            else:
                # (An event dated after today, by a clock ahead, counts in the last period.)
                into[_period_of(min(day, until), by)][kind] += number
    periods = []
    active = before
    for start in starts:
        active += joined[start].total() - ended[start].total()
        periods.append(
            Period(
                start,
                active,
                _by(SOURCES, joined[start]),
                _by(WAYS, ended[start]),
                ended[start]["bounced"],
                ended[start]["complained"],
            )
        )
    total_joined: Counter[str] = sum(joined.values(), Counter())
    total_ended: Counter[str] = sum(ended.values(), Counter())
    return NewsletterStats(
        key=key,
        name=settings.newsletter.name,
        timezone=settings.newsletter.timezone,
        active=moves.active,
        periods=periods,
        sends=[_send(s, zone, clicks[s.issue]) for s in sends],
        joined=_by(SOURCES, total_joined),
        left=_by(WAYS, total_ended),
        bounced=total_ended["bounced"],
        complained=total_ended["complained"],
        links=links,
    )


def _send(figures: SendFigures, zone: zoneinfo.ZoneInfo, clicks: int = 0) -> SendStats:
    started = dt.datetime.fromisoformat(figures.started_at).astimezone(zone)
    return SendStats(
        figures.issue,
        figures.subject,
        started,
        figures.recipients,
        figures.delivered,
        figures.failed,
        figures.bounced,
        figures.soft_bounced,
        figures.complained,
        figures.unsubscribed,
        clicks,
    )


def _by(names: Iterable[str], counts: Counter[str]) -> dict[str, int]:
    """Return the counts of `names`, in their order, zeros included."""
    return {name: counts[name] for name in names}


def _zone(ctx: Context, key: str) -> zoneinfo.ZoneInfo:
    return zoneinfo.ZoneInfo(ctx.settings.for_newsletter(key).newsletter.timezone)


def _local_day(hour: str, zone: zoneinfo.ZoneInfo) -> dt.date:
    """Return the day, where the editors are, of a UTC hour as the store counts them."""
    moment = dt.datetime.strptime(hour, "%Y-%m-%dT%H").replace(tzinfo=dt.UTC)
    return moment.astimezone(zone).date()


def _first_day(moves: Moves, zone: zoneinfo.ZoneInfo) -> dt.date | None:
    return _local_day(moves.joined[0][0], zone) if moves.joined else None


def _stored_time(day: dt.date, zone: zoneinfo.ZoneInfo) -> str:
    """Return the start of `day` in `zone` as the store writes times (ISO 8601, UTC)."""
    start = dt.datetime.combine(day, dt.time(), zone).astimezone(dt.UTC)
    return start.isoformat()


def _periods(since: dt.date, until: dt.date, by: By) -> list[dt.date]:
    step = dt.timedelta(days=7 if by == "week" else 1)
    starts = []
    start = _period_of(since, by)
    while start <= until:
        starts.append(start)
        start += step
    return starts


def _period_of(day: dt.date, by: By) -> dt.date:
    return day - dt.timedelta(days=day.weekday()) if by == "week" else day


def _newsletter_json(found: NewsletterStats) -> dict[str, Any]:
    return {
        "key": found.key,
        "name": found.name,
        "active": found.active,
        "active_at_start": found.active_at_start,
        "joined": found.joined,
        "left": found.left,
        "bounced": found.bounced,
        "complained": found.complained,
        "periods": [
            {
                "start": p.start.isoformat(),
                "active": p.active,
                "joined": p.joined,
                "left": p.left,
                "bounced": p.bounced,
                "complained": p.complained,
            }
            for p in found.periods
        ],
        "sends": [
            {
                "issue": s.issue,
                "subject": s.subject,
                "started_at": s.started_at.isoformat(),
                "recipients": s.recipients,
                "delivered": s.delivered,
                "failed": s.failed,
                "bounced": s.bounced,
                "soft_bounced": s.soft_bounced,
                "complained": s.complained,
                "unsubscribed_within_7_days": s.unsubscribed,
                "clicks": s.clicks,
            }
            for s in found.sends
        ],
        "links": [
            {"issue": c.issue, "number": c.number, "url": c.url, "clicks": c.clicks}
            for c in found.links
        ],
    }
