"""The bad-input corpus (tests/bad/), run through the real commands: each case ends with
its documented exit code and one message naming the file and place (or row, or host),
never a traceback, never a hang, and never a change to the database unless the command
succeeded. A seeded fuzz test mutates the sample issue and a CSV file the same way."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import sqlite3
import time
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings, strategies

from qant_mail.app.context import Context
from qant_mail.base.config import Settings
from qant_mail.store.ledger import Ledger
from qant_mail.store.subscribers import Subscribers
from qant_mail.web import webserver
from qant_mail.web.preview import Preview
from qant_mail.web.preview import create_app as preview_app
from qant_mail.web.serve import create_app as serve_app
from qant_mail.web.webserver import BackgroundServer, GuardedH11
from tests.conftest import ROOT, SAMPLE
from tests.faulty_smtp import Behaviour, FaultyServerFactory
from tests.isolated import Outcome, run_cli

BAD = ROOT / "tests" / "bad"
CASES: dict[str, dict[str, dict[str, Any]]] = tomllib.loads(
    (BAD / "cases.toml").read_text(encoding="utf-8")
)
SECRET = "a-test-secret-that-is-long-enough"
ENV = {"QANT_SECRET_KEY": SECRET, "QANT_CONFIG": ""}


def cases(kind: str) -> list[Any]:
    return [pytest.param(name, spec, id=name) for name, spec in sorted(CASES[kind].items())]


def assert_clean(outcome: Outcome, what: str) -> None:
    """No hang, no crash, no traceback, no escape sequence sent to the terminal."""
    assert not outcome.timed_out, f"{what}: still running after the deadline"
    assert outcome.signal is None, f"{what}: killed by signal {outcome.signal}"
    assert outcome.traceback == "", f"{what}:\n{outcome.traceback}"
    assert "Traceback" not in outcome.output, f"{what}:\n{outcome.output}"
    assert "\x1b" not in outcome.output, f"{what}: raw control characters in the output"


def db_snapshot(path: Path) -> list[tuple[Any, ...]]:
    if not path.exists():
        return []
    with sqlite3.connect(path) as db:
        return db.execute("SELECT email, name, status FROM subscribers ORDER BY id").fetchall()


@pytest.fixture
def bad_project(project: Path) -> Path:
    """The project, with the corpus's image files beside its issues."""
    for image in BAD.glob("issues/*.png"):
        shutil.copy(image, project / "issues" / image.name)
    return project


# ---- issue files ---------------------------------------------------------------------


@pytest.mark.parametrize(("name", "spec"), cases("issues"))
def test_bad_issue_files(bad_project: Path, name: str, spec: dict[str, Any]) -> None:
    target = bad_project / "issues" / f"{name}.yaml"
    shutil.copy(BAD / "issues" / f"{name}.yaml", target)
    check_issue(bad_project, target, spec)


def check_issue(project: Path, target: Path, spec: dict[str, Any]) -> None:
    relative = str(target.relative_to(project))
    check_exit = spec.get("exit", 1)
    # `render` writes what a reader would get even when `check` finds it too big.
    render_exit = spec.get("render_exit", check_exit)
    for args, expected in (
        (["check", relative], check_exit),
        (["render", relative, "-o", "out"], render_exit),
    ):
        outcome = run_cli(args, cwd=project, env=ENV)
        assert_clean(outcome, " ".join(args))
        assert outcome.exit_code == expected, (args, outcome.output)
        if expected == 0:
            continue
        if "says" in spec:
            assert spec["says"] in outcome.output, (args, outcome.output)
        place = f"{relative}:{spec['at']}:" if "at" in spec else f"{relative}:"
        assert place in outcome.output, (args, outcome.output)
        assert not (project / "out").exists(), "a failed render wrote files"


def special_files(folder: Path) -> Iterator[tuple[str, Path]]:
    fifo = folder / "fifo.yaml"
    os.mkfifo(fifo)
    yield "a pipe", fifo
    yield "a device", Path("/dev/zero")
    (folder / "folder.yaml").mkdir()
    yield "a folder", folder / "folder.yaml"


def test_issue_paths_that_are_not_files(bad_project: Path) -> None:
    for what, path in special_files(bad_project / "issues"):
        outcome = run_cli(["check", str(path)], cwd=bad_project, env=ENV, timeout=10)
        assert_clean(outcome, what)
        assert outcome.exit_code == 1, what
        assert f"{path}:1:1: (file):" in outcome.output, outcome.output


def test_an_issue_past_5_mb_is_refused_unread(bad_project: Path) -> None:
    path = bad_project / "issues" / "2024-01-15.yaml"
    with path.open("wb") as handle:
        handle.truncate(6 * 1024 * 1024)
    outcome = run_cli(["check", str(path)], cwd=bad_project, env=ENV)
    assert_clean(outcome, "big file")
    assert "at most 5 MB" in outcome.output


