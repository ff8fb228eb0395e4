"""`qant-mail doctor`: every check against real servers on loopback: a small DNS server
answering from a dict, the public side (`serve`), a web server of links, an SMTP relay."""

from __future__ import annotations

import dataclasses
import http.server
import json
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import dns.message
import dns.rcode
import dns.rdatatype
import dns.rrset
import pytest
from aiosmtpd.controller import Controller
from starlette.testclient import TestClient
from typer.testing import CliRunner, Result

from qant_mail.app import doctor
from qant_mail.app.context import Context
from qant_mail.app.doctor import Check, DoctorReport, Status
from qant_mail.audience import tokens
from qant_mail.authoring.archive import build_archive
from qant_mail.base.config import Settings, load_settings
from qant_mail.base.errors import ExitCode
from qant_mail.delivery import dkim
from qant_mail.store.subscribers import Status as ReaderStatus
from qant_mail.store.subscribers import Subscribers
from qant_mail.web.serve import create_app
from qant_mail.web.webserver import BackgroundServer
from tests.smtp_server import ScriptedHandler, SmtpServer, _login, free_port

SECRET = "the-site-secret-for-the-doctor-tests"
DOMAIN = "qant.example"  # the sender's domain in the repository's settings
SELECTOR = "s1"
TIMEOUT = 1.0  # [doctor] timeout: the slow link is twice as slow


# ---- a DNS server on loopback ----------------------------------------------------------


@dataclass
class DnsServer:
    """Answers UDP queries from `records` ((name, type) → values in zone-file syntax);
    a name it knows of no type has no record of that type, any other name does not
    exist; a name in `silent` gets no answer at all."""

    records: dict[tuple[str, str], list[str]]
    silent: set[str] = field(default_factory=set)
    asked: Counter[str] = field(default_factory=Counter)

    def __post_init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.settimeout(0.05)
        self.port: int = self.sock.getsockname()[1]
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _serve(self) -> None:
        while not self.stop.is_set():
            try:
                wire, client = self.sock.recvfrom(4096)
            except TimeoutError:
                continue
            query = dns.message.from_wire(wire)
            question = query.question[0]
            name = question.name.to_text(omit_final_dot=True).lower()
            kind = dns.rdatatype.to_text(question.rdtype)
            self.asked[f"{kind} {name}"] += 1
            if name in self.silent:
                continue
            response = dns.message.make_response(query)
            values = self.records.get((name, kind))
            if values:
                response.answer.append(dns.rrset.from_text(question.name, 300, "IN", kind, *values))
            elif not any(known == name for known, _ in self.records):
                response.set_rcode(dns.rcode.NXDOMAIN)
            self.sock.sendto(response.to_wire(), client)

    def close(self) -> None:
        self.stop.set()
        self.thread.join(5)
        self.sock.close()


def txt(value: str) -> str:
    """Return a TXT value in zone-file syntax: strings of 255 characters at most."""
    return " ".join(f'"{value[i : i + 255]}"' for i in range(0, len(value), 255))


# ---- a web server of links ---------------------------------------------------------------


class _Links(http.server.BaseHTTPRequestHandler):
    """/ok, /no-head (405 to HEAD), /missing (404), /loop-a ⇄ /loop-b, /slow."""

    hits: Counter[str]

    def do_HEAD(self) -> None:
        self._answer(head=True)

    def do_GET(self) -> None:
        self._answer(head=False)

    def _answer(self, head: bool) -> None:
        self.hits[f"{self.command} {self.path}"] += 1
        if self.path == "/slow":
            time.sleep(TIMEOUT * 2)
        if self.path == "/no-head" and head:
            self.send_response(405)
        elif self.path in ("/ok", "/no-head", "/slow"):
            self.send_response(200)
        elif self.path == "/loop-a":
            self.send_response(302)
            self.send_header("Location", "/loop-b")
        elif self.path == "/loop-b":
            self.send_response(301)
            self.send_header("Location", "/loop-a")
        else:
            self.send_response(404)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: Any) -> None:
        pass


