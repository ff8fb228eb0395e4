"""The schema of the store, each database's in its own words: the numbered steps that
bring a store from version N to N + 1 (SQLite: `PRAGMA user_version`; PostgreSQL: the
`qant_schema` table).

Steps are never edited once released: a change of schema is a new step, taken by both
databases, so that a version means the same tables in each and a store copies into the
other (`db copy`). A step one database does not need is empty there."""

from __future__ import annotations

from collections.abc import Callable

from qant_mail.store.sql import Db

SQLITE: list[str | Callable[[Db], None]] = [
    # 1: subscribers
    """
    CREATE TABLE subscribers (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        email TEXT NOT NULL UNIQUE COLLATE NOCASE,
        name TEXT NOT NULL DEFAULT '',
        status TEXT NOT NULL DEFAULT 'active'
            CHECK (status IN ('active', 'unsubscribed', 'bounced', 'complained')),
        status_changed_at TEXT NOT NULL,
        status_reason TEXT NOT NULL DEFAULT '',
        created_at TEXT NOT NULL,
        source TEXT NOT NULL DEFAULT ''
    );
    CREATE INDEX subscribers_status ON subscribers (status);
    """,
    # 2: the send ledger, and the quota counters shared by every send
    """
    CREATE TABLE sends (
        id INTEGER PRIMARY KEY,
        issue TEXT NOT NULL UNIQUE,
        content_hash TEXT NOT NULL,
        subject TEXT NOT NULL,
        created_at TEXT NOT NULL,
        finished_at TEXT
    );
    CREATE TABLE deliveries (
        send_id INTEGER NOT NULL REFERENCES sends (id),
        position INTEGER NOT NULL,
        subscriber_id INTEGER,
        email TEXT NOT NULL COLLATE NOCASE,
        name TEXT NOT NULL DEFAULT '',
        state TEXT NOT NULL DEFAULT 'pending'
            CHECK (state IN ('pending', 'sending', 'sent', 'deferred', 'failed',
                             'unknown', 'skipped')),
        attempts INTEGER NOT NULL DEFAULT 0,
        next_attempt_at REAL NOT NULL DEFAULT 0,
        last_reply TEXT NOT NULL DEFAULT '',
        updated_at TEXT NOT NULL,
        PRIMARY KEY (send_id, position),
        UNIQUE (send_id, email)
    );
    CREATE INDEX deliveries_queue ON deliveries (send_id, state, position);
    CREATE INDEX deliveries_retry ON deliveries (send_id, state, next_attempt_at);
    CREATE TABLE quota (
        minute INTEGER PRIMARY KEY,
        messages INTEGER NOT NULL
    );
    """,
    # 3: addresses removed on request, kept as a one-way hash so that no import brings
    # them back; international domains in their ASCII form, one mailbox one row
    """
    CREATE TABLE suppressions (
        email_hash TEXT PRIMARY KEY,
        reason TEXT NOT NULL,
        created_at TEXT NOT NULL
    );
    """,
    # 4: international domains in their ASCII form, one mailbox one row
    lambda db: _ascii_domains(db),
    # 5: what comes back after a message was accepted: bounces (RFC 3464 and kin) and
    # complaints (RFC 5965), on the ledger's row of that issue; soft bounces counted per
    # subscriber; each report read once
    """
    ALTER TABLE subscribers ADD COLUMN soft_bounces INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE deliveries ADD COLUMN bounce TEXT NOT NULL DEFAULT '';
    ALTER TABLE deliveries ADD COLUMN complaint TEXT NOT NULL DEFAULT '';
    ALTER TABLE deliveries ADD COLUMN feedback_at TEXT;
    CREATE TABLE feedback_reports (
        digest TEXT PRIMARY KEY,
        outcome TEXT NOT NULL,
        read_at TEXT NOT NULL
    );
    """,
    # 6: sends scheduled for a set time, one per issue, run by `qant-mail run-due`
    """
    CREATE TABLE schedules (
        issue TEXT PRIMARY KEY,
        path TEXT NOT NULL,
        due_at TEXT NOT NULL,
        state TEXT NOT NULL DEFAULT 'scheduled'
            CHECK (state IN ('scheduled', 'running', 'sent', 'failed', 'cancelled')),
        outcome TEXT NOT NULL DEFAULT '',
        created_at TEXT NOT NULL,
        updated_at TEXT NOT NULL
    );
    CREATE INDEX schedules_due ON schedules (state, due_at);
    """,
    # 7: several newsletters. A reader (subscribers) has a subscription to each newsletter
    # they get; leaving one is the subscription's status, while a bounce or a complaint
    # stays the reader's. What was "the" list becomes the main newsletter's, keyed
    # 'default'. Signup requests wait for their confirmation in `signups`; the attempts
    # are counted for the rate limits.
    """
    CREATE TABLE subscriptions (
        subscriber_id INTEGER NOT NULL REFERENCES subscribers (id) ON DELETE CASCADE,
        newsletter TEXT NOT NULL,
        status TEXT NOT NULL DEFAULT 'active' CHECK (status IN ('active', 'unsubscribed')),
        status_changed_at TEXT NOT NULL,
        status_reason TEXT NOT NULL DEFAULT '',
        created_at TEXT NOT NULL,
        source TEXT NOT NULL DEFAULT '',
        consent_at TEXT,
        consent_form TEXT NOT NULL DEFAULT '',
        confirmed_at TEXT,
        PRIMARY KEY (newsletter, subscriber_id)
    );
    CREATE INDEX subscriptions_reader ON subscriptions (subscriber_id);
    INSERT INTO subscriptions (subscriber_id, newsletter, status, status_changed_at,
        status_reason, created_at, source)
    SELECT id, 'default', CASE status WHEN 'unsubscribed' THEN 'unsubscribed' ELSE 'active' END,
        CASE status WHEN 'unsubscribed' THEN status_changed_at ELSE created_at END,
        CASE status WHEN 'unsubscribed' THEN status_reason ELSE '' END, created_at, source
    FROM subscribers;
    UPDATE subscribers SET status = 'active', status_reason = '' WHERE status = 'unsubscribed';
    ALTER TABLE sends ADD COLUMN newsletter TEXT NOT NULL DEFAULT 'default';
    CREATE TABLE signups (
        id INTEGER PRIMARY KEY,
        email TEXT NOT NULL COLLATE NOCASE,
        name TEXT NOT NULL DEFAULT '',
        newsletters TEXT NOT NULL,
        form TEXT NOT NULL,
        requested_at TEXT NOT NULL,
        expires_at REAL NOT NULL,
        confirmed_at TEXT
    );
    CREATE INDEX signups_expiry ON signups (expires_at);
    CREATE TABLE signup_attempts (
        at REAL NOT NULL,
        client TEXT NOT NULL,
        email_hash TEXT NOT NULL,
        mailed INTEGER NOT NULL DEFAULT 0
    );
    CREATE INDEX signup_attempts_client ON signup_attempts (client, at);
    CREATE INDEX signup_attempts_email ON signup_attempts (email_hash, at);
    """,
    # 8: several senders on one send (PostgreSQL): who holds a row being sent and until
    # when (a lease its sender renews; expired, another sender takes the row), and the
    # senders of each send, for `status` and for sharing the rate between them
    """
    ALTER TABLE deliveries ADD COLUMN worker TEXT NOT NULL DEFAULT '';
    ALTER TABLE deliveries ADD COLUMN lease_until REAL NOT NULL DEFAULT 0;
    CREATE TABLE workers (
        send_id INTEGER NOT NULL REFERENCES sends (id),
        worker TEXT NOT NULL,
        started_at TEXT NOT NULL,
        seen_at REAL NOT NULL,
        left_at TEXT,
        PRIMARY KEY (send_id, worker)
    );
    """,
    # 9: the outbox of messages to one reader (a signup's confirmation, a welcome, a
    # test): each is written here, composed, in the transaction of what asked for it, and
    # tried until delivered or expired; the message itself is dropped once it is done
    """
    CREATE TABLE outbox (
        id INTEGER PRIMARY KEY,
        kind TEXT NOT NULL,
        newsletter TEXT NOT NULL,
        recipient TEXT NOT NULL COLLATE NOCASE,
        message BLOB NOT NULL,
        state TEXT NOT NULL DEFAULT 'pending'
            CHECK (state IN ('pending', 'sending', 'sent', 'failed', 'unknown', 'expired')),
        attempts INTEGER NOT NULL DEFAULT 0,
        next_attempt_at REAL NOT NULL DEFAULT 0,
        expires_at REAL NOT NULL,
        worker TEXT NOT NULL DEFAULT '',
        lease_until REAL NOT NULL DEFAULT 0,
        last_reply TEXT NOT NULL DEFAULT '',
        created_at TEXT NOT NULL,
        updated_at TEXT NOT NULL
    );
    CREATE INDEX outbox_due ON outbox (state, next_attempt_at);
    """,
    # 10: (PostgreSQL's dates and times become timestamptz; SQLite keeps its ISO text)
    "",
    # 11: the ledger's indexes hold only the rows a claim looks for (pending, deferred,
    # held by a sender): an outcome recorded takes its row out of them, instead of
    # writing it into each again, and a plan fills one of them, not three
    """
    DROP INDEX deliveries_queue;
    DROP INDEX deliveries_retry;
    CREATE INDEX deliveries_pending ON deliveries (send_id, position) WHERE state = 'pending';
    CREATE INDEX deliveries_deferred ON deliveries (send_id, next_attempt_at)
        WHERE state = 'deferred';
    CREATE INDEX deliveries_sending ON deliveries (send_id, lease_until) WHERE state = 'sending';
    """,
    # 12: addresses in lower case, the form they are now stored and looked up in (one
    # reader whatever the case they were typed in; plain text comparisons)
    """
    UPDATE subscribers SET email = lower(email) WHERE email != lower(email);
    UPDATE deliveries SET email = lower(email) WHERE email != lower(email);
    UPDATE signups SET email = lower(email) WHERE email != lower(email);
    UPDATE outbox SET recipient = lower(recipient) WHERE recipient != lower(recipient);
    """,
    # 13: which relay carried each message (its host:port), now that there may be several
    """
    ALTER TABLE deliveries ADD COLUMN relay TEXT NOT NULL DEFAULT '';
    ALTER TABLE outbox ADD COLUMN relay TEXT NOT NULL DEFAULT ''
    """,
    # 14: approvals of exactly what goes out, and the message of each send as it left
    """
    CREATE TABLE approvals (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        issue TEXT NOT NULL,
        newsletter TEXT NOT NULL,
        digest TEXT NOT NULL,
        approver TEXT NOT NULL,
        approved_at TEXT NOT NULL,
        subject TEXT NOT NULL,
        preheader TEXT NOT NULL,
        html TEXT NOT NULL,
        text TEXT NOT NULL,
        size INTEGER NOT NULL,
        message BLOB NOT NULL
    );
    CREATE INDEX approvals_issue ON approvals (newsletter, issue, id);
    CREATE TABLE send_messages (
        send_id INTEGER PRIMARY KEY,
        digest TEXT NOT NULL,
        message BLOB NOT NULL,
        created_at TEXT NOT NULL
    )
    """,
    # 15: counted links ([audience] count_clicks): where each leads, and a count a day,
    # never who followed it
    """
    CREATE TABLE links (
        issue TEXT NOT NULL,
        n INTEGER NOT NULL,
        newsletter TEXT NOT NULL,
        url TEXT NOT NULL,
        PRIMARY KEY (issue, n)
    );
    CREATE TABLE clicks (
        issue TEXT NOT NULL,
        n INTEGER NOT NULL,
        day TEXT NOT NULL,
        clicks INTEGER NOT NULL,
        PRIMARY KEY (issue, n, day)
    )
    """,
]

