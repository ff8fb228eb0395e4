"""The outbox's queue of messages to one reader (`outbox` table): each message waits
here, composed, until it is delivered, refused for good, or too old to be of use."""

from __future__ import annotations

import enum
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

from qant_mail.store.db import Db, marks, now_text, transaction
from qant_mail.store.ledger import count_quota


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
    ) -> int:
        """Queue a message (in the caller's transaction, if one is open); return its number."""
        now = now_text()
        (number,) = self.db.execute(
            "INSERT INTO outbox (kind, newsletter, recipient, message, expires_at,"
            " created_at, updated_at) VALUES ($1, $2, $3, $4, $5, $6, $7) RETURNING id",
            (kind, newsletter, recipient, message, expires_at, now, now),
        ).fetchone()
        return int(number)

    def note(
        self,
        *,
        kind: str,
        newsletter: str,
        recipient: str,
        state: Mail,
        reply: str,
        minute: int | None = None,
        relay: str = "",
    ) -> None:
        """Record a message delivered at once, outside the queue (a test): how it went
        and the relay that answered, in one commit with the count of its minute."""
        now = now_text()
        with transaction(self.db) as db:
            db.execute(
                "INSERT INTO outbox (kind, newsletter, recipient, message, state, attempts,"
                " expires_at, last_reply, created_at, updated_at, relay)"
                " VALUES ($1, $2, $3, $4, $5, 1, 0, $6, $7, $8, $9)",
                (kind, newsletter, recipient, b"", state.value, reply, now, now, relay),
            )
            if minute is not None:
                count_quota(db, minute)

    def claim(
        self,
        now: float,
        *,
        worker: str,
        lease: float,
        newsletters: Sequence[str],
        ids: Sequence[int] = (),
    ) -> QueuedMail | None:
        """Mark the next due message of `newsletters` (only among `ids`, when given)
        `sending`, held by `worker` until `now + lease`, and return it. Messages past
        their expiry are marked expired instead; one a drain that died held past its
        lease is due again. One at a time: a hold is never older than one message."""
        if not newsletters:
            return None
        with transaction(self.db) as db:
            db.execute(
                "UPDATE outbox SET state = 'expired', message = $1, updated_at = $2"
                " WHERE state = 'pending' AND expires_at < $3",
                (b"", now_text(), now),
            )
            lock = " FOR UPDATE SKIP LOCKED" if db.dialect == "postgresql" else ""
            among = f" AND newsletter IN ({marks(3, len(newsletters))})"
            only = f" AND id IN ({marks(3 + len(newsletters), len(ids))})" if ids else ""
            row = db.execute(
                "SELECT id, kind, newsletter, recipient, message, attempts, expires_at"
                " FROM outbox WHERE ((state = 'pending' AND next_attempt_at <= $1)"
                " OR (state = 'sending' AND lease_until < $2))"
                + among
                + only
                + " ORDER BY id LIMIT 1"
                + lock,
                (now, now, *newsletters, *ids),
            ).fetchone()
            if row is None:
                return None
            db.execute(
                "UPDATE outbox SET state = 'sending', worker = $1, lease_until = $2,"
                " updated_at = $3 WHERE id = $4",
                (worker, now + lease, now_text(), row[0]),
            )
        number, kind, newsletter, recipient, message, attempts, expires = row
        return QueuedMail(
            int(number),
            str(kind),
            str(newsletter),
            str(recipient),
            bytes(message),
            int(attempts),
            float(expires),
        )

    def record(
        self,
        number: int,
        state: Mail,
        reply: str,
        *,
        worker: str,
        retry_at: float = 0.0,
        minute: int | None = None,
        relay: str = "",
    ) -> bool:
        """Write how the try of message `number` by `worker` went, and the relay that
        answered, in one commit with the count of its minute (`minute`, when the relay
        was given it): done (its content is dropped: what is kept is the record), or
        pending again until `retry_at`. Return False, writing nothing, when `worker` no
        longer holds it."""
        content = ", message = $8" if state in DONE else ""
        with transaction(self.db) as db:
            held = db.execute(
                "UPDATE outbox SET state = $1, last_reply = $2, attempts = attempts + 1,"
                f" next_attempt_at = $3, worker = '', updated_at = $4, relay = $5{content}"
                " WHERE id = $6 AND state = 'sending' AND worker = $7",
                (
                    state.value,
                    reply,
                    retry_at,
                    now_text(),
                    relay,
                    number,
                    worker,
                    *((b"",) if content else ()),
                ),
            ).rowcount
            if minute is not None:
                count_quota(db, minute)
        return bool(held)

    def release(self, number: int, *, worker: str) -> None:
        """Give back a message claimed but not tried (a drain that stopped)."""
        self.db.execute(
            "UPDATE outbox SET state = 'pending', worker = '' WHERE id = $1"
            " AND state = 'sending' AND worker = $2",
            (number, worker),
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
        rows = self.db.execute(
            f"SELECT {_ENTRY} FROM outbox WHERE state IN ({marks(1, len(states))})"
            f" ORDER BY id DESC LIMIT ${len(states) + 1}",
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
