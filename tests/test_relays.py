"""Several relays: a send goes on through a fallback when the main relay is down from the
start, refuses every connection, or stops in the middle; every reader gets exactly one
message; the records say which relay carried how many; a newsletter may have its own."""

from __future__ import annotations

import dataclasses
import socket
from collections import Counter
from pathlib import Path

import pytest

from qant_mail.app import sending
from qant_mail.app.context import Context
from qant_mail.audience.tokens import SECRET_VARIABLE
from qant_mail.base.config import Sending, Settings, load_settings
from qant_mail.base.errors import ConfigError, ExitCode
from qant_mail.delivery.outbox import SendReport
from qant_mail.delivery.transport import Relays, SmtpTransport, TransportUnavailable
from tests.conftest import prepare_send
from tests.faulty_smtp import Behaviour, FaultyServer, FaultyServerFactory
from tests.isolated import run_cli
from tests.test_send import SAMPLE, subscribe

SECRET = "a-test-secret-that-is-long-enough"
pytestmark = pytest.mark.usefixtures("secret")


@pytest.fixture
def secret(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(SECRET_VARIABLE, SECRET)


def nothing_listens() -> str:
    """Return host:port of a loopback port nobody listens on (connections refused)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{probe.getsockname()[1]}"


def where(server: FaultyServer) -> str:
    return f"{server.host}:{server.port}"


def with_relays(settings: Settings, main: str, *fallback: str, connections: int = 4) -> Settings:
    """Settings whose [smtp] is `main` with `fallback`, written in qant.toml too (the
    commands read it), retrying quickly."""
    host, _, port = main.rpartition(":")
    path = settings.path
    text = path.read_text()
    text = text.replace('host = "127.0.0.1"\nport = 2525', f'host = "{host}"\nport = {port}')
    text = text.replace(
        "connections = 4",
        f"connections = {connections}\nfallback = [{', '.join(repr(f) for f in fallback)}]",
    )
    text = text.replace("retry_after_seconds = 60", "retry_after_seconds = 0.05")
    path.write_text(text)
    loaded = load_settings(path, env={})
    assert loaded.relays[0] == (host, int(port))
    return dataclasses.replace(
        loaded, store=settings.store, sending=Sending(retry_after_seconds=0.05, max_attempts=5)
    )


def send(settings: Settings) -> SendReport:
    prepared = prepare_send(settings.root / SAMPLE, settings)
    return sending.send(Context(settings, env={}), prepared, wait_for_retries=True)


def received(*servers: FaultyServer) -> Counter[str]:
    total: Counter[str] = Counter()
    for server in servers:
        total += server.recipients()
    return total


@pytest.mark.parametrize("main_is", ["not listening", "refusing with 421"])
def test_a_send_goes_through_the_fallback_when_the_main_relay_is_down_from_the_start(
    project_settings: Settings, faulty_smtp: FaultyServerFactory, main_is: str
) -> None:
    if main_is == "not listening":
        main = nothing_listens()
    else:
        main = where(faulty_smtp(Behaviour(greeting="421 4.3.2 Service not available")))
    fallback = faulty_smtp()
    settings = with_relays(project_settings, main, where(fallback))
    addresses = subscribe(settings, 12)
    report = send(settings)
    assert report.exit_code == ExitCode.OK, report.summary
    assert received(fallback) == Counter(addresses)
    found = sending.status(Context(settings), "2023-11-20")
    assert found.relays == {where(fallback): 12}
    shown = run_cli(["status", SAMPLE], cwd=settings.root, env={SECRET_VARIABLE: SECRET})
    assert f"carried by {where(fallback)} 12" in shown.stdout, shown.output
    listed = run_cli(["sends"], cwd=settings.root)
    assert f"{where(fallback)} 12" in listed.stdout, listed.output


def test_a_relay_that_stops_mid_send_hands_over_to_the_fallback_without_duplicates(
    project_settings: Settings, faulty_smtp: FaultyServerFactory
) -> None:
    main = faulty_smtp(Behaviour(stop_after_messages=5))
    fallback = faulty_smtp()
    # One connection: no message is in the middle of its data when the main one stops,
    # so that none is left `unknown` (a relay killed mid-message may have taken it).
    settings = with_relays(project_settings, where(main), where(fallback), connections=1)
    addresses = subscribe(settings, 20)
    report = send(settings)
    assert report.exit_code == ExitCode.OK, report.summary
    assert main.stopped.is_set()
    assert len(main.recipients()) == 5
    assert received(main, fallback) == Counter(addresses)  # each exactly once
    found = sending.status(Context(settings), "2023-11-20")
    assert found.relays == {where(fallback): 15, where(main): 5}


def test_every_relay_down_stops_the_send_naming_each(project_settings: Settings) -> None:
    first, second = nothing_listens(), nothing_listens()
    settings = with_relays(project_settings, first, second)
    subscribe(settings, 3)
    outcome = run_cli(["send", SAMPLE, "--yes"], cwd=settings.root, env={SECRET_VARIABLE: SECRET})
    assert outcome.traceback == ""
    assert outcome.exit_code == ExitCode.UNAVAILABLE, outcome.output
    for relay in (first, second):
        assert f"cannot connect to {relay}" in outcome.stderr


def test_a_resting_relay_is_tried_again_after_its_rest(
    project_settings: Settings, faulty_smtp: FaultyServerFactory
) -> None:
    main, fallback = faulty_smtp(), faulty_smtp()
    settings = with_relays(project_settings, where(main), where(fallback))
    now = [0.0]
    relays = Relays(
        [SmtpTransport(settings, env={}, relay=r) for r in settings.relays], clock=lambda: now[0]
    )
    relays.rest(where(main))
    connection = relays.connect()
    assert connection.relay == where(fallback)  # the main one rests: the fallback first
    connection.close()
    now[0] += Relays.RESTING + 1
    connection = relays.connect()
    assert connection.relay == where(main)  # back to the main relay once it has rested
    connection.close()


def test_every_relay_refusing_raises_one_error_naming_each(project_settings: Settings) -> None:
    first, second = nothing_listens(), nothing_listens()
    settings = with_relays(project_settings, first, second)
    relays = Relays([SmtpTransport(settings, env={}, relay=r) for r in settings.relays])
    with pytest.raises(TransportUnavailable) as caught:
        relays.connect()
    assert f"cannot connect to {first}" in str(caught.value)
    assert f"cannot connect to {second}" in str(caught.value)


def test_a_newsletter_may_have_relays_of_its_own(
    project_settings: Settings, faulty_smtp: FaultyServerFactory
) -> None:
    main, own = faulty_smtp(), faulty_smtp()
    path = project_settings.path
    text = path.read_text().replace(
        'host = "127.0.0.1"\nport = 2525', f'host = "127.0.0.1"\nport = {main.port}'
    )
    relays = f'relays = ["{where(own)}", "{nothing_listens()}"]'
    text += f'\n[newsletters.tech]\nname = "Qant Tech"\n{relays}\n'
    path.write_text(text)
    settings = load_settings(path, env={})
    assert settings.relays == (("127.0.0.1", main.port),)
    assert settings.for_newsletter("tech").relays[0] == ("127.0.0.1", own.port)
    outbox = Context(settings, env={}).outbox
    for newsletter, relay in (("tech", own), (None, main)):
        connection = outbox.transport_for(newsletter).connect()
        connection.close()
        assert connection.relay == where(relay)


@pytest.mark.parametrize(
    "written", ["smtp.example.com:0", "smtp example.com:587", "smtp.example.com:99999", ":587"]
)
def test_a_fallback_not_written_host_port_is_named(project: Path, written: str) -> None:
    path = project / "qant.toml"
    path.write_text(path.read_text().replace("connections = 4", f'fallback = ["{written}"]'))
    with pytest.raises(ConfigError) as caught:
        load_settings(path, env={})
    assert "smtp.fallback" in str(caught.value)
    assert "is not a relay written host:port" in str(caught.value)