def test_a_file_name_with_a_line_break_cannot_inject_headers(bad_project: Path) -> None:
    path = bad_project / "issues" / "x\r\nBcc: victim@example.com.yaml"
    path.write_text("subject: S\nsections: [text: T]\n")
    for args in (["check", str(path)], ["render", str(path), "-o", "out"]):
        outcome = run_cli(args, cwd=bad_project, env=ENV)
        assert_clean(outcome, "a name with CR/LF")
        assert outcome.exit_code == 1
        assert "is not usable" in outcome.output
    assert not (bad_project / "out").exists()


def test_an_image_that_is_a_pipe_does_not_hang(bad_project: Path) -> None:
    os.mkfifo(bad_project / "issues" / "pipe.png")
    path = bad_project / "issues" / "2024-01-15.yaml"
    path.write_text(
        "subject: S\nsections:\n  - event:\n      title: T\n      image: {src: pipe.png, alt: A}\n"
    )
    outcome = run_cli(["check", str(path)], cwd=bad_project, env=ENV, timeout=10)
    assert_clean(outcome, "image pipe")
    assert "not a regular file" in outcome.output


# ---- CSV files -----------------------------------------------------------------------


@pytest.fixture
def listed(bad_project: Path) -> Path:
    """The project's database, holding one subscriber already."""
    store = Subscribers.open(bad_project / "data" / "subscribers.db")
    store.add("existing@example.com", "Déjà là")
    store.add("lea@example.com", "Léa")
    store.close()
    return bad_project / "data" / "subscribers.db"


@pytest.mark.parametrize(("name", "spec"), cases("csv"))
def test_bad_csv_files(bad_project: Path, listed: Path, name: str, spec: dict[str, Any]) -> None:
    path = BAD / "csv" / f"{name}.csv"
    before = db_snapshot(listed)
    outcome = run_cli(["subscribers", "import", str(path)], cwd=bad_project, env=ENV)
    assert_clean(outcome, name)
    assert outcome.exit_code == spec["exit"], outcome.output
    after = db_snapshot(listed)
    if spec["exit"] == 1:
        assert after == before, "a failed import changed the list"
    if "added" in spec:
        assert len(after) - len(before) == spec["added"], outcome.output
    if "rejected" in spec:
        assert f"rejected {spec['rejected']}" in outcome.stdout, outcome.output
    if "says" in spec:
        assert spec["says"] in outcome.output, outcome.output
    if "at" in spec:
        assert f"{path}:{spec['at']}:" in outcome.output, outcome.output
    if "stored" in spec:
        assert spec["stored"] in {row[0] for row in after}


def test_csv_paths_that_are_not_files(bad_project: Path, listed: Path) -> None:
    before = db_snapshot(listed)
    for what, path in special_files(bad_project):
        outcome = run_cli(["subscribers", "import", str(path)], cwd=bad_project, env=ENV)
        assert_clean(outcome, what)
        assert outcome.exit_code == 1, what
        assert str(path) in outcome.output
    assert db_snapshot(listed) == before


def test_test_domains_are_accepted_when_asked(bad_project: Path, listed: Path) -> None:
    path = BAD / "csv" / "test-domain.csv"
    args = ["subscribers", "import", str(path), "--allow-test-domains"]
    outcome = run_cli(args, cwd=bad_project, env=ENV)
    assert_clean(outcome, "test domains")
    assert outcome.exit_code == 0, outcome.output
    assert "a@b.test" in {row[0] for row in db_snapshot(listed)}


# ---- messages to the mailto unsubscribe address -----------------------------------------


@pytest.mark.parametrize(("name", "spec"), cases("messages"))
def test_bad_unsubscribe_messages(
    bad_project: Path, listed: Path, name: str, spec: dict[str, Any]
) -> None:
    message = (BAD / "messages" / f"{name}.eml").read_bytes()
    before = db_snapshot(listed)
    args = ["subscribers", "unsubscribe", "--from-message"]
    outcome = run_cli(args, cwd=bad_project, env=ENV, stdin=message)
    assert_clean(outcome, name)
    assert outcome.exit_code == spec["exit"], outcome.output
    if "says" in spec:
        assert spec["says"] in outcome.output, outcome.output
    if spec["exit"] != 0:
        assert db_snapshot(listed) == before


# ---- HTTP requests to the public side and the preview -----------------------------------


