"""Approvals of exactly what goes out (`approvals`), and the message each send sent
(`send_messages`): what `approve`, `send`, `status` and `sends show --eml` read and write,
from any host of the store."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from qant_mail.store.db import Db, now_text


@dataclass(frozen=True)
class Approval:
    """Who approved which message of an issue, and when; and what it said."""

    issue: str
    newsletter: str
    digest: str  # of the message before personalisation (MessageTemplate.digest)
    approver: str
    approved_at: str  # ISO 8601, UTC
    subject: str
    preheader: str
    html: str
    text: str
    size: int
    message: bytes  # the message as kept (MessageTemplate.frozen)


_COLUMNS = (
    "issue, newsletter, digest, approver, approved_at, subject, preheader, html, text, size,"
    " message"
)


class Approvals:
    """The approvals and the sent messages of the store `db`."""

    def __init__(self, db: Db) -> None:
        self.db = db

    def add(
        self,
        *,
        issue: str,
        newsletter: str,
        digest: str,
        approver: str,
        subject: str,
        preheader: str,
        html: str,
        text: str,
        size: int,
        message: bytes,
    ) -> Approval:
        """Record an approval (the earlier ones stay, as history); return it."""
        approval = Approval(
            issue, newsletter, digest, approver, now_text(), subject, preheader, html, text,
            size, message,
        )  # fmt: skip
        self.db.execute(
            f"INSERT INTO approvals ({_COLUMNS}) VALUES"
            " ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)",
            (
                approval.issue,
                approval.newsletter,
                approval.digest,
                approval.approver,
                approval.approved_at,
                approval.subject,
                approval.preheader,
                approval.html,
                approval.text,
                approval.size,
                approval.message,
            ),
        )
        return approval

    def latest(self, newsletter: str, issue: str) -> Approval | None:
        """Return the last approval of `issue` of `newsletter`, if any."""
        row = self.db.execute(
            f"SELECT {_COLUMNS} FROM approvals WHERE newsletter = $1 AND issue = $2"
            " ORDER BY id DESC LIMIT 1",
            (newsletter, issue),
        ).fetchone()
        return _approval(row) if row is not None else None

    def latest_of_each(self) -> dict[tuple[str, str], Approval]:
        """Return the last approval of every approved issue, by (newsletter, issue)."""
        rows = self.db.execute(
            f"SELECT {_COLUMNS} FROM approvals a WHERE id ="
            " (SELECT max(id) FROM approvals b WHERE b.newsletter = a.newsletter"
            " AND b.issue = a.issue)"
        ).fetchall()
        found = [_approval(row) for row in rows]
        return {(a.newsletter, a.issue): a for a in found}

    def keep_sent(
        self, send_id: int, digest: str, message: Callable[[], bytes]
    ) -> tuple[str, bytes]:
        """Keep the message a send sends (`message()`, made only if none is kept yet),
        the first time it starts; return the digest and the message kept (a resumed send
        goes on with the message its first run sent; of two hosts starting at once, the
        first to write it wins)."""
        kept = self._sent(send_id)
        if kept is None:
            self.db.execute(
                "INSERT INTO send_messages (send_id, digest, message, created_at)"
                " VALUES ($1, $2, $3, $4) ON CONFLICT (send_id) DO NOTHING",
                (send_id, digest, message(), now_text()),
            )
            kept = self._sent(send_id)
        assert kept is not None  # written just now, or before
        return kept

    def _sent(self, send_id: int) -> tuple[str, bytes] | None:
        row = self.db.execute(
            "SELECT digest, message FROM send_messages WHERE send_id = $1", (send_id,)
        ).fetchone()
        return (str(row[0]), bytes(row[1])) if row is not None else None

    def sent(self, send_id: int) -> bytes | None:
        """Return the message send `send_id` sent, if it was kept."""
        kept = self._sent(send_id)
        return kept[1] if kept is not None else None


def _approval(row: tuple[object, ...]) -> Approval:
    issue, newsletter, digest, approver, at, subject, preheader, html, text, size, message = row
    return Approval(
        str(issue), str(newsletter), str(digest), str(approver), str(at), str(subject),
        str(preheader), str(html), str(text), int(size), bytes(message),  # type: ignore[call-overload]
    )  # fmt: skip
