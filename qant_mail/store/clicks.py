"""Counted links ([audience] count_clicks): where each link of an issue leads (`links`),
and how many times it was followed each day (`clicks`). Nothing here names a reader, an
address or a device: a count is all there is."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from qant_mail.store.db import Db, transaction


@dataclass(frozen=True)
class LinkCount:
    """One counted link of an issue, and how often it was followed in all."""

    newsletter: str
    issue: str
    number: int
    url: str
    clicks: int


class Clicks:
    """The counted links of the store `db`."""

    def __init__(self, db: Db) -> None:
        self.db = db

    def register(self, newsletter: str, issue: str, urls: Sequence[str]) -> None:
        """Say where links 1, 2, … of `issue` lead (kept as first said: a resumed send,
        or another host, says the same)."""
        self.db.executemany(
            "INSERT INTO links (issue, n, newsletter, url) VALUES ($1, $2, $3, $4)"
            " ON CONFLICT (issue, n) DO NOTHING",
            [(issue, number, newsletter, url) for number, url in enumerate(urls, start=1)],
        )

    def target(self, issue: str, number: int) -> str | None:
        """Return where link `number` of `issue` leads, if it exists (nothing counted)."""
        row = self.db.execute(
            "SELECT url FROM links WHERE issue = $1 AND n = $2", (issue, number)
        ).fetchone()
        return str(row[0]) if row is not None else None

    def follow(self, issue: str, number: int, day: str) -> str | None:
        """Return where link `number` of `issue` leads, and count it followed on `day`
        (ISO date); None for a link that does not exist (nothing counted)."""
        with transaction(self.db) as db:
            row = db.execute(
                "SELECT url FROM links WHERE issue = $1 AND n = $2", (issue, number)
            ).fetchone()
            if row is None:
                return None
            db.execute(
                "INSERT INTO clicks (issue, n, day, clicks) VALUES ($1, $2, $3, 1)"
                " ON CONFLICT (issue, n, day) DO UPDATE SET clicks = clicks.clicks + 1",
                (issue, number, day),
            )
            return str(row[0])

    def counts(self, since: str = "") -> list[LinkCount]:
        """Return every counted link with its clicks since `since` (ISO date; "": all),
        issue by issue, in the order of the message."""
        rows = self.db.execute(
            "SELECT l.newsletter, l.issue, l.n, l.url, coalesce(sum(c.clicks), 0)"
            " FROM links l LEFT JOIN clicks c ON c.issue = l.issue AND c.n = l.n AND c.day >= $1"
            " GROUP BY l.newsletter, l.issue, l.n, l.url ORDER BY l.issue, l.n",
            (since,),
        ).fetchall()
        return [LinkCount(str(nl), str(i), int(n), str(u), int(c)) for nl, i, n, u, c in rows]
