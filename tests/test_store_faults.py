"""A send survives its database: connections cut, a server stopped and started again, a
full disk. Within `store.reconnect_seconds` it goes on by itself, each reader served once;
past it, it stops naming the cause and a re-run finishes the work. No traceback."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import pytest

from qant_mail.app import issues, sending
from qant_mail.app.context import Context
from qant_mail.base.config import Settings, Store
from qant_mail.base.errors import ExitCode
from qant_mail.delivery.outbox import SendReport
from qant_mail.delivery.transport import MemoryTransport, Reply, SmtpTransport
from qant_mail.store.db import StoreUnavailable
from qant_mail.store.ledger import Ledger, Outcome, Send, State
from qant_mail.store.subscribers import Subscribers
from tests.conftest import SAMPLE
from tests.postgres import SERVER_USER, _binaries, create_database, running_postgres
from tests.smtp_server import SmtpServer
from tests.test_robustness import Disk, disk  # noqa: F401

SECRET = b"a-test-secret-that-is-long-enough"
READERS = 30


def readers(settings: Settings) -> list[str]:
    with Subscribers.open(settings.store_path) as store:
        rows = "email\n" + "".join(f"reader{n}@example.com\n" for n in range(READERS))
        store.import_rows(rows, "test")
    return [f"reader{n}@example.com" for n in range(READERS)]


def on_store(settings: Settings, store: Path | str, patience: float) -> Settings:
    url = store if isinstance(store, str) else ""
    where = Store(path=str(store), url=url, reconnect_seconds=patience)
    return dataclasses.replace(settings, store=where)


def send_while(
    settings: Settings, server: SmtpServer, fault: threading.Event, after: int
) -> SendReport:
    """Send the sample; once `after` messages are in, hold the server until `fault` is
    set (the test breaks the database meanwhile), then let the send go on."""
    server.handler.hold_after = after

    def release() -> None:
        fault.wait(60)
        server.handler.release.set()

    threading.Thread(target=release, daemon=True).start()
    ctx = Context(settings, secret=SECRET, transport=SmtpTransport(settings, env={}))
    return sending.send(ctx, issues.prepare(ctx, settings.root / "issues" / SAMPLE.name))


def wait_for(server: SmtpServer, count: int) -> None:
    deadline = time.monotonic() + 30
    while len(server.handler.received) < count and time.monotonic() < deadline:
        time.sleep(0.01)


@pytest.mark.postgresql_only
def test_a_send_goes_on_when_its_connections_are_cut(
    local: Settings, smtp_server: SmtpServer, store_kind: str
) -> None:
    import psycopg

    addresses = readers(local)
    url = str(local.store_path)
    fault = threading.Event()

    def cut() -> None:
        wait_for(smtp_server, 10)
        with psycopg.connect(url, autocommit=True) as admin:
            admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                " WHERE datname = current_database() AND pid != pg_backend_pid()"
            )
        fault.set()

    threading.Thread(target=cut, daemon=True).start()
    report = send_while(local, smtp_server, fault, 10)
    assert report.exit_code == ExitCode.OK, report.summary()
    assert smtp_server.handler.recipients() == dict.fromkeys(addresses, 1)


@pytest.fixture(scope="module")
def own_postgres() -> Iterator[Path]:
    """A PostgreSQL server of this module's own, which its tests stop and start."""
    from tests.postgres import PostgresUnavailable, _unavailable

    try:
        with running_postgres() as folder:
            yield folder
    except PostgresUnavailable as err:
        _unavailable(str(err))


def _pg_ctl(folder: Path, *action: str) -> None:
    binaries = _binaries()
    assert binaries is not None
    run_as = ["runuser", "-u", SERVER_USER, "--"] if os.geteuid() == 0 else []
    options = f"-k {folder} -c listen_addresses='' -c fsync=off"
    command = [str(binaries / "pg_ctl"), "-D", str(folder / "data"), "-o", options, "-w"]
    subprocess.run([*run_as, *command, *action], check=True, capture_output=True)


@contextlib.contextmanager
def stopped(folder: Path) -> Iterator[None]:
    _pg_ctl(folder, "-m", "fast", "stop")
    try:
        yield
    finally:
        _pg_ctl(folder, "-l", str(folder / "log"), "start")


@pytest.mark.postgresql_only  # a server of its own; the store kind is not the point
def test_a_send_waits_for_a_restarting_server_and_goes_on(
    local: Settings, smtp_server: SmtpServer, own_postgres: Path
) -> None:
    settings = on_store(local, create_database(own_postgres), patience=30)
    addresses = readers(settings)
    fault = threading.Event()

    def restart() -> None:
        wait_for(smtp_server, 10)
        with stopped(own_postgres):
            time.sleep(2)  # down for a while: the senders wait
        fault.set()

    threading.Thread(target=restart, daemon=True).start()
    report = send_while(settings, smtp_server, fault, 10)
    assert report.exit_code == ExitCode.OK, report.summary()
    assert smtp_server.handler.recipients() == dict.fromkeys(addresses, 1)