@dataclass
class LinkServer:
    url: str
    hits: Counter[str]


@pytest.fixture
def link_server() -> Iterator[LinkServer]:
    hits: Counter[str] = Counter()
    handler = type("Links", (_Links,), {"hits": hits})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield LinkServer(f"http://127.0.0.1:{server.server_address[1]}", hits)
    finally:
        server.shutdown()
        server.server_close()


# ---- the world a send talks to -------------------------------------------------------------


@dataclass
class World:
    """The servers of a send on loopback, and the settings and environment that point at
    them, everything right to begin with."""

    dns: DnsServer
    site: BackgroundServer
    links: LinkServer
    smtp: SmtpServer
    settings: Settings
    env: dict[str, str]
    key: dkim.DkimKey

    def context(self) -> Context:
        return Context(self.settings, env=self.env, secret=SECRET.encode())

    def run(self, issue: Path | None = None, *, offline: bool = False) -> DoctorReport:
        return doctor.run(self.context(), issue, offline=offline)

    def with_settings(self, **tables: Any) -> None:
        """Change tables of the settings: `smtp={"port": 1}`."""
        changes = {
            name: getattr(self.settings, name).model_copy(update=values)
            for name, values in tables.items()
        }
        self.settings = dataclasses.replace(self.settings, **changes)


@pytest.fixture
def world(
    project_settings: Settings,
    smtp_server: SmtpServer,
    link_server: LinkServer,
) -> Iterator[World]:
    pem, _ = dkim.generate("rsa")
    key = dkim.load_key(pem, domain=DOMAIN, selector=SELECTOR, where="test")
    records = {
        (f"{SELECTOR}._domainkey.{DOMAIN}", "TXT"): [txt(key.record)],
        (DOMAIN, "TXT"): [txt("v=spf1 ip4:127.0.0.1 -all")],
        (f"_dmarc.{DOMAIN}", "TXT"): [txt("v=DMARC1; p=reject; adkim=s; aspf=r")],
        (DOMAIN, "MX"): [f"10 mx.{DOMAIN}."],
    }
    dns_server = DnsServer(records)
    archive = build_archive(project_settings, project_settings.output_dir / "archive").folder
    site = BackgroundServer(
        create_app(Context(project_settings, secret=SECRET.encode()), archive, drain=False)
    )
    env = {
        "QANT_DKIM_PRIVATE_KEY": pem.decode(),
        "QANT_SMTP_PASSWORD": "right password",
        "QANT_SECRET_KEY": SECRET,
    }
    settings = project_settings
    newsletter = settings.newsletter.model_copy(update={"base_url": site.url.rstrip("/")})
    settings = dataclasses.replace(
        settings,
        newsletter=newsletter,
        editions={
            newsletter.id: dataclasses.replace(settings.edition, newsletter=newsletter),
        },
    )
    made = World(dns_server, site, link_server, smtp_server, settings, env, key)
    made.with_settings(
        smtp={
            "host": smtp_server.host,
            "port": smtp_server.port,
            "security": "none",
            "username": "qant",
        },
        dkim={"selector": SELECTOR},
        doctor={"nameserver": dns_server.address, "timeout": TIMEOUT, "link_cache_hours": 0},
    )
    with site:
        yield made
    dns_server.close()


@pytest.fixture
def issue(project: Path, link_server: LinkServer) -> Path:
    """An issue whose links all answer (one refuses HEAD and answers GET)."""
    path = project / "issues" / "2024-01-15.yaml"
    path.write_text(issue_linking(link_server, "/ok", "/no-head"), encoding="utf-8")
    return path


def issue_linking(link_server: LinkServer, *paths: str) -> str:
    links = " ".join(f"[lien {n}]({link_server.url}{p})" for n, p in enumerate(paths))
    return (
        "date: 2024-01-15\nsubject: Un sujet\nsections:\n  - event:\n"
        f"      title: Un titre\n      body: Un texte et {links}.\n"
    )


