"""The send ledger (SQLite): one row per (issue, recipient), its state and last reply."""

from __future__ import annotations

import contextlib
import datetime as dt
import enum
import fcntl
import hashlib
import os
import socket
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from qant_mail.base.config import DEFAULT_NEWSLETTER
from qant_mail.base.errors import QantError
from qant_mail.store.db import (
    Db,
    IntegrityError,
    StoreError,
    StoreTarget,
    contains,
    is_postgres,
    marks,
    now_text,
    open_store,
    transaction,
)
from qant_mail.store.sql import one_at_a_time, row_lock
from qant_mail.store.subscribers import Status, Subscribers


class State(enum.StrEnum):
    """Where one message of a send stands."""

    PENDING = "pending"  # planned, not tried yet (or tried and not handed over)
    SENDING = "sending"  # handed to a connection; written before MAIL FROM
    SENT = "sent"  # the server answered 250 to the data
    DEFERRED = "deferred"  # a temporary (4xx) refusal: tried again later
    FAILED = "failed"  # a permanent (5xx) refusal, or too many temporary ones
    UNKNOWN = "unknown"  # the connection dropped after the data: maybe delivered
    SKIPPED = "skipped"  # the subscriber left the list after the send started


# A row in one of these states is still to be sent (a `sending` one, by a run now, or
# again after a run that stopped).
LEFT = (State.PENDING, State.DEFERRED, State.SENDING)


def left(counts: Mapping[State, int]) -> int:
    """Return how many rows of a send are still to be sent, from its counts by state."""
    return sum(counts.get(state, 0) for state in LEFT)


class LedgerError(QantError):
    """A send that cannot start or go on (already running, changed issue)."""


@dataclass(frozen=True)
class Send:
    """One issue's send to the list."""

    id: int
    issue: str
    content_hash: str
    subject: str
    created_at: str
    finished_at: str | None
    newsletter: str = DEFAULT_NEWSLETTER


_SEND = "id, issue, content_hash, subject, created_at, finished_at, newsletter"


@dataclass(frozen=True)
class FeedbackTarget:
    """The message (and reader) a bounce or a complaint is about."""

    email: str
    subscriber_id: int | None
    issue: str = ""
    send_id: int | None = None
    position: int | None = None


# A reader's standing only ever gets stricter through feedback.
_STRICTNESS = {"active": 0, "unsubscribed": 1, "bounced": 2, "complained": 3}


@dataclass
class Requeued:
    """What a re-queue did: how many rows go out again, and which were refused."""

    requeued: int = 0
    refused: list[tuple[str, str]] = field(default_factory=list)  # (address, status)
    missing: list[str] = field(default_factory=list)  # asked for, but not failed here


@dataclass(frozen=True)
class Delivery:
    """One planned message."""

    position: int
    subscriber_id: int | None
    email: str
    name: str
    state: State
    attempts: int
    last_reply: str


@dataclass(frozen=True)
class Schedule:
    """A send set for a time: the issue, its file, when (UTC), and how it went."""

    issue: str
    path: Path
    due_at: dt.datetime
    state: str  # scheduled, running, sent, failed, cancelled
    outcome: str
    updated_at: str


_SCHEDULE = "issue, path, due_at, state, outcome, updated_at"


def _schedule(row: tuple[str, str, str, str, str, str]) -> Schedule:
    issue, path, due_at, state, outcome, updated_at = row
    return Schedule(
        issue, Path(path), dt.datetime.fromisoformat(due_at), state, outcome, updated_at
    )


@dataclass(frozen=True)
class SendSummary:
    """One send as the history shows it: its counts, and what came back afterwards."""

    send: Send
    counts: dict[State, int]
    bounced: int  # hard bounces reported after it was accepted
    soft_bounced: int
    complaints: int
    unsubscribed: int  # its readers who have unsubscribed since it started
    running: bool = False  # a `send` of it is running now
    relays: dict[str, int] = field(default_factory=dict)  # messages each relay took

    @property
    def recipients(self) -> int:
        """Return how many readers the send was planned for."""
        return sum(self.counts.values())


@dataclass(slots=True)
class Outcome:
    """What became of one message of a send, to be written on its row."""

    position: int
    state: State
    reply: str
    attempt: bool = True  # whether it counts as an attempt
    retry_at: float = 0  # when a deferred message is tried again (Unix time)
    quota: Mapping[int, int] = field(default_factory=dict)  # messages per minute to count
    bounce: int | None = None  # the subscriber to mark bounced
    relay: str = ""  # the relay that answered


_DELIVERY = "position, subscriber_id, email, name, state, attempts, last_reply"


def _joined(newsletter: int, send: int) -> str:
    """Return the active subscribers a send has no row for (the UNIQUE (send_id, email)
    index finds each one): those who joined, or came back, after it was planned. The
    newsletter and the send are parameters `$newsletter` and `$send`."""
    return (
        "FROM subscriptions b JOIN subscribers s ON s.id = b.subscriber_id"
        f" WHERE b.newsletter = ${newsletter} AND b.status = 'active' AND s.status = 'active'"
        " AND NOT EXISTS (SELECT 1 FROM deliveries d"
        f" WHERE d.send_id = ${send} AND d.email = s.email)"
    )