@pytest.fixture
def short_timeouts(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(GuardedH11, "header_timeout", 1.0)
    monkeypatch.setattr(webserver, "REQUEST_TIMEOUT", 1.0)


@pytest.fixture
def servers(
    bad_project: Path, listed: Path, project_settings: Settings, short_timeouts: None
) -> Iterator[dict[str, tuple[BackgroundServer, str]]]:
    preview = Preview(bad_project / "issues" / SAMPLE.name, bad_project / "qant.toml")
    public = BackgroundServer(serve_app(Context(project_settings, secret=SECRET.encode()), None))
    local = BackgroundServer(preview_app(preview))
    with public, local:
        yield {"serve": (public, ""), "preview": (local, preview.token)}


def exchange(port: int, request: bytes, timeout: float = 6.0) -> tuple[int | None, float]:
    """Send raw bytes; return the response's status (None: closed without one), and when."""
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        with contextlib.suppress(OSError):  # the server may close once it has seen enough
            sock.sendall(request)
        try:
            answer = sock.recv(64)
        except (ConnectionResetError, TimeoutError):
            answer = b""
    seconds = time.monotonic() - started
    if not answer.startswith(b"HTTP/1.1 "):
        return None, seconds
    return int(answer[9:12]), seconds


@pytest.mark.parametrize(("name", "spec"), cases("http"))
def test_bad_http_requests(
    servers: dict[str, tuple[BackgroundServer, str]], name: str, spec: dict[str, Any]
) -> None:
    server, token = servers[name.split("-", 1)[0]]
    request = (BAD / "http" / f"{name}.http").read_bytes().replace(b"{token}", token.encode())
    status, seconds = exchange(server.port, request)
    if spec.get("closed"):
        assert status is None
        assert seconds < 4, "a half-sent request held the connection"
    else:
        assert status == spec["status"], name
    healthy, _ = exchange(server.port, b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    assert healthy is not None, "the server did not survive"
    assert healthy < 500, "the server did not survive"


# ---- SMTP servers that misbehave --------------------------------------------------------


@pytest.mark.parametrize(("name", "spec"), cases("smtp"))
def test_misbehaving_smtp_servers(
    project: Path, faulty_smtp: FaultyServerFactory, name: str, spec: dict[str, Any]
) -> None:
    fields: dict[str, Any] = {
        key: frozenset(value) if isinstance(value, list) else value
        for key, value in spec["behaviour"].items()
    }
    behaviour = Behaviour(**fields)
    server = faulty_smtp(behaviour)
    env = {
        **ENV,
        "QANT_SMTP_HOST": server.host,
        "QANT_SMTP_PORT": str(server.port),
        "QANT_SMTP_SECURITY": "none",
        "QANT_SENDING_RETRY_AFTER_SECONDS": "0.05",
        "QANT_SENDING_MAX_ATTEMPTS": "3",
        **{f"QANT_SMTP_{k.upper()}": str(v) for k, v in spec.get("settings", {}).items()},
        **{f"QANT_SENDING_{k.upper()}": str(v) for k, v in spec.get("sending", {}).items()},
    }
    store = Subscribers.open(project / "data" / "subscribers.db")
    store.import_rows("email\n" + "".join(f"reader{n}@example.com\n" for n in range(3)), "t")
    store.close()
    args = ["send", "issues/2023-11-20.yaml", "--yes"]
    outcome = run_cli(args, cwd=project, env=env, timeout=40)
    assert_clean(outcome, name)
    assert outcome.exit_code == spec["exit"], outcome.output
    if "says" in spec:
        assert spec["says"] in outcome.output, outcome.output
    ledger = Ledger(project / "data" / "subscribers.db")
    found = ledger.find("2023-11-20")
    assert found is not None
    counts = {state.value: n for state, n in ledger.counts(found).items() if n}
    ledger.close()
    assert counts == spec["states"], outcome.output
    # Nothing recorded sent that the server did not take.
    assert counts.get("sent", 0) == sum(server.recipients().values())


# ---- fuzzing -------------------------------------------------------------------------

FUZZ = settings(
    max_examples=100,
    derandomize=True,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
SAMPLE_TEXT = SAMPLE.read_text(encoding="utf-8")
SAMPLE_LINES = SAMPLE_TEXT.splitlines(keepends=True)
NASTY = [
    "\x00",
    "\x1b",
    "\r",
    "\u2028",
    "&a ",
    "*a",
    "!!int ",
    "!!binary ",
    "[",
    "{",
    "]",
    "- ",
    ":",
    "'",
    '"',
    "|",
    ">",
    "%",
    "@",
    "`",
    "#",
    "\t",
    "2024-02-30",
    "9" * 50,
    "<b>",
    "](javascript:x)",
    "é",
    "\ufeff",
    "\ud7ff",
    " " * 40,
]


def mutate(text: list[str], edits: list[tuple[int, int, str]]) -> str:
    lines = list(text)
    for kind, where, piece in edits:
        index = where % len(lines)
        if kind == 0:
            lines[index] = piece + lines[index]
        elif kind == 1:
            line = lines[index]
            cut = where % (len(line) + 1)
            lines[index] = line[:cut] + piece + line[cut:]
        elif kind == 2:
            del lines[index]
            if not lines:
                lines = [piece]
        else:
            lines.insert(index, lines[(where * 7) % len(lines)])
    return "".join(lines)


EDITS = strategies.lists(
    strategies.tuples(
        strategies.integers(0, 3), strategies.integers(0, 10_000), strategies.sampled_from(NASTY)
    ),
    min_size=1,
    max_size=6,
)


@FUZZ
@given(edits=EDITS)
def test_fuzzed_issues_never_crash_or_hang(bad_project: Path, edits: list[Any]) -> None:
    path = bad_project / "issues" / "2023-11-20.yaml"
    path.write_text(mutate(SAMPLE_LINES, edits), encoding="utf-8", errors="surrogatepass")
    outcome = run_cli(["check", "issues/2023-11-20.yaml"], cwd=bad_project, env=ENV, timeout=20)
    assert_clean(outcome, f"edits {edits}")
    assert outcome.exit_code in (0, 1)
    if outcome.exit_code == 1:
        assert "issues/2023-11-20.yaml:" in outcome.output


CSV_LINES = [
    "email,name\n",
    *(f"reader{n}@example.com,Lecteur {n}\n" for n in range(8)),
    '"quoted@example.com","Dupont, Jean"\n',
    "idn@bücher.example,Buch\n",
]


@FUZZ
@given(edits=EDITS)
def test_fuzzed_csv_files_never_crash_or_hang(
    bad_project: Path, listed: Path, edits: list[Any]
) -> None:
    path = bad_project / "readers.csv"
    path.write_text(mutate(CSV_LINES, edits), encoding="utf-8", errors="surrogatepass")
    before = db_snapshot(listed)
    outcome = run_cli(["subscribers", "import", str(path)], cwd=bad_project, env=ENV)
    assert_clean(outcome, f"edits {edits}")
    assert outcome.exit_code in (0, 1, 3), outcome.output
    if outcome.exit_code == 1:
        assert db_snapshot(listed) == before
    # The list never holds one mailbox twice, whatever the case or the IDNA form.
    emails = [row[0].lower() for row in db_snapshot(listed)]
    assert len(emails) == len(set(emails))


def test_the_corpus_is_all_exercised() -> None:
    for kind, suffix in (
        ("issues", ".yaml"),
        ("csv", ".csv"),
        ("messages", ".eml"),
        ("http", ".http"),
    ):
        files = {p.name.removesuffix(suffix) for p in (BAD / kind).glob(f"*{suffix}")}
        assert files == set(CASES[kind]), kind
    # Bounces too (run by test_bounces, against a real send): some are made, not stored.
    stored = {p.name.removesuffix(".eml") for p in (BAD / "bounces").glob("*.eml")}
    made = {name for name, case in CASES["bounces"].items() if "make" in case}
    assert stored == set(CASES["bounces"]) - made


# ---- the signup form -------------------------------------------------------------------


FORM_TEXT = strategies.text(
    strategies.characters(codec="utf-8", exclude_categories=["Cs"]), max_size=80
) | strategies.sampled_from(
    ["lea@example.com", "default", "all", "a@b", "x" * 400, "\r\nBcc: x@evil", "%00"]
)


@FUZZ
@given(
    fields=strategies.lists(
        strategies.tuples(
            strategies.sampled_from(["email", "name", "newsletter", "form", "website", "x"]),
            FORM_TEXT,
        ),
        max_size=8,
    )
)
def test_fuzzed_signup_forms_never_fail_and_mail_only_valid_addresses(
    project: Path, fields: list[tuple[str, str]]
) -> None:
    from urllib.parse import urlencode

    from starlette.testclient import TestClient

    from qant_mail.app.context import Context
    from qant_mail.base.config import load_settings
    from qant_mail.delivery.transport import MemoryTransport
    from qant_mail.web.serve import create_app

    # What the signup queues is delivered here, to memory, once the form has answered.
    transport = MemoryTransport()
    settings = load_settings(project / "qant.toml", env={})
    ctx = Context(settings, env={}, transport=transport, secret=b"s" * 32)
    app = create_app(ctx, None, drain=False)
    body = urlencode(fields).encode()
    answer = TestClient(app).post(
        "/subscribe",
        content=body,
        headers={"Content-Type": "application/x-www-form-urlencoded"},
    )
    assert answer.status_code in (200, 400, 413), answer.text
    assert "Traceback" not in answer.text
    ctx.outbox.drain()
    for _, address, data in transport.messages:
        assert "\r" not in address
        assert "\n" not in address
        assert data.count(b"\r\nTo: ") == 1