@pytest.mark.postgresql_only  # a server of its own; the store kind is not the point
def test_past_its_patience_a_send_stops_naming_the_database_and_a_rerun_finishes(
    local: Settings, smtp_server: SmtpServer, own_postgres: Path
) -> None:
    settings = on_store(local, create_database(own_postgres), patience=1)
    addresses = readers(settings)
    fault = threading.Event()
    restarted = threading.Event()

    def stop_for_long() -> None:
        wait_for(smtp_server, 10)
        with stopped(own_postgres):
            fault.set()
            time.sleep(4)  # longer than the patience
        restarted.set()

    threading.Thread(target=stop_for_long, daemon=True).start()
    report = send_while(settings, smtp_server, fault, 10)
    assert report.exit_code == ExitCode.UNAVAILABLE
    assert report.stopped == "unavailable"
    assert report.cause.startswith(str(settings.store_path))  # the database, by name
    assert "cannot connect" in report.cause or "cannot be used now" in report.cause
    assert "unavailable" in report.summary()
    assert restarted.wait(30)
    smtp_server.handler.hold_after = None
    again = send_while(settings, smtp_server, threading.Event(), 10**6)
    assert again.exit_code == ExitCode.OK, again.summary()
    received = smtp_server.handler.recipients()
    assert set(received) == set(addresses)
    # Only what was in flight when the database went away may have gone twice.
    assert sum(received.values()) - READERS <= settings.smtp.connections


@pytest.mark.sqlite_only
def test_a_send_waits_for_room_on_a_full_disk_and_goes_on(
    local: Settings,
    smtp_server: SmtpServer,
    disk: Disk,  # noqa: F811
) -> None:
    settings = on_store(local, disk.mount / "subscribers.db", patience=30)
    addresses = readers(settings)
    fault = threading.Event()
    ballast = disk.mount / "ballast"

    def fill_then_free() -> None:
        wait_for(smtp_server, 10)
        with ballast.open("wb", buffering=0) as out, contextlib.suppress(OSError):
            while out.write(b"x" * 4096):
                pass  # until the disk is full
        fault.set()
        time.sleep(1.5)  # the senders meet the full disk, and wait
        ballast.unlink()

    threading.Thread(target=fill_then_free, daemon=True).start()
    report = send_while(settings, smtp_server, fault, 10)
    assert report.exit_code == ExitCode.OK, report.summary()
    assert smtp_server.handler.recipients() == dict.fromkeys(addresses, 1)


def _breaking_on(broken: str) -> Callable[[str, bytes], Reply]:
    """A relay's answer that meets a bug of ours (an exception that is no QantError) for
    the message to `broken`, and accepts the others."""

    def answer(recipient: str, data: bytes) -> Reply:
        if recipient == broken:
            raise RuntimeError("a bug met by one message")
        return Reply(250, "2.0.0 queued")

    return answer


def _accepted(*relays: MemoryTransport) -> Counter[str]:
    """Return how many messages the relays accepted, reader by reader."""
    return Counter(recipient for relay in relays for _, recipient, _ in relay.messages)


def _list_of(settings: Settings, readers: int, connections: int, **store: object) -> Settings:
    with contextlib.closing(Subscribers.open(settings.store_path)) as subscribers:
        rows = "".join(f"r{n}@example.com,R {n}\n" for n in range(readers))
        subscribers.import_rows("email,name\n" + rows, "test")
    return dataclasses.replace(
        settings,
        smtp=settings.smtp.model_copy(update={"connections": connections}),
        store=settings.store.model_copy(update=store),
    )


def test_a_bug_in_one_connection_leaves_the_others_messages_recorded_and_none_sent_twice(
    local: Settings,
) -> None:
    settings = _list_of(local, 40, 2)
    first = MemoryTransport(answer=_breaking_on("r33@example.com"))
    ctx = Context(settings, secret=SECRET, transport=first)
    with pytest.raises(RuntimeError, match="a bug met by one message"):
        sending.send(ctx, issues.prepare(ctx, SAMPLE))
    second = MemoryTransport()
    again = Context(settings, secret=SECRET, transport=second)
    report = sending.send(again, issues.prepare(again, SAMPLE))
    assert report.stopped is None
    accepted = _accepted(first, second)
    assert set(accepted) == {f"r{n}@example.com" for n in range(40)}
    assert max(accepted.values()) == 1, accepted.most_common(3)


def test_an_outcome_the_store_could_not_take_is_written_when_it_can_not_sent_again(
    local: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The database is out for the first write, and the run stops (no patience): the
    # relay has accepted that message, so its row must not go back to be sent again.
    settings = _list_of(local, 3, 1, reconnect_seconds=0)
    written = Ledger.record_many
    calls: list[int] = []

    def out_once(ledger: Ledger, send: Send, outcomes: Sequence[Outcome]) -> None:
        calls.append(len(outcomes))
        if len(calls) == 1:
            raise StoreUnavailable("the server is restarting")
        written(ledger, send, outcomes)

    monkeypatch.setattr(Ledger, "record_many", out_once)
    relay = MemoryTransport()
    ctx = Context(settings, secret=SECRET, transport=relay)
    report = sending.send(ctx, issues.prepare(ctx, SAMPLE))
    assert report.stopped == "unavailable"
    assert _accepted(relay) == {"r0@example.com": 1}
    ledger = Ledger(settings.store_path)
    send = ledger.find("2023-11-20")
    assert send is not None
    rows = {d.email: d.state for d in ledger.deliveries(send, *State)}
    assert rows["r0@example.com"] is State.SENT
    sending.send(ctx, issues.prepare(ctx, SAMPLE))
    assert _accepted(relay) == {f"r{n}@example.com": 1 for n in range(3)}