# Each row with its reader's status for the send's newsletter, now (parameters: $1 the
# newsletter, $2 the send): someone who left since the plan is skipped.
_CLAIM = (
    "SELECT d.position, d.subscriber_id, d.email, d.name, d.state, d.attempts, d.last_reply,"
    " CASE WHEN s.status != 'active' THEN s.status ELSE b.status END"
    " FROM deliveries d LEFT JOIN subscribers s ON s.id = d.subscriber_id"
    " LEFT JOIN subscriptions b ON b.subscriber_id = d.subscriber_id AND b.newsletter = $1"
    " WHERE d.send_id = $2"
)


# The most rows one claim takes, on PostgreSQL (see _CLAIM_SHARED): a sender's
# connections claim 32 at a time.
CLAIM_MOST = 32


# One claiming step on PostgreSQL (its words): the rows that meet `condition`, in `order`,
# that no other sender holds, marked sending, or skipped (with why) when their reader
# left since the plan. Parameters: $1 the newsletter, $2 the send, $3 now, $4 how many
# (at most CLAIM_MOST), $5 the sender, $6 its lease, $7 the time written.
# - The rows are locked CLAIM_MOST at a time, a constant, and $4 of them taken: with a
#   limit the planner knows, the plan it keeps for the statement (after five runs) is
#   as good as one made for the values, and the claim is no longer planned at each run
#   (half its server time). The rows locked and not taken are free again at its end.
# - The rows taken are found again by their key, the positions given as a list: joined
#   on the key alone, the planner hashed the whole send against a few dozen rows once
#   it knew how large the send is. (Not by ctid: a row another transaction changed
#   while this one ran is locked in its newest version, which the UPDATE's snapshot
#   cannot see by that address, and it would be dropped from the claim.)
_CLAIM_SHARED = (
    "WITH picked AS (SELECT d.position, d.next_attempt_at,"
    " d.subscriber_id IS NOT NULL AS known,"
    " CASE WHEN s.status != 'active' THEN s.status ELSE b.status END AS standing"
    " FROM deliveries d LEFT JOIN subscribers s ON s.id = d.subscriber_id"
    " LEFT JOIN subscriptions b ON b.subscriber_id = d.subscriber_id AND b.newsletter = $1"
    " WHERE d.send_id = $2 AND {condition} ORDER BY {order} LIMIT {most}"
    " FOR UPDATE OF d SKIP LOCKED),"
    " taken AS (SELECT * FROM picked ORDER BY {order} LIMIT $4)"
    " UPDATE deliveries d SET"
    " state = CASE WHEN p.standing = 'active' THEN 'sending' ELSE 'skipped' END,"
    " worker = CASE WHEN p.standing = 'active' THEN $5 ELSE '' END,"
    " lease_until = $6, updated_at = $7,"
    " last_reply = CASE WHEN p.standing = 'active' THEN d.last_reply"
    " ELSE 'not sent: the subscriber is ' || coalesce(p.standing,"
    " CASE WHEN p.known THEN 'not subscribed' ELSE 'no longer on the list' END) END"
    " FROM taken p WHERE d.send_id = $2"
    " AND d.position = ANY(ARRAY(SELECT position FROM taken)) AND d.position = p.position"
    " RETURNING d.position, d.subscriber_id, d.email, d.name, d.state, d.attempts,"
    " d.last_reply"
)


# The outcome of one message on its row. Parameters: $1 its state, $2 the reply, $3 1 if
# it counts as an attempt (else 0), $4 when to try again, $5 the time written, $6 the
# relay, $7 the send, $8 the row's position.
_RECORD = (
    "UPDATE deliveries SET state = $1, last_reply = $2, attempts = attempts + $3,"
    " next_attempt_at = $4, updated_at = $5, relay = $6"
    " WHERE send_id = $7 AND position = $8"
)


