"""The outbox's queue of messages to one reader (`outbox` table): each message waits
here, composed, until it is delivered, refused for good, or too old to be of use."""

from __future__ import annotations

import enum
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

from qant_mail.store.db import Db, now_text, transaction


class Mail(enum.StrEnum):
    """Where one queued message stands."""

    PENDING = "pending"  # waiting for its (next) try
    SENDING = "sending"  # handed to a connection by a drain, under a lease
    SENT = "sent"  # the relay accepted it
    FAILED = "failed"  # refused for good (5xx)
    UNKNOWN = "unknown"  # the connection broke after its data: maybe delivered
    EXPIRED = "expired"  # not delivered before it was of no use (a link that expired)


DONE = (Mail.SENT, Mail.FAILED, Mail.UNKNOWN, Mail.EXPIRED)


@dataclass(frozen=True)
class QueuedMail:
    """A message taken from the queue to be tried."""

    id: int
    kind: str  # confirm, welcome, test…
    newsletter: str
    recipient: str
    message: bytes
    attempts: int
    expires_at: float


@dataclass(frozen=True)
class QueueEntry:
    """A queued message as `qant-mail outbox` lists it (without its content)."""

    id: int
    kind: str
    newsletter: str
    recipient: str
    state: Mail
    attempts: int
    next_attempt_at: float
    expires_at: float
    last_reply: str
    created_at: str
    updated_at: str


@dataclass
class Waiting:
    """What the queue holds that is not done yet."""

    by_kind: Counter[str] = field(default_factory=Counter)
    oldest: str | None = None  # when the oldest waiting message was queued
    next_attempt_at: float | None = None
    last_reply: str = ""  # the latest reply to a waiting message that was tried

    @property
    def total(self) -> int:
        """Return how many messages wait."""
        return sum(self.by_kind.values())


_ENTRY = (
    "id, kind, newsletter, recipient, state, attempts, next_attempt_at, expires_at,"
    " last_reply, created_at, updated_at"
)


class MailQueue:
    """The queue in the store `db` is connected to."""

    def __init__(self, db: Db) -> None:
        self.db = db

    def add(
        self,
        *,
        kind: str,
        newsletter: str,
        recipient: str,
        message: bytes,
        expires_at: float,
        state: Mail = Mail.PENDING,
    ) -> int:
        """Queue a message (in the caller's transaction, if one is open); return its number."""
        now = now_text()
        (number,) = self.db.execute(
            "INSERT INTO outbox (kind, newsletter, recipient, message, state, expires_at,"
            " created_at, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?) RETURNING id",
            (kind, newsletter, recipient, message, state.value, expires_at, now, now),
        ).fetchone()
        return int(number)

    def claim(
        self, limit: int, now: float, *, worker: str, lease: float, ids: Sequence[int] = ()
    ) -> list[QueuedMail]:
        """Mark up to `limit` due messages `sending` under a lease, and return them (only
        those numbered `ids`, when given). Messages past their expiry are marked expired
        instead; those a drain that died held past its lease are due again."""
        with transaction(self.db) as db:
            db.execute(
                "UPDATE outbox SET state = 'expired', message = ?, updated_at = ?"
                " WHERE state = 'pending' AND expires_at < ?",
                (b"", now_text(), now),
            )
            lock = " FOR UPDATE SKIP LOCKED" if db.dialect == "postgresql" else ""
            only = f" AND id IN ({', '.join('?' * len(ids))})" if ids else ""
            rows = db.execute(
                "SELECT id, kind, newsletter, recipient, message, attempts, expires_at"
                " FROM outbox WHERE ((state = 'pending' AND next_attempt_at <= ?)"
                " OR (state = 'sending' AND lease_until < ?))"
                + only
                + " ORDER BY id LIMIT ?"
                + lock,
                (now, now, *ids, limit),
            ).fetchall()
            db.executemany(
                "UPDATE outbox SET state = 'sending', worker = ?, lease_until = ?, updated_at = ?"
                " WHERE id = ?",
                [(worker, now + lease, now_text(), row[0]) for row in rows],
            )
        return [
            QueuedMail(int(i), str(k), str(n), str(r), bytes(m), int(a), float(e))
            for i, k, n, r, m, a, e in rows
        ]

    def record(
        self, number: int, state: Mail, reply: str, *, retry_at: float = 0.0, attempt: bool = True
    ) -> None:
        """Write how a try of message `number` went: done (its content is dropped: what
        is kept is the record), or pending again until `retry_at`."""
        content = ", message = ?" if state in DONE else ""
        self.db.execute(
            "UPDATE outbox SET state = ?, last_reply = ?, attempts = attempts + ?,"
            f" next_attempt_at = ?, worker = '', updated_at = ?{content} WHERE id = ?",
            (
                state.value,
                reply,
                int(attempt),
                retry_at,
                now_text(),
                *((b"",) if content else ()),
                number,
            ),
        )

    def release(self, numbers: Sequence[int]) -> None:
        """Give back messages that were claimed but not tried (a drain that stopped)."""
        self.db.executemany(
            "UPDATE outbox SET state = 'pending', worker = '' WHERE id = ? AND state = 'sending'",
            [(n,) for n in numbers],
        )

    def next_due(self) -> float | None:
        """Return when the next waiting message is due, if any waits."""
        (due,) = self.db.execute(
            "SELECT min(next_attempt_at) FROM outbox WHERE state = 'pending'"
        ).fetchone()
        return None if due is None else float(due)

    def waiting(self) -> Waiting:
        """Return what waits to be delivered (pending, or being tried now)."""
        found = Waiting()
        for kind, number, oldest, due in self.db.execute(
            "SELECT kind, count(*), min(created_at), min(next_attempt_at) FROM outbox"
            " WHERE state IN ('pending', 'sending') GROUP BY kind ORDER BY kind"
        ):
            found.by_kind[str(kind)] = int(number)
            found.oldest = min(filter(None, (found.oldest, str(oldest))))
            found.next_attempt_at = min(
                v for v in (found.next_attempt_at, float(due)) if v is not None
            )
        row = self.db.execute(
            "SELECT last_reply FROM outbox WHERE state IN ('pending', 'sending')"
            " AND last_reply != '' ORDER BY updated_at DESC, id DESC LIMIT 1"
        ).fetchone()
        found.last_reply = str(row[0]) if row else ""
        return found

    def entries(self, states: Sequence[Mail], limit: int = 100) -> list[QueueEntry]:
        """Return the latest messages in `states`, the newest first."""
        marks = ", ".join("?" * len(states))
        rows = self.db.execute(
            f"SELECT {_ENTRY} FROM outbox WHERE state IN ({marks}) ORDER BY id DESC LIMIT ?",
            (*(s.value for s in states), limit),
        ).fetchall()
        return [
            QueueEntry(
                int(i),
                str(k),
                str(n),
                str(r),
                Mail(str(s)),
                int(a),
                float(d),
                float(e),
                str(reply),
                str(c),
                str(u),
            )
            for i, k, n, r, s, a, d, e, reply, c, u in rows
        ]

    def counts(self) -> dict[Mail, int]:
        """Return how many messages the queue has kept in each state."""
        counts = dict.fromkeys(Mail, 0)
        for state, number in self.db.execute("SELECT state, count(*) FROM outbox GROUP BY state"):
            counts[Mail(str(state))] = int(number)
        return counts