def named(report: DoctorReport, start: str) -> Check:
    """Return the one check whose name starts with `start`."""
    (found,) = [c for c in report.checks if c.name.startswith(start)]
    return found


def not_ok(report: DoctorReport) -> list[Check]:
    return [c for c in report.checks if c.status not in (Status.OK, Status.SKIPPED)]


# ---- everything right ----------------------------------------------------------------------


def test_everything_right_passes_every_check_and_exits_0(world: World, issue: Path) -> None:
    report = world.run(issue)
    assert not_ok(report) == []
    assert report.exit_code == ExitCode.OK
    names = [c.name for c in report.checks]
    for expected in (
        "DKIM keys",
        "envelope sender",
        "base_url",
        f"DKIM {SELECTOR}._domainkey.{DOMAIN}",
        f"SPF {DOMAIN}",
        f"DMARC {DOMAIN}",
        f"bounces MX {DOMAIN}",
        "site",
        "one-click unsubscribe",
        "archive",
        "feed",
        "links",
        f"relay 127.0.0.1:{world.smtp.port}",
    ):
        assert expected in names
    assert "login as qant" in named(report, "relay").detail
    assert "DKIM aligned and SPF aligned" in named(report, "DMARC").detail
    assert world.links.hits["HEAD /no-head"] == 1
    assert world.links.hits["GET /no-head"] == 1