class Ledger:
    """The ledger of the database at `path`; each thread gets its own connection."""

    def __init__(self, path: StoreTarget) -> None:
        self.path = path
        self._local = threading.local()
        self.db  # noqa: B018 - open (and migrate) now, so that errors show up early

    @property
    def db(self) -> Db:
        """Return this thread's connection."""
        connection: Db | None = getattr(self._local, "db", None)
        if connection is None:
            connection = self._local.db = open_store(self.path)
        return connection

    def close(self) -> None:
        """Close this thread's connection."""
        connection = getattr(self._local, "db", None)
        if connection is not None:
            connection.close()
            self._local.db = None

    @contextlib.contextmanager
    def lock(self, issue: str) -> Iterator[None]:
        """Hold the lock that keeps a second process from sending the same issue."""
        with self._lock(issue) as held:
            if not held:
                raise LedgerError(
                    f"another `qant-mail send` is sending {issue} right now; wait for it, "
                    "or stop it (a re-run resumes where it left off)"
                )
            yield

    def find(self, issue: str) -> Send | None:
        """Return the send of `issue`, if one was planned."""
        row = self.db.execute(f"SELECT {_SEND} FROM sends WHERE issue = $1", (issue,)).fetchone()
        return Send(*row) if row else None

    def plan(
        self, issue: str, content_hash: str, subject: str, newsletter: str = DEFAULT_NEWSLETTER
    ) -> Send:
        """Freeze the recipients of `issue`: every active subscriber of its newsletter,
        once, in list order."""
        try:
            with transaction(self.db) as db:
                now = now_text()
                (send_id,) = db.execute(
                    "INSERT INTO sends (issue, content_hash, subject, created_at, newsletter)"
                    " VALUES ($1, $2, $3, $4, $5) RETURNING id",
                    (issue, content_hash, subject, now, newsletter),
                ).fetchone()
                # The UNIQUE (email) of subscribers already makes addresses distinct.
                db.execute(
                    "INSERT INTO deliveries"
                    " (send_id, position, subscriber_id, email, name, updated_at)"
                    " SELECT $1, row_number() OVER (ORDER BY s.id), s.id, s.email, s.name, $2"
                    " FROM subscriptions b JOIN subscribers s ON s.id = b.subscriber_id"
                    " WHERE b.newsletter = $3 AND b.status = 'active' AND s.status = 'active'",
                    (send_id, now, newsletter),
                )
        except IntegrityError as err:
            raise LedgerError(f"{issue} was planned by another process meanwhile") from err
        if self.shared:
            # The rows just written may be most of the table, and an import just before
            # may have filled the list: without fresh statistics PostgreSQL's plans for
            # this send's claims and records guess tables of a few rows, and scan the
            # whole send or list for each batch of 32 (autovacuum's own ANALYZE comes up
            # to a minute later, if at all). A sample of 30,000 rows a table, of the
            # columns the claims are planned on only: a third of the time of all of
            # them (3 ms against 9 for 3,000 readers). The send is planned by now:
            # statistics are worth a second's wait for their lock (a VACUUM elsewhere
            # holds it), not a stop. A role that does not own the tables gets a
            # warning from the server, and autovacuum's statistics.
            try:
                with transaction(self.db) as db:
                    db.execute("SET LOCAL lock_timeout = '1s'")
                    db.execute(
                        "ANALYZE deliveries (send_id, position, subscriber_id, state,"
                        " next_attempt_at, lease_until), subscribers (id, status),"
                        " subscriptions (subscriber_id, newsletter, status)"
                    )
            except StoreError:
                pass  # a lost connection shows at the next step, `find`
        send = self.find(issue)
        assert send is not None
        return send

    def joined_since(self, send: Send) -> int:
        """Return how many active subscribers the send has no row for: they joined (or
        came back) after it was planned."""
        (number,) = self.db.execute(
            f"SELECT count(*) {_joined(1, 2)}", (send.newsletter, send.id)
        ).fetchone()
        return int(number)

    def add_joined(self, send: Send) -> int:
        """Add the readers who joined since `send` was planned to it, after the others;
        return how many. The send is open again until they are served."""
        with transaction(self.db) as db:
            if self.shared:
                # Senders starting together with --new-subscribers add them one after
                # the other: the second finds them added. (PostgreSQL's words.)
                db.execute("SELECT pg_advisory_xact_lock($1)", (send.id,))
            (last,) = db.execute(
                "SELECT coalesce(max(position), 0) FROM deliveries WHERE send_id = $1", (send.id,)
            ).fetchone()
            added = db.execute(
                "INSERT INTO deliveries (send_id, position, subscriber_id, email, name, updated_at)"
                " SELECT $1, $2 + row_number() OVER (ORDER BY s.id), s.id, s.email, s.name, $3"
                f" {_joined(4, 1)}",
                (send.id, last, now_text(), send.newsletter),
            ).rowcount
            if added:
                db.execute("UPDATE sends SET finished_at = NULL WHERE id = $1", (send.id,))
        return int(added)

    @property
    def shared(self) -> bool:
        """Return whether several senders may work on one send at once (PostgreSQL),
        rather than one process holding the send's lock (SQLite)."""
        return self.db.dialect == "postgresql"

    def recover(self, send: Send, now: float | None = None, *, starting: str = "") -> int:
        """Put back the rows a killed run left `sending`; return how many. Shared, only
        those whose lease has run out, whose sender was a process of this host that is
        gone, or the sender `starting` itself (a new run of it has none in flight): the
        others belong to senders at work."""
        # (Only PostgreSQL is shared: its words, an array parameter.)
        lease = " AND (lease_until < $3 OR worker = ANY($4))" if self.shared else ""
        parameters: tuple[object, ...] = (now_text(), send.id)
        if self.shared:
            gone = [*self._gone_here(send), starting]
            parameters += (time.time() if now is None else now, gone)
        cursor = self.db.execute(
            "UPDATE deliveries SET state = 'pending', worker = '', updated_at = $1"
            " WHERE send_id = $2 AND state = 'sending'" + lease,
            parameters,
        )
        return int(cursor.rowcount)

    def _gone_here(self, send: Send) -> list[str]:
        """Return the senders of `send` that ran on this host and whose process is gone
        (killed): their rows need not wait for their lease to run out."""
        here = f"{socket.gethostname()}:"
        gone = []
        for (name,) in self.db.execute(
            "SELECT worker FROM workers WHERE send_id = $1 AND left_at IS NULL", (send.id,)
        ).fetchall():
            host, _, pid = str(name).rpartition(":")
            if f"{host}:" == here and pid.isdigit() and not _alive(int(pid)):
                gone.append(str(name))
        return gone

    def join(self, send: Send, worker: str, now: float | None = None) -> None:
        """Note that sender `worker` works on `send` from now on."""
        self.db.execute(
            "INSERT INTO workers (send_id, worker, started_at, seen_at) VALUES ($1, $2, $3, $4)"
            " ON CONFLICT (send_id, worker) DO UPDATE SET seen_at = excluded.seen_at,"
            " left_at = NULL",
            (send.id, worker, now_text(), time.time() if now is None else now),
        )

    def renew(self, send: Send, worker: str, lease: float, now: float | None = None) -> int:
        """Extend the lease of the rows sender `worker` holds, note that it is alive, and
        return how many senders work on the send (itself included)."""
        now = time.time() if now is None else now
        with transaction(self.db) as db:
            db.execute(
                "UPDATE deliveries SET lease_until = $1 WHERE send_id = $2 AND worker = $3"
                " AND state = 'sending'",
                (now + lease, send.id, worker),
            )
            db.execute(
                "UPDATE workers SET seen_at = $1 WHERE send_id = $2 AND worker = $3",
                (now, send.id, worker),
            )
            (alive,) = db.execute(
                "SELECT count(*) FROM workers WHERE send_id = $1 AND left_at IS NULL"
                " AND seen_at >= $2",
                (send.id, now - lease),
            ).fetchone()
        return max(1, int(alive))

    def next_release(self, send: Send, worker: str) -> float | None:
        """Return when the first hold of another sender on a row of `send` runs out (it
        is renewed while that sender lives); None when no other sender holds any."""
        (until,) = self.db.execute(
            "SELECT min(lease_until) FROM deliveries WHERE send_id = $1 AND state = 'sending'"
            " AND worker != $2",
            (send.id, worker),
        ).fetchone()
        return None if until is None else float(until)

    def leave(self, send: Send, worker: str) -> None:
        """Note that sender `worker` stopped working on `send`."""
        self.db.execute(
            "UPDATE workers SET left_at = $1 WHERE send_id = $2 AND worker = $3",
            (now_text(), send.id, worker),
        )

    def workers(self, send: Send, lease: float) -> list[tuple[str, str, bool, int]]:
        """Return each sender of `send`: its name, when it started, whether it is at
        work now, and how many rows it holds."""
        now = time.time()
        return [
            (str(name), str(started), left is None and seen >= now - lease, int(held))
            for name, started, seen, left, held in self.db.execute(
                "SELECT w.worker, w.started_at, w.seen_at, w.left_at, (SELECT count(*)"
                " FROM deliveries d WHERE d.send_id = w.send_id AND d.worker = w.worker"
                " AND d.state = 'sending') FROM workers w WHERE w.send_id = $1"
                " ORDER BY w.started_at",
                (send.id,),
            )
        ]

    def claim(
        self,
        send: Send,
        limit: int,
        now: float | None = None,
        *,
        worker: str = "",
        lease: float = 0.0,
    ) -> tuple[list[Delivery], list[int]]:
        """Mark up to `limit` due rows `sending` and return them, with the positions of
        those skipped because their subscriber left the list since the send started."""
        now = time.time() if now is None else now
        if self.shared:
            return self._claim_shared(send, limit, now, worker, lease)
        # Due retries first, then the next pending rows in list order: two queries that
        # each walk an index, where one with OR would sort the whole send. SQLite's BEGIN
        # IMMEDIATE lets one claim at a time.
        with transaction(self.db) as db:
            rows = db.execute(
                _CLAIM + " AND d.state = 'deferred' AND d.next_attempt_at <= $3"
                " ORDER BY d.next_attempt_at LIMIT $4",
                (send.newsletter, send.id, now, limit),
            ).fetchall()
            if len(rows) < limit:
                rows += db.execute(
                    _CLAIM + " AND d.state = 'pending' ORDER BY d.position LIMIT $3",
                    (send.newsletter, send.id, limit - len(rows)),
                ).fetchall()
            stamp = now_text()
            claimed: list[Delivery] = []
            skipped: list[tuple[str, str, int, int]] = []
            for position, sub_id, email, name, _, attempts, reply, status in rows:
                if status == "active":
                    claimed.append(
                        Delivery(position, sub_id, email, name, State.SENDING, attempts, reply)
                    )
                else:
                    gone = "not subscribed" if sub_id is not None else "no longer on the list"
                    why = f"not sent: the subscriber is {status or gone}"
                    skipped.append((why, stamp, send.id, position))
            db.executemany(
                "UPDATE deliveries SET state = 'sending', worker = $1, lease_until = $2,"
                " updated_at = $3 WHERE send_id = $4 AND position = $5",
                [(worker, now + lease, stamp, send.id, d.position) for d in claimed],
            )
            db.executemany(
                "UPDATE deliveries SET state = 'skipped', last_reply = $1, updated_at = $2"
                " WHERE send_id = $3 AND position = $4",
                skipped,
            )
        return claimed, [position for _, _, _, position in skipped]

    def _claim_shared(
        self, send: Send, limit: int, now: float, worker: str, lease: float
    ) -> tuple[list[Delivery], list[int]]:
        """Claim as `claim` does, in PostgreSQL's words: each step one statement that
        picks rows no other sender holds (SKIP LOCKED), marks them and returns them: due
        retries first, then pending rows in list order, then the rows of a sender whose
        lease ran out (it died). No transaction of several round trips around it."""
        claimed: list[Delivery] = []
        skipped: list[int] = []
        steps = (
            ("d.state = 'deferred' AND d.next_attempt_at <= $3", "next_attempt_at, position"),
            ("d.state = 'pending'", "position"),
            ("d.state = 'sending' AND d.lease_until < $3", "position"),
        )
        limit = min(limit, CLAIM_MOST)
        stamp = now_text()
        for condition, order in steps:
            wanted = limit - len(claimed) - len(skipped)
            if wanted <= 0:
                break
            for position, sub_id, email, name, state, attempts, reply in self.db.execute(
                _CLAIM_SHARED.format(condition=condition, order=order, most=CLAIM_MOST),
                (send.newsletter, send.id, now, wanted, worker, now + lease, stamp),
            ):
                if state == State.SENDING:
                    claimed.append(
                        Delivery(position, sub_id, email, name, State.SENDING, attempts, reply)
                    )
                else:
                    skipped.append(position)
        return claimed, skipped

    def record(
        self,
        send: Send,
        position: int,
        state: State,
        reply: str,
        *,
        attempt: bool = True,
        retry_at: float = 0,
        quota: Mapping[int, int] | None = None,
        bounce: int | None = None,
        relay: str = "",
    ) -> None:
        """Write the outcome of one message, and the relay that answered; once this
        returns, it survives a killed process. Also count `quota` (messages per minute)
        and mark the subscriber `bounce` bounced, in the same commit."""
        values = (state.value, reply, int(attempt), retry_at, now_text(), relay, send.id, position)
        if not quota and bounce is None:
            self.db.write(_RECORD, values)  # one statement, its own transaction
            return
        with transaction(self.db) as db:
            db.execute(_RECORD, values)
            for minute, messages in (quota or {}).items():
                count_quota(db, minute, messages)
            if bounce is not None:
                Subscribers(db).set_status_by_id(bounce, Status.BOUNCED, reply)

    def record_many(self, send: Send, outcomes: Sequence[Outcome]) -> None:
        """Write the outcomes of several messages in one commit (each as `record` does);
        once this returns, all of them survive a killed process, and before, none."""
        if len(outcomes) == 1:
            one = outcomes[0]
            self.record(
                send,
                one.position,
                one.state,
                one.reply,
                attempt=one.attempt,
                retry_at=one.retry_at,
                quota=one.quota,
                bounce=one.bounce,
                relay=one.relay,
            )
            return
        now = now_text()
        with transaction(self.db) as db:
            db.executemany(
                _RECORD,
                [
                    (
                        o.state.value,
                        o.reply,
                        int(o.attempt),
                        o.retry_at,
                        now,
                        o.relay,
                        send.id,
                        o.position,
                    )
                    for o in outcomes
                ],
            )
            for outcome in outcomes:
                for minute, messages in outcome.quota.items():
                    count_quota(db, minute, messages)
                if outcome.bounce is not None:
                    Subscribers(db).set_status_by_id(outcome.bounce, Status.BOUNCED, outcome.reply)

    def release(self, send: Send, positions: list[int]) -> None:
        """Give back rows that were claimed but not tried (a stop, a limit reached)."""
        self.db.executemany(
            "UPDATE deliveries SET state = 'pending' WHERE send_id = $1 AND position = $2"
            " AND state = 'sending'",
            [(send.id, p) for p in positions],
        )

    def relays(self, send: Send) -> dict[str, int]:
        """Return how many of the send's messages each relay took, the most first."""
        rows = self.db.execute(
            "SELECT relay, count(*) FROM deliveries WHERE send_id = $1 AND state = 'sent'"
            " AND relay != '' GROUP BY relay ORDER BY count(*) DESC, relay",
            (send.id,),
        )
        return {str(relay): int(number) for relay, number in rows}

    def counts(self, send: Send) -> dict[State, int]:
        """Return the number of rows in each state."""
        counts = dict.fromkeys(State, 0)
        for state, number in self.db.execute(
            "SELECT state, count(*) FROM deliveries WHERE send_id = $1 GROUP BY state", (send.id,)
        ):
            counts[State(state)] = number
        return counts

    def deliveries(self, send: Send, *states: State) -> list[Delivery]:
        """Return the rows in the given states, in list order."""
        rows = self.db.execute(
            f"SELECT {_DELIVERY} FROM deliveries WHERE send_id = $1"
            f" AND state IN ({marks(2, len(states))})"
            " ORDER BY position",
            (send.id, *(s.value for s in states)),
        )
        return [Delivery(p, s, e, n, State(st), a, r) for p, s, e, n, st, a, r in rows]

    def next_retry(self, send: Send) -> float | None:
        """Return when the earliest deferred row is due, if any."""
        (due,) = self.db.execute(
            "SELECT min(next_attempt_at) FROM deliveries WHERE send_id = $1 AND state = 'deferred'",
            (send.id,),
        ).fetchone()
        return float(due) if due is not None else None

    def resolve_unknown(self, send: Send, state: State) -> int:
        """Re-queue the unknown rows (`pending`) or mark them `sent`; return how many."""
        reply = "marked sent by the operator" if state is State.SENT else ""
        cursor = self.db.execute(
            "UPDATE deliveries SET state = $1, last_reply = CASE WHEN $2 != '' THEN $3"
            " ELSE last_reply END, updated_at = $4 WHERE send_id = $5 AND state = 'unknown'",
            (state.value, reply, reply, now_text(), send.id),
        )
        return int(cursor.rowcount)

    def requeue_failed(
        self,
        send: Send,
        *,
        containing: str = "",
        addresses: Sequence[str] = (),
        force: bool = False,
    ) -> Requeued:
        """Put failed rows back in the queue: those whose last reply contains `containing`
        and, if given, only these `addresses`. A hard bounce (its subscriber marked
        bounced) goes back only with `force`, which re-activates the subscriber; a
        complaint never does."""
        query = (
            "SELECT d.position, d.subscriber_id, d.email, s.status FROM deliveries d"
            " LEFT JOIN subscribers s ON s.id = d.subscriber_id"
            " WHERE d.send_id = $1 AND d.state = 'failed'"
            f" AND {contains(self.db, 'lower(d.last_reply)', '$2')}"
        )
        wanted = {a.strip().lower() for a in addresses}
        rows = [
            row
            for row in self.db.execute(query, (send.id, containing.lower())).fetchall()
            if not wanted or str(row[2]).lower() in wanted
        ]
        result = Requeued()
        now = now_text()
        with transaction(self.db) as db:
            for position, subscriber_id, email, status in rows:
                if status == "complained" or (status == "bounced" and not force):
                    result.refused.append((str(email), str(status)))
                    continue
                if status == "bounced":
                    Subscribers(db).set_status_by_id(
                        subscriber_id, Status.ACTIVE, "re-queued by the operator"
                    )
                db.execute(
                    "UPDATE deliveries SET state = 'pending', attempts = 0, next_attempt_at = 0,"
                    " last_reply = 'failed, re-queued: ' || last_reply, updated_at = $1"
                    " WHERE send_id = $2 AND position = $3",
                    (now, send.id, position),
                )
                result.requeued += 1
            if result.requeued:
                db.execute("UPDATE sends SET finished_at = NULL WHERE id = $1", (send.id,))
        result.missing = sorted(wanted - {str(row[2]).lower() for row in rows})
        return result

    def feedback_counts(self, send: Send) -> tuple[int, int, int]:
        """Return how many of the send's messages bounced later (hard, soft) and drew a
        complaint."""
        row = self.db.execute(
            "SELECT count(*) FILTER (WHERE bounce LIKE 'hard:%'),"
            " count(*) FILTER (WHERE bounce LIKE 'soft:%'), count(*) FILTER (WHERE complaint != '')"
            " FROM deliveries WHERE send_id = $1",
            (send.id,),
        ).fetchone()
        return int(row[0] or 0), int(row[1] or 0), int(row[2] or 0)

    def history(self) -> list[SendSummary]:
        """Return every send, the latest first, with its counts and its aftermath."""
        db = self.db
        sends = [
            Send(*row)
            for row in db.execute(f"SELECT {_SEND} FROM sends ORDER BY created_at DESC, id DESC")
        ]
        counts: dict[int, dict[State, int]] = {s.id: dict.fromkeys(State, 0) for s in sends}
        relays: dict[int, dict[str, int]] = {s.id: {} for s in sends}
        for send_id, state, relay, number in db.execute(
            "SELECT send_id, state, relay, count(*) FROM deliveries GROUP BY send_id, state, relay"
        ):
            counts[send_id][State(state)] += number
            if state == State.SENT.value and relay:
                relays[send_id][relay] = number
        feedback = {
            send_id: (int(hard or 0), int(soft or 0), int(complaints or 0))
            for send_id, hard, soft, complaints in db.execute(
                "SELECT send_id, count(*) FILTER (WHERE bounce LIKE 'hard:%'),"
                " count(*) FILTER (WHERE bounce LIKE 'soft:%'),"
                " count(*) FILTER (WHERE complaint != '') FROM deliveries GROUP BY send_id"
            )
        }
        unsubscribed = dict(
            db.execute(
                "SELECT d.send_id, count(*) FROM deliveries d JOIN sends x ON x.id = d.send_id"
                " JOIN subscriptions b ON b.subscriber_id = d.subscriber_id"
                " AND b.newsletter = x.newsletter WHERE b.status = 'unsubscribed'"
                " AND b.status_changed_at >= x.created_at GROUP BY d.send_id"
            ).fetchall()
        )
        return [
            SendSummary(
                send,
                counts[send.id],
                *feedback.get(send.id, (0, 0, 0)),
                unsubscribed.get(send.id, 0),
                relays=dict(sorted(relays[send.id].items(), key=lambda r: (-r[1], r[0]))),
            )
            for send in sends
        ]

    def recent_rate(self, send: Send, seconds: int = 60) -> float:
        """Return the messages a second the send has dealt with over the last `seconds`."""
        since = dt.datetime.fromtimestamp(int(time.time()) - seconds, dt.UTC).isoformat()
        (number,) = self.db.execute(
            "SELECT count(*) FROM deliveries WHERE send_id = $1 AND state IN ('sent', 'failed')"
            " AND updated_at >= $2",
            (send.id, since),
        ).fetchone()
        return int(number) / seconds

    def schedule(self, issue: str, path: Path, due_at: dt.datetime) -> Schedule:
        """Set the send of `issue` (the file at `path`) for `due_at`; a later call moves it.
        A schedule whose send is running cannot be moved."""
        now = now_text()
        due = due_at.astimezone(dt.UTC).isoformat()
        with transaction(self.db) as db:
            row = db.execute(
                "SELECT state FROM schedules WHERE issue = $1" + row_lock(db), (issue,)
            ).fetchone()
            if row and row[0] == "running":
                raise LedgerError(f"{issue} is being sent by `qant-mail run-due` right now")
            db.execute(
                "INSERT INTO schedules (issue, path, due_at, state, outcome, created_at,"
                " updated_at) VALUES ($1, $2, $3, 'scheduled', '', $4, $5) ON CONFLICT (issue) DO"
                " UPDATE SET path = excluded.path, due_at = excluded.due_at,"
                " state = 'scheduled', outcome = '', updated_at = excluded.updated_at",
                (issue, str(path), due, now, now),
            )
        found = self.scheduled(issue)
        assert found is not None
        return found

    def scheduled(self, issue: str) -> Schedule | None:
        """Return the schedule of `issue`, if it has one."""
        row = self.db.execute(
            f"SELECT {_SCHEDULE} FROM schedules WHERE issue = $1", (issue,)
        ).fetchone()
        return _schedule(row) if row else None

    def schedules(self) -> list[Schedule]:
        """Return every schedule, the next due first."""
        rows = self.db.execute(f"SELECT {_SCHEDULE} FROM schedules ORDER BY due_at, issue")
        return [_schedule(row) for row in rows]

    def cancel(self, issue: str) -> bool:
        """Cancel the schedule of `issue`, unless its send is running; say if one was."""
        return bool(
            self.db.execute(
                "UPDATE schedules SET state = 'cancelled', updated_at = $1"
                " WHERE issue = $2 AND state = 'scheduled'",
                (now_text(), issue),
            ).rowcount
        )

    def take_due(self, now: dt.datetime) -> list[Schedule]:
        """Mark `running` the schedules due at `now`, and those a run that stopped left
        `running`, and return them, the earliest first. The caller holds `run_lock`."""
        with transaction(self.db) as db:
            db.execute(
                "UPDATE schedules SET state = 'running', updated_at = $1"
                " WHERE state = 'scheduled' AND due_at <= $2",
                (now_text(), now.astimezone(dt.UTC).isoformat()),
            )
            rows = db.execute(
                f"SELECT {_SCHEDULE} FROM schedules WHERE state = 'running' ORDER BY due_at"
            ).fetchall()
        return [_schedule(row) for row in rows]

    def settle(self, issue: str, state: str, outcome: str) -> None:
        """Write how a scheduled send went: `sent`, `failed`, or `scheduled` to try again."""
        self.db.execute(
            "UPDATE schedules SET state = $1, outcome = $2, updated_at = $3 WHERE issue = $4",
            (state, outcome, now_text(), issue),
        )

    def run_lock(self) -> contextlib.AbstractContextManager[bool]:
        """Hold the lock of `qant-mail run-due`; give False when another one holds it."""
        return self._lock("run-due")

    def _lock(self, name: str) -> contextlib.AbstractContextManager[bool]:
        """Hold the lock `name`: a file beside a SQLite store; an advisory lock of the
        PostgreSQL server, which every host sees. Both go with the process that dies."""
        if is_postgres(self.path):
            return _held_on_server(str(self.path), name)
        path = Path(self.path)
        return _held(path.with_name(f"{path.name}.{name}.lock"))

    def feedback_seen(self, digest: str) -> bool:
        """Return whether a report with this digest was read already."""
        row = self.db.execute("SELECT 1 FROM feedback_reports WHERE digest = $1", (digest,))
        return row.fetchone() is not None

    def note_feedback(self, digest: str, outcome: str) -> None:
        """Remember that a report was read (reading it again changes nothing)."""
        self.db.execute(
            "INSERT INTO feedback_reports (digest, outcome, read_at) VALUES ($1, $2, $3)"
            " ON CONFLICT (digest) DO NOTHING",
            (digest, outcome, now_text()),
        )

    def feedback_target(
        self,
        *,
        verp: tuple[int, int] | None = None,
        issue: str = "",
        email: str = "",
    ) -> FeedbackTarget | None:
        """Return the message a report is about: row `verp` (send, position), or the
        row of `email` in the send of `issue`; None when the ledger has no such row."""
        if verp is not None:
            row = self.db.execute(
                "SELECT d.email, d.subscriber_id, s.issue FROM deliveries d"
                " JOIN sends s ON s.id = d.send_id WHERE d.send_id = $1 AND d.position = $2",
                verp,
            ).fetchone()
            return None if row is None else FeedbackTarget(row[0], row[1], row[2], *verp)
        row = self.db.execute(
            "SELECT d.email, d.subscriber_id, s.issue, d.send_id, d.position"
            " FROM deliveries d JOIN sends s ON s.id = d.send_id"
            " WHERE s.issue = $1 AND d.email = $2",
            (issue, email.lower()),
        ).fetchone()
        return None if row is None else FeedbackTarget(*row)

    def record_feedback(
        self, target: FeedbackTarget, kind: str, detail: str, soft_limit: int
    ) -> str:
        """Write what a report says on the ledger's row and the subscriber; return the
        outcome ("hard", "soft" or "complaint")."""
        now = now_text()
        with transaction(self.db) as db:
            # Reports about one reader are read and decided on one at a time: two soft
            # bounces count twice, a bounce after a complaint leaves the complaint.
            one_at_a_time(db, f"reader {target.subscriber_id}")
            row = (target.send_id, target.position)
            if kind == "complaint":
                self._on_row(db, row, "complaint", detail or "abuse", now)
                self._stricter(db, target.subscriber_id, Status.COMPLAINED, detail)
                return kind
            if kind == "soft":
                already = db.execute(
                    "SELECT bounce FROM deliveries WHERE send_id = $1 AND position = $2", row
                ).fetchone()
                if target.send_id is None or not already or not already[0]:
                    # Counted once per issue: the same full mailbox reported twice is one.
                    db.execute(
                        "UPDATE subscribers SET soft_bounces = soft_bounces + 1 WHERE id = $1",
                        (target.subscriber_id,),
                    )
                self._on_row(db, row, "bounce", f"soft: {detail}".strip(), now)
                count = db.execute(
                    "SELECT soft_bounces FROM subscribers WHERE id = $1", (target.subscriber_id,)
                ).fetchone()
                if count is not None and count[0] >= soft_limit:
                    reason = f"{count[0]} soft bounces: {detail}".strip()
                    self._stricter(db, target.subscriber_id, Status.BOUNCED, reason)
                return kind
            self._on_row(db, row, "bounce", f"hard: {detail}".strip(), now)
            self._stricter(db, target.subscriber_id, Status.BOUNCED, detail)
            return "hard"

    @staticmethod
    def _on_row(
        db: Db,
        row: tuple[int | None, int | None],
        column: str,
        value: str,
        now: str,
    ) -> None:
        if row[0] is None:
            return  # a reader, but no message of ours in the ledger: the status says it
        db.execute(
            f"UPDATE deliveries SET {column} = $1, feedback_at = $2 WHERE send_id = $3"
            " AND position = $4",
            (value, now, *row),
        )

    @staticmethod
    def _stricter(db: Db, subscriber_id: int | None, status: Status, reason: str) -> None:
        if subscriber_id is None:
            return
        current = db.execute(
            "SELECT status FROM subscribers WHERE id = $1", (subscriber_id,)
        ).fetchone()
        if current is not None and _STRICTNESS[current[0]] < _STRICTNESS[status.value]:
            Subscribers(db).set_status_by_id(subscriber_id, status, reason or status.value)

    def running(self, issue: str, lease: float = 60.0) -> bool:
        """Return whether a `send` of `issue` is at work now: holds its lock (SQLite), or
        has a sender that renewed its lease lately (PostgreSQL)."""
        if self.shared:
            send = self.find(issue)
            return send is not None and any(alive for _, _, alive, _ in self.workers(send, lease))
        try:
            with self.lock(issue):
                return False
        except LedgerError:
            return True

    def finish(self, send: Send) -> None:
        """Note that nothing is left to do for this send."""
        self.db.execute(
            "UPDATE sends SET finished_at = $1 WHERE id = $2 AND finished_at IS NULL",
            (now_text(), send.id),
        )

    def quota_since(self, minute: int) -> dict[int, int]:
        """Return the messages sent per minute (Unix minutes) since `minute`."""
        return quota_since(self.db, minute)

    def count_quota(self, minute: int, messages: int = 1) -> None:
        """Add messages to the count of `minute`; forget counts older than a day."""
        count_quota(self.db, minute, messages)


