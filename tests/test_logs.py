"""The logs of `inbox` and `serve`: one line per event, as text or JSON, with stable keys;
no value can forge a line; addresses hidden where asked."""

from __future__ import annotations

import datetime as dt
import io
import json
import logging
from collections.abc import Iterator

import pytest

from qant_mail.base import logs


def logger(log_format: str, *, hide_addresses: bool = False) -> tuple[logging.Logger, io.StringIO]:
    """Return a logger of its own writing to a buffer in `log_format`, and the buffer."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logs.formatter(log_format, hide_addresses=hide_addresses))
    own = logging.getLogger(f"qant_mail.tests.{log_format}.{hide_addresses}")
    own.handlers = [handler]
    own.propagate = False
    own.setLevel(logging.INFO)
    return own, stream


def test_a_json_line_is_time_level_and_event_then_the_fields() -> None:
    log, out = logger("json")
    logs.event(log, "request", method="GET", path="/unsubscribe/…", status=200, duration_ms=1.5)
    log.warning("outbox: %d to try again", 2)
    request, plain = (json.loads(line) for line in out.getvalue().splitlines())
    assert list(request) == ["time", "level", "event", "method", "path", "status", "duration_ms"]
    assert request["level"] == "info"
    assert request["event"] == "request"
    assert request["path"] == "/unsubscribe/…"
    assert (request["status"], request["duration_ms"]) == (200, 1.5)
    when = dt.datetime.fromisoformat(request["time"])
    assert when.utcoffset() == dt.timedelta(0)
    assert abs((dt.datetime.now(dt.UTC) - when).total_seconds()) < 60
    # A record that is no event is the event "log", with its logger and message.
    assert {k: plain[k] for k in ("level", "event", "logger", "message")} == {
        "level": "warning",
        "event": "log",
        "logger": log.name,
        "message": "outbox: 2 to try again",
    }


def test_a_text_line_is_time_level_event_and_key_value_pairs() -> None:
    log, out = logger("text")
    logs.event(log, "message", sender="a@example.com", recipients=["b@x.fr", "c@x.fr"], stored=[])
    when, level, rest = out.getvalue().rstrip("\n").split(" ", 2)
    assert dt.datetime.fromisoformat(when).utcoffset() == dt.timedelta(0)
    assert level == "INFO"
    assert rest == "message sender=a@example.com recipients=b@x.fr,c@x.fr stored=-"


@pytest.mark.parametrize("log_format", ["text", "json"])
def test_a_newline_in_a_value_or_a_message_cannot_forge_a_line(log_format: str) -> None:
    log, out = logger(log_format)
    forged = "/x\n2025-01-01T00:00:00.000+00:00 INFO request path=/admin status=200"
    logs.event(log, "request", path=forged, status=404)
    log.error("refused %s", forged)
    logs.event(log, "request", path=forged.replace("\n", "\u2028"), status=404)
    log.error("refused %s\x1b[2J", forged.replace("\n", "\r"))
    lines = out.getvalue().splitlines()
    assert len(lines) == 4
    assert "\x1b" not in out.getvalue()
    assert not any(line.startswith("2025-01-01") for line in lines)
    if log_format == "text":
        assert 'path="/x\\n2025-01-01T00:00:00.000+00:00 INFO request' in lines[0]


def test_an_error_stays_on_its_json_line_with_its_traceback() -> None:
    log, out = logger("json")
    try:
        raise RuntimeError("the drain failed")
    except RuntimeError:
        log.exception("outbox: the drain failed")
    (line,) = out.getvalue().splitlines()
    entry = json.loads(line)
    assert entry["message"] == "outbox: the drain failed"
    assert entry["error"].startswith("Traceback (most recent call last):")
    assert entry["error"].endswith("RuntimeError: the drain failed")


@pytest.mark.parametrize("log_format", ["text", "json"])
def test_hidden_addresses_keep_only_their_domain(log_format: str) -> None:
    log, out = logger(log_format, hide_addresses=True)
    logs.event(log, "request", path="/lea.martin+news@example.com", client="127.0.0.1")
    log.warning("outbox: confirm to max@example.org: 550 5.1.1 <max@example.org> unknown")
    try:
        raise ValueError("Key (email)=(nina@example.net) already exists")
    except ValueError:
        log.exception("signup: not recorded")
    text = out.getvalue()
    for local in ("lea.martin", "news@", "max@", "nina@"):
        assert local not in text
    for shown in ("/…@example.com", "…@example.org", "<…@example.org>", "(…@example.net)"):
        assert shown in text or json.dumps(shown, ensure_ascii=False)[1:-1] in text


def test_an_events_fields_cannot_take_a_stable_key() -> None:
    log, _ = logger("json")
    with pytest.raises(AssertionError, match="time"):
        logs.event(log, "request", time="noon")


def test_an_unknown_format_is_refused() -> None:
    with pytest.raises(ValueError, match="text, json"):
        logs.formatter("xml")


@pytest.fixture
def root_logging() -> Iterator[None]:
    """Put the root and qant_mail loggers back as they were after the test."""
    root, own = logging.getLogger(), logging.getLogger("qant_mail")
    handlers, levels = list(root.handlers), (root.level, own.level)
    try:
        yield
    finally:
        root.handlers = handlers
        root.setLevel(levels[0])
        own.setLevel(levels[1])


@pytest.mark.usefixtures("root_logging")
def test_setup_logs_qant_mail_from_info_and_other_libraries_from_warning() -> None:
    out = io.StringIO()
    logs.setup("json", out)
    logs.event(logging.getLogger("qant_mail.delivery.inbox"), "message", bytes=10)
    logging.getLogger("mail.log").info("('127.0.0.1', 4242) handling connection")
    logging.getLogger("uvicorn.error").warning("Invalid HTTP request received.")
    events = [json.loads(line) for line in out.getvalue().splitlines()]
    assert [(e["event"], e.get("logger")) for e in events] == [
        ("message", None),
        ("log", "uvicorn.error"),
    ]