# The same steps in PostgreSQL's words: 64-bit identities for ids, `citext` for the
# addresses (compared without case, as SQLite's NOCASE does), `bytea` for messages, and
# from step 10 `timestamptz` for dates and times.
POSTGRESQL: list[str] = [
    # 1: subscribers
    """
    CREATE EXTENSION IF NOT EXISTS citext;
    CREATE TABLE subscribers (
        id BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
        email CITEXT NOT NULL UNIQUE,
        name TEXT NOT NULL DEFAULT '',
        status TEXT NOT NULL DEFAULT 'active'
            CHECK (status IN ('active', 'unsubscribed', 'bounced', 'complained')),
        status_changed_at TEXT NOT NULL,
        status_reason TEXT NOT NULL DEFAULT '',
        created_at TEXT NOT NULL,
        source TEXT NOT NULL DEFAULT ''
    );
    CREATE INDEX subscribers_status ON subscribers (status);
    """,
    # 2: the send ledger, and the quota counters shared by every send
    """
    CREATE TABLE sends (
        id BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
        issue TEXT NOT NULL UNIQUE,
        content_hash TEXT NOT NULL,
        subject TEXT NOT NULL,
        created_at TEXT NOT NULL,
        finished_at TEXT
    );
    CREATE TABLE deliveries (
        send_id BIGINT NOT NULL REFERENCES sends (id),
        position BIGINT NOT NULL,
        subscriber_id BIGINT,
        email CITEXT NOT NULL,
        name TEXT NOT NULL DEFAULT '',
        state TEXT NOT NULL DEFAULT 'pending'
            CHECK (state IN ('pending', 'sending', 'sent', 'deferred', 'failed',
                             'unknown', 'skipped')),
        attempts BIGINT NOT NULL DEFAULT 0,
        next_attempt_at DOUBLE PRECISION NOT NULL DEFAULT 0,
        last_reply TEXT NOT NULL DEFAULT '',
        updated_at TEXT NOT NULL,
        PRIMARY KEY (send_id, position),
        UNIQUE (send_id, email)
    );
    CREATE INDEX deliveries_queue ON deliveries (send_id, state, position);
    CREATE INDEX deliveries_retry ON deliveries (send_id, state, next_attempt_at);
    CREATE TABLE quota (
        minute BIGINT PRIMARY KEY,
        messages BIGINT NOT NULL
    );
    """,
    # 3: addresses removed on request, kept as a one-way hash
    """
    CREATE TABLE suppressions (
        email_hash TEXT PRIMARY KEY,
        reason TEXT NOT NULL,
        created_at TEXT NOT NULL
    );
    """,
    # 4: (SQLite only: mends addresses stored by its earliest versions)
    "",
    # 5: bounces and complaints on the ledger's row; soft bounces counted; reports read once
    """
    ALTER TABLE subscribers ADD COLUMN soft_bounces BIGINT NOT NULL DEFAULT 0;
    ALTER TABLE deliveries ADD COLUMN bounce TEXT NOT NULL DEFAULT '';
    ALTER TABLE deliveries ADD COLUMN complaint TEXT NOT NULL DEFAULT '';
    ALTER TABLE deliveries ADD COLUMN feedback_at TEXT;
    CREATE TABLE feedback_reports (
        digest TEXT PRIMARY KEY,
        outcome TEXT NOT NULL,
        read_at TEXT NOT NULL
    );
    """,
    # 6: sends scheduled for a set time
    """
    CREATE TABLE schedules (
        issue TEXT PRIMARY KEY,
        path TEXT NOT NULL,
        due_at TEXT NOT NULL,
        state TEXT NOT NULL DEFAULT 'scheduled'
            CHECK (state IN ('scheduled', 'running', 'sent', 'failed', 'cancelled')),
        outcome TEXT NOT NULL DEFAULT '',
        created_at TEXT NOT NULL,
        updated_at TEXT NOT NULL
    );
    CREATE INDEX schedules_due ON schedules (state, due_at);
    """,
    # 7: several newsletters: subscriptions, the sends' newsletter; signups and attempts
    """
    CREATE TABLE subscriptions (
        subscriber_id BIGINT NOT NULL REFERENCES subscribers (id) ON DELETE CASCADE,
        newsletter TEXT NOT NULL,
        status TEXT NOT NULL DEFAULT 'active' CHECK (status IN ('active', 'unsubscribed')),
        status_changed_at TEXT NOT NULL,
        status_reason TEXT NOT NULL DEFAULT '',
        created_at TEXT NOT NULL,
        source TEXT NOT NULL DEFAULT '',
        consent_at TEXT,
        consent_form TEXT NOT NULL DEFAULT '',
        confirmed_at TEXT,
        PRIMARY KEY (newsletter, subscriber_id)
    );
    CREATE INDEX subscriptions_reader ON subscriptions (subscriber_id);
    INSERT INTO subscriptions (subscriber_id, newsletter, status, status_changed_at,
        status_reason, created_at, source)
    SELECT id, 'default', CASE status WHEN 'unsubscribed' THEN 'unsubscribed' ELSE 'active' END,
        CASE status WHEN 'unsubscribed' THEN status_changed_at ELSE created_at END,
        CASE status WHEN 'unsubscribed' THEN status_reason ELSE '' END, created_at, source
    FROM subscribers;
    UPDATE subscribers SET status = 'active', status_reason = '' WHERE status = 'unsubscribed';
    ALTER TABLE sends ADD COLUMN newsletter TEXT NOT NULL DEFAULT 'default';
    CREATE TABLE signups (
        id BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
        email CITEXT NOT NULL,
        name TEXT NOT NULL DEFAULT '',
        newsletters TEXT NOT NULL,
        form TEXT NOT NULL,
        requested_at TEXT NOT NULL,
        expires_at DOUBLE PRECISION NOT NULL,
        confirmed_at TEXT
    );
    CREATE INDEX signups_expiry ON signups (expires_at);
    CREATE TABLE signup_attempts (
        at DOUBLE PRECISION NOT NULL,
        client TEXT NOT NULL,
        email_hash TEXT NOT NULL,
        mailed BIGINT NOT NULL DEFAULT 0
    );
    CREATE INDEX signup_attempts_client ON signup_attempts (client, at);
    CREATE INDEX signup_attempts_email ON signup_attempts (email_hash, at);
    """,
    # 8: several senders on one send: leases on rows, and the senders of each send
    """
    ALTER TABLE deliveries ADD COLUMN worker TEXT NOT NULL DEFAULT '';
    ALTER TABLE deliveries ADD COLUMN lease_until DOUBLE PRECISION NOT NULL DEFAULT 0;
    CREATE TABLE workers (
        send_id BIGINT NOT NULL REFERENCES sends (id),
        worker TEXT NOT NULL,
        started_at TEXT NOT NULL,
        seen_at DOUBLE PRECISION NOT NULL,
        left_at TEXT,
        PRIMARY KEY (send_id, worker)
    );
    """,
    # 9: the outbox of messages to one reader
    """
    CREATE TABLE outbox (
        id BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
        kind TEXT NOT NULL,
        newsletter TEXT NOT NULL,
        recipient CITEXT NOT NULL,
        message BYTEA NOT NULL,
        state TEXT NOT NULL DEFAULT 'pending'
            CHECK (state IN ('pending', 'sending', 'sent', 'failed', 'unknown', 'expired')),
        attempts BIGINT NOT NULL DEFAULT 0,
        next_attempt_at DOUBLE PRECISION NOT NULL DEFAULT 0,
        expires_at DOUBLE PRECISION NOT NULL,
        worker TEXT NOT NULL DEFAULT '',
        lease_until DOUBLE PRECISION NOT NULL DEFAULT 0,
        last_reply TEXT NOT NULL DEFAULT '',
        created_at TEXT NOT NULL,
        updated_at TEXT NOT NULL
    );
    CREATE INDEX outbox_due ON outbox (state, next_attempt_at);
    """,
    # 10: dates and times as timestamptz (they were ISO text, as SQLite keeps them):
    # compared, ordered and grouped by day in the server's own terms
    """
    ALTER TABLE subscribers
        ALTER COLUMN status_changed_at TYPE timestamptz
            USING nullif(status_changed_at, '')::timestamptz,
        ALTER COLUMN created_at TYPE timestamptz
            USING nullif(created_at, '')::timestamptz;
    ALTER TABLE suppressions
        ALTER COLUMN created_at TYPE timestamptz
            USING nullif(created_at, '')::timestamptz;
    ALTER TABLE sends
        ALTER COLUMN created_at TYPE timestamptz
            USING nullif(created_at, '')::timestamptz,
        ALTER COLUMN finished_at TYPE timestamptz
            USING nullif(finished_at, '')::timestamptz;
    ALTER TABLE deliveries
        ALTER COLUMN updated_at TYPE timestamptz
            USING nullif(updated_at, '')::timestamptz,
        ALTER COLUMN feedback_at TYPE timestamptz
            USING nullif(feedback_at, '')::timestamptz;
    ALTER TABLE feedback_reports
        ALTER COLUMN read_at TYPE timestamptz
            USING nullif(read_at, '')::timestamptz;
    ALTER TABLE schedules
        ALTER COLUMN due_at TYPE timestamptz
            USING nullif(due_at, '')::timestamptz,
        ALTER COLUMN created_at TYPE timestamptz
            USING nullif(created_at, '')::timestamptz,
        ALTER COLUMN updated_at TYPE timestamptz
            USING nullif(updated_at, '')::timestamptz;
    ALTER TABLE subscriptions
        ALTER COLUMN status_changed_at TYPE timestamptz
            USING nullif(status_changed_at, '')::timestamptz,
        ALTER COLUMN created_at TYPE timestamptz
            USING nullif(created_at, '')::timestamptz,
        ALTER COLUMN consent_at TYPE timestamptz
            USING nullif(consent_at, '')::timestamptz,
        ALTER COLUMN confirmed_at TYPE timestamptz
            USING nullif(confirmed_at, '')::timestamptz;
    ALTER TABLE signups
        ALTER COLUMN requested_at TYPE timestamptz
            USING nullif(requested_at, '')::timestamptz,
        ALTER COLUMN confirmed_at TYPE timestamptz
            USING nullif(confirmed_at, '')::timestamptz;
    ALTER TABLE workers
        ALTER COLUMN started_at TYPE timestamptz
            USING nullif(started_at, '')::timestamptz,
        ALTER COLUMN left_at TYPE timestamptz
            USING nullif(left_at, '')::timestamptz;
    ALTER TABLE outbox
        ALTER COLUMN created_at TYPE timestamptz
            USING nullif(created_at, '')::timestamptz,
        ALTER COLUMN updated_at TYPE timestamptz
            USING nullif(updated_at, '')::timestamptz;
    """,
    # 11: the ledger's indexes hold only the rows a claim looks for (pending, deferred,
    # held by a sender): an outcome recorded takes its row out of them, instead of
    # writing it into each again, and a plan fills one of them, not three
    """
    DROP INDEX deliveries_queue;
    DROP INDEX deliveries_retry;
    CREATE INDEX deliveries_pending ON deliveries (send_id, position) WHERE state = 'pending';
    CREATE INDEX deliveries_deferred ON deliveries (send_id, next_attempt_at)
        WHERE state = 'deferred';
    CREATE INDEX deliveries_sending ON deliveries (send_id, lease_until) WHERE state = 'sending';
    """,
    # 12: addresses in lower case, as plain text compared byte by byte (citext's
    # comparisons made every index on an address, and every join on one, slow); and the
    # rows a plan or an import writes set-wise no longer checked one by one against the
    # send or the reader the same statement read them from (a trigger a row: 0.6 s of a
    # plan of 200,000, 0.7 s of an import, measured). The store writes both tables only
    # so, and deletes a reader's subscriptions with the reader, in one transaction.
    """
    ALTER TABLE subscribers ALTER COLUMN email TYPE text COLLATE "C"
        USING lower(email::text);
    ALTER TABLE subscribers ADD CONSTRAINT subscribers_email_lower CHECK (email = lower(email));
    ALTER TABLE deliveries ALTER COLUMN email TYPE text COLLATE "C"
        USING lower(email::text);
    ALTER TABLE signups ALTER COLUMN email TYPE text COLLATE "C"
        USING lower(email::text);
    ALTER TABLE outbox ALTER COLUMN recipient TYPE text COLLATE "C"
        USING lower(recipient::text);
    ALTER TABLE deliveries DROP CONSTRAINT deliveries_send_id_fkey;
    ALTER TABLE subscriptions DROP CONSTRAINT subscriptions_subscriber_id_fkey;
    """,
    # 13: which relay carried each message (its host:port), now that there may be several
    """
    ALTER TABLE deliveries ADD COLUMN relay TEXT NOT NULL DEFAULT '';
    ALTER TABLE outbox ADD COLUMN relay TEXT NOT NULL DEFAULT ''
    """,
    # 14: approvals of exactly what goes out, and the message of each send as it left
    """
    CREATE TABLE approvals (
        id BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
        issue TEXT NOT NULL,
        newsletter TEXT NOT NULL,
        digest TEXT NOT NULL,
        approver TEXT NOT NULL,
        approved_at TIMESTAMPTZ NOT NULL,
        subject TEXT NOT NULL,
        preheader TEXT NOT NULL,
        html TEXT NOT NULL,
        text TEXT NOT NULL,
        size INTEGER NOT NULL,
        message BYTEA NOT NULL
    );
    CREATE INDEX approvals_issue ON approvals (newsletter, issue, id);
    CREATE TABLE send_messages (
        send_id BIGINT PRIMARY KEY,
        digest TEXT NOT NULL,
        message BYTEA NOT NULL,
        created_at TIMESTAMPTZ NOT NULL
    )
    """,
    # 15: counted links ([audience] count_clicks): where each leads, and a count a day,
    # never who followed it
    """
    CREATE TABLE links (
        issue TEXT NOT NULL,
        n INTEGER NOT NULL,
        newsletter TEXT NOT NULL,
        url TEXT NOT NULL,
        PRIMARY KEY (issue, n)
    );
    CREATE TABLE clicks (
        issue TEXT NOT NULL,
        n INTEGER NOT NULL,
        day TEXT NOT NULL,
        clicks INTEGER NOT NULL,
        PRIMARY KEY (issue, n, day)
    )
    """,
]