def quota_since(db: Db, minute: int) -> dict[int, int]:
    """Return the messages sent per minute (Unix minutes) since `minute`, by every
    sender and every road out."""
    rows = db.execute("SELECT minute, messages FROM quota WHERE minute >= $1", (minute,))
    return {int(m): int(n) for m, n in rows.fetchall()}


def count_quota(db: Db, minute: int, messages: int = 1) -> None:
    """Add messages to the count of `minute` (Unix minutes), shared by every sender and
    every road out; forget counts older than a day."""
    db.execute(
        "INSERT INTO quota (minute, messages) VALUES ($1, $2)"
        " ON CONFLICT (minute) DO UPDATE SET messages = quota.messages + excluded.messages",
        (minute, messages),
    )
    if minute % 60 == 0:
        db.execute("DELETE FROM quota WHERE minute < $1", (minute - 24 * 60,))


def copy_without_send(source: StoreTarget, target: Path, issue: str) -> None:
    """Copy the store at `source` to the SQLite file `target`, less the send of `issue`
    (for a rehearsal of that send: a dry run)."""
    from qant_mail.store.db import copy_store

    copy_store(source, target)
    copy = open_store(target)
    try:
        with transaction(copy) as db:
            for table in ("deliveries", "workers"):
                db.execute(
                    f"DELETE FROM {table} WHERE send_id IN (SELECT id FROM sends WHERE issue = $1)",
                    (issue,),
                )
            db.execute("DELETE FROM sends WHERE issue = $1", (issue,))
    finally:
        copy.close()


def _alive(pid: int) -> bool:
    """Return whether process `pid` exists on this host."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process: alive
    return True


@contextlib.contextmanager
def _held_on_server(url: str, name: str) -> Iterator[bool]:
    """Hold a PostgreSQL advisory lock named `name` on a connection of its own (the
    server releases it when that connection ends, a killed process's included)."""
    db = open_store(url)
    try:
        digest = hashlib.blake2b(name.encode(), digest_size=8).digest()
        key = int.from_bytes(digest, "big", signed=True)
        (held,) = db.execute("SELECT pg_try_advisory_lock($1)", (key,)).fetchone()
        yield bool(held)
    finally:
        db.close()


@contextlib.contextmanager
def _held(path: Path) -> Iterator[bool]:
    """Hold an exclusive lock on the file at `path`; give False when another holds it."""
    handle = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        try:
            # Released by the kernel when the process dies, SIGKILL included.
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        yield True
    finally:
        os.close(handle)
