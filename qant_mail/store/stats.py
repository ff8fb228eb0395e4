"""The audience's figures, counted by the store: one newsletter's joins, leaves and stops
by the hour they happened in, its readers now, and the outcomes of each of its sends.

Every query returns counts, never a reader: the figures come from what the store keeps
to serve readers (a subscription's source, status, reason and times; a delivery's state
and what came back), not from anything that watches them read."""

from __future__ import annotations

from dataclasses import dataclass

from qant_mail.store.sql import Db

# The UTC hour of a stored time ("2026-01-05T08"): the use case turns hours into days in
# the newsletter's own time zone, which SQLite cannot, and an hour is small enough a
# group for any zone but those of a half or a quarter hour (off by that much at midnight).
_HOUR = {
    "sqlite": "substr({}, 1, 13)",
    "postgresql": "to_char({} AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24')",
}
# Seven days after a send started, in each database's words (SQLite keeps ISO text, in
# UTC, the form `now_text` writes).
_WEEK_AFTER = {
    "sqlite": "strftime('%Y-%m-%dT%H:%M:%S+00:00', x.created_at, '+7 days')",
    "postgresql": "x.created_at + interval '7 days'",
}

# Where a subscription came from, by the source each road writes on it.
_SOURCE = (
    "CASE WHEN b.source IN ('api', 'signup form api') OR b.source LIKE 'api:%' THEN 'api'"
    " WHEN b.source LIKE 'signup form%' THEN 'form'"
    " WHEN b.source = 'reader page' THEN 'page'"
    " WHEN b.source LIKE 'import%' THEN 'import'"
    " WHEN b.source = 'command line' THEN 'cli' ELSE 'other' END"
)
# Whether a subscription ended by leaving this newsletter (before any stop of the reader),
# rather than by the reader's bounce or complaint.
_LEFT = (
    "b.status = 'unsubscribed'"
    " AND (s.status = 'active' OR b.status_changed_at <= s.status_changed_at)"
)
# How it ended: the way a reader left, by the reason each road writes (the link's page:
# "page"; RFC 8058: "one-click"; the reader's page: "reader page"; the mail pipe:
# "mailto"; `subscribers unsubscribe`: "command line" unless given a --reason; the API:
# "api"), or the
# reader's own stop.
_ENDED_HOW = (
    f"CASE WHEN {_LEFT} THEN CASE b.status_reason WHEN 'page' THEN 'link'"
    " WHEN 'one-click' THEN 'one-click' WHEN 'reader page' THEN 'page'"
    " WHEN 'mailto' THEN 'mail' WHEN 'command line' THEN 'cli' WHEN 'api' THEN 'api'"
    " ELSE 'other' END"
    " WHEN s.status IN ('bounced', 'complained') THEN s.status ELSE 'other' END"
)
_ENDED_AT = f"CASE WHEN {_LEFT} THEN b.status_changed_at ELSE s.status_changed_at END"


@dataclass(frozen=True)
class Moves:
    """A newsletter's subscriptions as counts: how many began in each UTC hour and from
    where, how many ended in each and how, and how many are active now."""

    joined: list[tuple[str, str, int]]  # (hour "YYYY-MM-DDTHH", source, subscriptions)
    ended: list[tuple[str, str, int]]  # (hour, way or "bounced"/"complained", subscriptions)
    active: int


@dataclass(frozen=True)
class SendFigures:
    """One send's outcomes, counted."""

    issue: str
    subject: str
    started_at: str
    recipients: int
    delivered: int  # accepted by the relay, and no hard bounce came back
    failed: int  # refused by the relay
    bounced: int  # accepted, then a hard bounce came back
    soft_bounced: int
    complained: int
    unsubscribed: int  # its readers who left its newsletter in the seven days after it


class Figures:
    """The counting queries of one store."""

    def __init__(self, db: Db) -> None:
        self.db = db

    def moves(self, newsletter: str) -> Moves:
        """Return the joins and ends of `newsletter`'s subscriptions, counted by hour."""
        hour = _HOUR[self.db.dialect]
        joined = self.db.execute(
            f"SELECT {hour.format('b.created_at')}, {_SOURCE}, count(*) FROM subscriptions b"
            " WHERE b.newsletter = $1 GROUP BY 1, 2 ORDER BY 1, 2",
            (newsletter,),
        ).fetchall()
        ended = self.db.execute(
            f"SELECT {hour.format('e.ended')}, e.how, count(*) FROM (SELECT"
            f" {_ENDED_AT} AS ended, {_ENDED_HOW} AS how FROM subscriptions b"
            " JOIN subscribers s ON s.id = b.subscriber_id WHERE b.newsletter = $1"
            " AND (b.status != 'active' OR s.status != 'active')) e GROUP BY 1, 2 ORDER BY 1, 2",
            (newsletter,),
        ).fetchall()
        (active,) = self.db.execute(
            "SELECT count(*) FROM subscriptions b JOIN subscribers s ON s.id = b.subscriber_id"
            " WHERE b.newsletter = $1 AND b.status = 'active' AND s.status = 'active'",
            (newsletter,),
        ).fetchone()
        return Moves(
            [(str(h), str(k), int(n)) for h, k, n in joined],
            [(str(h), str(k), int(n)) for h, k, n in ended],
            int(active),
        )

    def sends(self, newsletter: str, since: str) -> list[SendFigures]:
        """Return the outcomes of `newsletter`'s sends started at `since` (a stored time)
        or later, the oldest first."""
        rows = self.db.execute(
            "SELECT x.issue, x.subject, x.created_at, count(d.send_id),"
            " count(*) FILTER (WHERE d.state = 'sent' AND d.bounce NOT LIKE 'hard:%'),"
            " count(*) FILTER (WHERE d.state = 'failed'),"
            " count(*) FILTER (WHERE d.bounce LIKE 'hard:%'),"
            " count(*) FILTER (WHERE d.bounce LIKE 'soft:%'),"
            " count(*) FILTER (WHERE d.complaint != ''),"
            " count(*) FILTER (WHERE b.status = 'unsubscribed'"
            " AND b.status_changed_at >= x.created_at"
            f" AND b.status_changed_at < {_WEEK_AFTER[self.db.dialect]})"
            " FROM sends x LEFT JOIN deliveries d ON d.send_id = x.id"
            " LEFT JOIN subscriptions b ON b.subscriber_id = d.subscriber_id"
            " AND b.newsletter = x.newsletter"
            " WHERE x.newsletter = $1 AND x.created_at >= $2"
            " GROUP BY x.id, x.issue, x.subject, x.created_at ORDER BY x.created_at, x.id",
            (newsletter, since),
        ).fetchall()
        return [
            SendFigures(str(issue), str(subject), str(started), *(int(n) for n in counts))
            for issue, subject, started, *counts in rows
        ]