assert len(SQLITE) == len(POSTGRESQL), "each step is taken by both databases"
VERSION = len(SQLITE)


def statements(step: str) -> list[str]:
    """Return the statements of a step, one at a time (none holds a ";" of its own)."""
    return [s.strip() for s in step.split(";") if s.strip()]


def _ascii_domains(db: Db) -> None:
    """Write the international domains of stored addresses in their ASCII form; where
    that makes two rows of one mailbox, keep the older, with the stricter status."""
    from qant_mail.base.addresses import AddressError, normalise_address

    rows = db.execute(
        "SELECT id, email, status FROM subscribers WHERE email GLOB '*[^ -~]*'"
    ).fetchall()
    for subscriber_id, email, status in rows:
        try:
            ascii_email = normalise_address(email, test_domains=True)
        except AddressError:
            continue  # left as it is: a send marks it failed, with why
        twin = db.execute(
            "SELECT id FROM subscribers WHERE email = $1 AND id != $2", (ascii_email, subscriber_id)
        ).fetchone()
        if twin is None:
            db.execute(
                "UPDATE subscribers SET email = $1 WHERE id = $2", (ascii_email, subscriber_id)
            )
            continue
        if status != "active":
            db.execute(
                "UPDATE subscribers SET status = $1, status_reason = 'merged' WHERE id = $2",
                (status, twin[0]),
            )
        db.execute("DELETE FROM subscribers WHERE id = $1", (subscriber_id,))