def test_doctor_on_the_command_line_prints_a_line_per_check_and_json(
    world: World, issue: Path, project: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_settings(project, world)
    result = run_cli(project, monkeypatch, world.env, "doctor", str(issue))
    assert result.exit_code == ExitCode.OK, result.output
    assert f"✓ SPF {DOMAIN}: v=spf1 ip4:127.0.0.1 -all" in result.output
    assert result.output.rstrip().endswith("0 blocking, 0 warnings, 13 ok")
    as_json = run_cli(project, monkeypatch, world.env, "doctor", str(issue), "--json")
    data = json.loads(as_json.output)
    assert data["exit_code"] == 0
    assert {c["status"] for c in data["checks"]} == {"ok"}


def write_settings(project: Path, world: World) -> None:
    """Point the project's qant.toml at the world, as `world.settings` does."""
    path = project / "qant.toml"
    text = path.read_text(encoding="utf-8")
    text = text.replace(
        'base_url = "https://lettre.qant.example"', f'base_url = "{world.site.url}"'
    )
    text = text.replace("[smtp]\n", "[smtp]\n" + 'username = "qant"\n', 1)
    text = text.replace("port = 2525", f"port = {world.smtp.port}", 1)
    text += (
        f'\n[dkim]\nselector = "{SELECTOR}"\n\n'
        f'[doctor]\nnameserver = "{world.dns.address}"\ntimeout = {TIMEOUT}\nlink_cache_hours = 0\n'
    )
    path.write_text(text, encoding="utf-8")
    assert load_settings(path, env={}).smtp.port == world.smtp.port


def run_cli(
    project: Path, monkeypatch: pytest.MonkeyPatch, env: dict[str, str], *args: str
) -> Result:
    from qant_mail.cli import app

    monkeypatch.chdir(project)
    monkeypatch.delenv("QANT_CONFIG", raising=False)
    return CliRunner().invoke(app, list(args), env=env, catch_exceptions=False)


# ---- DNS -------------------------------------------------------------------------------


def test_a_missing_dkim_record_blocks_and_says_the_record_to_publish(world: World) -> None:
    del world.dns.records[(f"{SELECTOR}._domainkey.{DOMAIN}", "TXT")]
    report = world.run()
    check = named(report, "DKIM s1")
    assert check.status is Status.BLOCKING
    assert f"publish: {SELECTOR}._domainkey.{DOMAIN}. IN TXT " in check.advice
    # The record to publish, cut in strings of 255 characters, is this key's.
    published = "".join(check.advice.split(" IN TXT ", 1)[1].replace('" "', "").strip('"'))
    assert published == world.key.record
    assert report.exit_code == ExitCode.BLOCKING


def test_a_dkim_record_of_another_key_blocks(world: World) -> None:
    other, _ = dkim.generate("rsa")
    stranger = dkim.load_key(other, domain=DOMAIN, selector=SELECTOR, where="test")
    world.dns.records[(f"{SELECTOR}._domainkey.{DOMAIN}", "TXT")] = [txt(stranger.record)]
    check = named(world.run(), "DKIM s1")
    assert check.status is Status.BLOCKING
    assert "not the one that signs" in check.detail
    assert world.key.record[-40:] in check.advice.replace('" "', "")


def test_a_revoked_dkim_record_blocks(world: World) -> None:
    world.dns.records[(f"{SELECTOR}._domainkey.{DOMAIN}", "TXT")] = [txt("v=DKIM1; k=rsa; p=")]
    assert "revoked" in named(world.run(), "DKIM s1").detail


def test_a_missing_spf_record_is_a_warning(world: World) -> None:
    del world.dns.records[(DOMAIN, "TXT")]
    report = world.run()
    check = named(report, "SPF")
    assert check.status is Status.WARNING
    assert f'{DOMAIN}. IN TXT "v=spf1' in check.advice
    assert not_ok(report) == [check]
    assert report.exit_code == ExitCode.WARNINGS


def test_a_missing_dmarc_record_is_a_warning(world: World) -> None:
    del world.dns.records[(f"_dmarc.{DOMAIN}", "TXT")]
    report = world.run()
    check = named(report, "DMARC")
    assert check.status is Status.WARNING
    assert f'_dmarc.{DOMAIN}. IN TXT "v=DMARC1; p=none' in check.advice
    assert report.exit_code == ExitCode.WARNINGS
    # The parent domains were asked too (the organisational domain may hold the policy).
    assert world.dns.asked[f"TXT _dmarc.{DOMAIN}"] == 1


def test_dmarc_that_nothing_aligns_with_blocks_when_it_rejects(world: World) -> None:
    # Signed on another domain, and an envelope that strict SPF alignment refuses.
    world.dns.records[(f"_dmarc.{DOMAIN}", "TXT")] = [txt("v=DMARC1; p=reject; aspf=s")]
    world.dns.records[(f"{SELECTOR}._domainkey.elsewhere.example", "TXT")] = [txt(world.key.record)]
    world.with_settings(
        dkim={"selector": SELECTOR, "domain": "elsewhere.example"},
        bounces={"address": f"bounces@news.{DOMAIN}"},
    )
    world.dns.records[(f"news.{DOMAIN}", "MX")] = [f"10 mx.{DOMAIN}."]
    report = world.run()
    check = named(report, "DMARC")
    assert check.status is Status.BLOCKING
    assert "neither a signature that verifies and aligns (elsewhere.example)" in check.detail
    assert named(report, "DKIM alignment").status is Status.WARNING


def test_an_envelope_domain_without_mx_or_address_blocks(world: World) -> None:
    del world.dns.records[(DOMAIN, "MX")]
    check = named(world.run(), "bounces MX")
    assert check.status is Status.BLOCKING
    assert f"{DOMAIN}. IN MX" in check.advice


def test_a_dns_server_that_does_not_answer_is_said_not_taken_for_missing_records(
    world: World,
) -> None:
    world.dns.silent.add(DOMAIN)
    report = world.run()
    for name in ("SPF", "bounces MX"):
        check = named(report, name)
        assert check.status is Status.WARNING
        assert "could not ask" in check.detail
        assert "in time" in check.detail


# ---- the public side and the links ---------------------------------------------------------


def test_the_one_click_probe_answers_like_a_success_and_changes_nobody(
    project_settings: Settings,
) -> None:
    with Subscribers.open(project_settings.store_path) as store:
        store.import_rows("email,name\nlea@example.com,Léa\n", "test")
        before = [(s.email, s.status) for s in store.all()]
    app = create_app(Context(project_settings, secret=SECRET.encode()), None, drain=False)
    form = {"Content-Type": "application/x-www-form-urlencoded"}
    body = "List-Unsubscribe=One-Click"
    with TestClient(app) as client:
        probe = tokens.make_probe(SECRET.encode())
        assert client.post(f"/unsubscribe/{probe}", content=body, headers=form).status_code == 200
        # Signed with another secret, it is any forged link.
        forged = tokens.make_probe(b"another secret of enough bytes")
        assert client.post(f"/unsubscribe/{forged}", content=body, headers=form).status_code == 404
    with Subscribers.open(project_settings.store_path) as store:
        assert (
            [(s.email, s.status) for s in store.all()]
            == before
            == [("lea@example.com", ReaderStatus.ACTIVE)]
        )


def test_a_site_with_another_secret_blocks_the_one_click_check(world: World) -> None:
    world.env["QANT_SECRET_KEY"] = "a-secret-the-site-does-not-know"
    context = Context(world.settings, env=world.env)
    check = named(doctor.run(context, None), "one-click")
    assert check.status is Status.BLOCKING
    assert "QANT_SECRET_KEY" in check.advice


def test_a_site_that_is_down_blocks(world: World) -> None:
    newsletter = world.settings.newsletter.model_copy(
        update={"base_url": f"http://127.0.0.1:{free_port()}"}
    )
    world.settings = dataclasses.replace(world.settings, newsletter=newsletter)
    report = world.run()
    assert named(report, "site").status is Status.BLOCKING
    assert named(report, "one-click").status is Status.BLOCKING
    assert "connection refused" in named(report, "site").detail
    assert named(report, "feed").status is Status.WARNING


def test_broken_links_a_redirect_loop_and_a_timeout_are_each_reported(
    world: World, issue: Path, link_server: LinkServer
) -> None:
    issue.write_text(
        issue_linking(link_server, "/ok", "/missing", "/loop-a", "/slow"), encoding="utf-8"
    )
    started = time.monotonic()
    report = world.run(issue)
    url = link_server.url
    assert [c.name for c in report.checks if c.name.startswith("link")] == [
        f"link {url}/missing",
        f"link {url}/loop-a",
        f"link {url}/slow",
    ]
    assert named(report, f"link {url}/missing").detail == "404 Not Found"
    assert named(report, f"link {url}/loop-a").detail == (
        f"redirect loop: {url}/loop-a → {url}/loop-b → {url}/loop-a"
    )
    assert "timed out" in named(report, f"link {url}/slow").detail
    assert {c.status for c in not_ok(report)} == {Status.WARNING}
    assert report.exit_code == ExitCode.WARNINGS
    # Asked at once, not one after the other: one timeout, not one per link.
    assert time.monotonic() - started < TIMEOUT * 6


def test_a_link_that_answered_is_not_asked_again_while_the_cache_remembers(
    world: World, issue: Path, link_server: LinkServer
) -> None:
    world.with_settings(doctor={"link_cache_hours": 1})
    world.run(issue)
    world.run(issue)
    assert link_server.hits["HEAD /ok"] == 1
    # A link that failed is asked again: it may have been fixed.
    issue.write_text(issue_linking(link_server, "/missing"), encoding="utf-8")
    world.run(issue)
    world.run(issue)
    assert link_server.hits["HEAD /missing"] == 2


# ---- the relay ---------------------------------------------------------------------------


def test_a_relay_refusing_the_login_blocks(world: World) -> None:
    world.env["QANT_SMTP_PASSWORD"] = "wrong password"
    report = world.run()
    check = named(report, "relay")
    assert check.status is Status.BLOCKING
    assert "refused the login of 'qant'" in check.detail
    assert "QANT_SMTP_PASSWORD" in check.advice


@pytest.fixture
def small_relay() -> Iterator[int]:
    """A relay that states it takes messages of 20,000 bytes at most (EHLO SIZE)."""
    port = free_port()
    controller = Controller(
        ScriptedHandler(),
        hostname="127.0.0.1",
        port=port,
        authenticator=_login,
        auth_require_tls=False,
        data_size_limit=20_000,
    )
    controller.start()
    yield port
    controller.stop()


def test_a_message_larger_than_the_relay_takes_blocks_and_is_remembered_offline(
    world: World, issue: Path, small_relay: int
) -> None:
    world.with_settings(smtp={"port": small_relay})
    check = named(world.run(issue), "relay")
    assert check.status is Status.BLOCKING
    assert "takes up to 20.0 KB" in check.detail
    assert 'images.mode = "host"' in check.advice
    # What the relay said is kept: the checks without network (those of `send`) know it.
    prepared_report = world.run(issue, offline=True)
    assert named(prepared_report, "message size").status is Status.BLOCKING


# ---- without the network -----------------------------------------------------------------


def test_offline_makes_no_network_call(
    world: World, issue: Path, link_server: LinkServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[str] = []

    def refuse(name: str) -> Callable[..., Any]:
        def refused(*args: Any, **kwargs: Any) -> Any:
            calls.append(name)
            raise AssertionError(f"socket.{name} called offline")

        return refused

    for name in ("connect", "connect_ex", "sendto"):
        monkeypatch.setattr(socket.socket, name, refuse(name))
    monkeypatch.setattr(socket, "getaddrinfo", refuse("getaddrinfo"))
    report = world.run(issue, offline=True)
    assert calls == []
    assert not_ok(report) == []
    assert named(report, "network").status is Status.SKIPPED
    assert sum(world.dns.asked.values()) == 0
    assert sum(link_server.hits.values()) == 0


def test_offline_checks_block_a_selector_without_its_key(world: World, issue: Path) -> None:
    del world.env["QANT_DKIM_PRIVATE_KEY"]
    report = world.run(issue, offline=True)
    check = named(report, "DKIM keys")
    assert check.status is Status.BLOCKING
    assert "QANT_DKIM_PRIVATE_KEY" in check.detail
    assert report.exit_code == ExitCode.BLOCKING


def test_offline_checks_of_a_prepared_send_are_what_send_can_call(
    world: World, issue: Path
) -> None:
    from qant_mail.app import issues

    context = world.context()
    checks = doctor.offline_checks(context, issues.prepare(context, issue))
    assert [c.name for c in checks] == ["DKIM keys", "envelope sender", "base_url", "message size"]
    assert {c.status for c in checks} == {Status.OK}


def test_plain_http_base_url_elsewhere_is_a_warning(world: World) -> None:
    newsletter = world.settings.newsletter.model_copy(update={"base_url": "http://news.example"})
    world.settings = dataclasses.replace(world.settings, newsletter=newsletter)
    check = named(world.run(offline=True), "base_url")
    assert check.status is Status.WARNING
    assert "https" in check.advice


# ---- bad input -------------------------------------------------------------------------------


def test_an_issue_with_errors_is_a_blocking_check_and_the_rest_still_runs(
    world: World, issue: Path
) -> None:
    issue.write_text(issue.read_text(encoding="utf-8") + "draft: true\n", encoding="utf-8")
    report = world.run(issue, offline=True)
    check = named(report, "issue")
    assert check.status is Status.BLOCKING
    assert "draft" in check.detail
    assert named(report, "DKIM keys").status is Status.OK


def test_a_missing_file_or_a_bad_nameserver_is_an_error_not_a_traceback(
    world: World, project: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_settings(project, world)
    missing = run_cli(project, monkeypatch, world.env, "doctor", "nope.yaml", "--offline")
    assert missing.exit_code == ExitCode.INVALID
    assert "no such file" in missing.output
    env = {**world.env, "QANT_DOCTOR_NAMESERVER": "dns.example"}
    bad = run_cli(project, monkeypatch, env, "doctor", "--offline")
    assert bad.exit_code == ExitCode.INVALID
    assert "error: invalid settings" in bad.output
    assert "QANT_DOCTOR_NAMESERVER" in bad.output
    assert "Traceback" not in missing.output + bad.output
