"""Secrets: each read from its variable or from the file its `_FILE` twin names (systemd
credentials, container secrets), through the commands that use it; the link-signing
secret rotated without breaking what was mailed; a database's refusal of the password
naming the variable to set."""

from __future__ import annotations

import dataclasses
import os
import re
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Literal

import dkim as dkimpy
import pytest
from starlette.testclient import TestClient

from qant_mail.app import issues, sending
from qant_mail.app.bounces import Letter, Outcome, process
from qant_mail.app.context import Context
from qant_mail.audience import tokens
from qant_mail.authoring.archive import build_archive
from qant_mail.base.config import Bounces, Settings
from qant_mail.base.errors import ConfigError, ExitCode
from qant_mail.base.secrets import secret
from qant_mail.delivery import dkim
from qant_mail.delivery.transport import MemoryTransport
from qant_mail.store.subscribers import Status, Subscribers
from qant_mail.web.serve import create_app
from tests.conftest import ROOT
from tests.imap_server import ImapServer, ImapState
from tests.isolated import Outcome as Run
from tests.isolated import run_cli
from tests.postgres import url_of
from tests.smtp_server import SmtpServer

SAMPLE = "issues/2023-11-20.yaml"
OLD_KEY = "the-key-links-were-signed-with-in-2025"
NEW_KEY = "the-key-that-signs-from-now-on-2026"
ONE_CLICK = {"Content-Type": "application/x-www-form-urlencoded"}


def secret_file(folder: Path, text: str) -> Path:
    """Write `text` as a secret's file would be (0600, a line end after it); its path."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"secret-{len(list(folder.iterdir()))}"
    handle = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(handle, "w", encoding="utf-8") as out:
        out.write(text + "\n")
    return path


# ---- the one reader of secrets ---------------------------------------------------------


def test_a_secret_comes_from_its_variable_or_from_the_file_its_FILE_twin_names(
    tmp_path: Path,
) -> None:
    assert secret({"QANT_X": "from the variable"}, "QANT_X") == "from the variable"
    assert secret({}, "QANT_X") is None
    assert secret({"QANT_X": "", "QANT_X_FILE": ""}, "QANT_X") is None
    # One line end is dropped (what `echo` and editors add); the secret's own spaces stay.
    for written, read in [("pass\n", "pass"), ("pass\r\n", "pass"), ("pass \n\n", "pass \n")]:
        path = tmp_path / "s"
        path.write_bytes(written.encode())
        assert secret({"QANT_X_FILE": str(path)}, "QANT_X") == read


def test_a_secret_set_both_ways_is_refused_naming_both(tmp_path: Path) -> None:
    path = secret_file(tmp_path, "in the file")
    with pytest.raises(ConfigError, match="QANT_X and QANT_X_FILE are both set") as caught:
        secret({"QANT_X": "in the variable", "QANT_X_FILE": str(path)}, "QANT_X")
    assert "in the" not in str(caught.value)


def test_a_secret_file_that_cannot_be_used_is_named_with_its_variable_never_its_content(
    tmp_path: Path,
) -> None:
    empty = tmp_path / "empty"
    empty.write_bytes(b"")
    binary = tmp_path / "binary"
    binary.write_bytes(b"\xff\xfesecret")
    cases = {
        tmp_path / "missing": "cannot read: No such file or directory",
        tmp_path: "cannot read: is a folder",
        empty: "is empty",
        binary: "not UTF-8",
    }
    for path, why in cases.items():
        with pytest.raises(ConfigError) as caught:
            secret({"QANT_X_FILE": str(path)}, "QANT_X")
        assert str(caught.value).startswith(f"QANT_X_FILE: {path}"), caught.value
        assert why in str(caught.value)
        assert "secret" not in str(caught.value).replace(str(tmp_path), "")


# ---- every secret through a _FILE, through the command that uses it -------------------


@dataclasses.dataclass
class Setup:
    """A project folder, a folder outside it (for secrets' files), the test's fixtures."""

    project: Path
    elsewhere: Path
    request: pytest.FixtureRequest

    @property
    def secrets(self) -> Path:
        return self.elsewhere / "secrets"

    def run(self, *args: str, env: dict[str, str]) -> Run:
        outcome = run_cli(list(args), cwd=self.project, env=env)
        assert outcome.traceback == "", outcome.traceback
        return outcome

    def subscribe(self) -> None:
        (self.project / "list.csv").write_text("email\nlea@example.com\n")
        imported = self.run("subscribers", "import", "list.csv", env={})
        assert imported.exit_code == ExitCode.OK, imported.output

    def dry_run(self, env: dict[str, str]) -> bytes:
        """Send the sample to the list (Léa) as a dry run; the message she would get."""
        self.subscribe()
        folder = self.elsewhere / "dry"
        sent = self.run("send", SAMPLE, "--dry-run", "--yes", "-o", str(folder), env=env)
        assert sent.exit_code == ExitCode.OK, sent.output
        (path,) = (folder / "new").iterdir()
        return path.read_bytes()


def _link_secret(name: str) -> Callable[[Setup], None]:
    def case(setup: Setup) -> None:
        keys = f"{NEW_KEY}\n{OLD_KEY}" if name.endswith("KEYS") else NEW_KEY
        path = secret_file(setup.secrets, keys)
        message = setup.dry_run({f"{name}_FILE": str(path)})
        found = re.search(rb"List-Unsubscribe:\s*<[^>]*/unsubscribe/([^>]+)>", message)
        assert found is not None
        token = found[1].decode()
        reader = tokens.subscriber_id(token)
        assert reader is not None
        # Signed with the file's (first) key, without its line end.
        assert tokens.verify(NEW_KEY.encode(), token, reader, "lea@example.com")

    return case


def _dkim_key(name: str) -> Callable[[Setup], None]:
    def case(setup: Setup) -> None:
        kind: Literal["rsa", "ed25519"] = "ed25519" if "ED25519" in name else "rsa"
        pem, public = dkim.generate(kind)
        path = secret_file(setup.secrets, pem.decode())
        setting = "QANT_DKIM_ED25519_SELECTOR" if kind == "ed25519" else "QANT_DKIM_SELECTOR"
        env = {f"{name}_FILE": str(path), setting: "file2026", "QANT_SECRET_KEY": NEW_KEY}
        message = setup.dry_run(env)
        record = dkim.dns_record(kind, public).encode()

        def dns(query: bytes, timeout: int = 5) -> bytes:
            assert query == b"file2026._domainkey.qant.example."
            return record

        assert f"a={kind}-sha256".encode() in message
        assert dkimpy.verify(message, dnsfunc=dns)

    return case


def _smtp_password(setup: Setup) -> None:
    server: SmtpServer = setup.request.getfixturevalue("smtp_server")
    relay = {
        "QANT_SMTP_HOST": server.host,
        "QANT_SMTP_PORT": str(server.port),
        "QANT_SMTP_SECURITY": "none",
        "QANT_SMTP_USERNAME": "qant",
        "QANT_SECRET_KEY": NEW_KEY,
    }
    path = secret_file(setup.secrets, "right password")
    sent = setup.run(
        "send",
        SAMPLE,
        "--to",
        "me@example.com",
        env={**relay, "QANT_SMTP_PASSWORD_FILE": str(path)},
    )
    assert sent.exit_code == ExitCode.OK, sent.output
    assert [r.recipient for r in server.handler.received] == ["me@example.com"]


def _bounces_password(setup: Setup) -> None:
    path = secret_file(setup.secrets, "imap-password-from-a-file")
    state = ImapState("bounces", "imap-password-from-a-file")
    with ImapServer(state):
        source = f"imap://bounces@127.0.0.1:{state.port}/INBOX"
        env = {"QANT_BOUNCES_PASSWORD_FILE": str(path), "QANT_SECRET_KEY": NEW_KEY}
        read = setup.run("bounces", source, env=env)
    assert read.exit_code == ExitCode.OK, read.output


def _store_password(setup: Setup) -> None:
    url: str = setup.request.getfixturevalue("password_store")
    path = secret_file(setup.secrets, PASSWORD)
    env = {"QANT_STORE_URL": url, "QANT_STORE_PASSWORD_FILE": str(path)}
    migrated = setup.run("db", "migrate", env=env)
    assert migrated.exit_code == ExitCode.OK, migrated.output
    status = setup.run("db", "status", env=env)
    assert status.exit_code == ExitCode.OK, status.output
    assert "(postgresql), schema" in status.stdout


SECRETS: list[object] = [
    pytest.param(_link_secret("QANT_SECRET_KEY"), id="QANT_SECRET_KEY"),
    pytest.param(_link_secret("QANT_SECRET_KEYS"), id="QANT_SECRET_KEYS"),
    pytest.param(_dkim_key(dkim.RSA_VARIABLE), id=dkim.RSA_VARIABLE),
    pytest.param(_dkim_key(dkim.ED25519_VARIABLE), id=dkim.ED25519_VARIABLE),
    pytest.param(_smtp_password, id="QANT_SMTP_PASSWORD"),
    pytest.param(_bounces_password, id="QANT_BOUNCES_PASSWORD"),
    pytest.param(_store_password, id="QANT_STORE_PASSWORD"),
]


@pytest.mark.parametrize("case", SECRETS)
def test_each_secret_is_read_from_the_file_its_FILE_variable_names(
    case: Callable[[Setup], None],
    project: Path,
    tmp_path_factory: pytest.TempPathFactory,
    request: pytest.FixtureRequest,
) -> None:
    case(Setup(project, tmp_path_factory.mktemp("elsewhere"), request))


# ---- rotating the link-signing secret --------------------------------------------------


def test_links_and_return_paths_signed_with_an_old_key_work_after_a_rotation_until_it_goes(
    project_settings: Settings,
) -> None:
    settings = dataclasses.replace(
        project_settings, bounces=Bounces(address="bounces@qant.example")
    )
    readers = ["lea", "max", "zoe", "ana", "eve", "ugo"]
    with Subscribers.open(settings.store_path) as store:
        store.import_rows("email\n" + "".join(f"{r}@example.com\n" for r in readers), "t")
    # Mailed under the old key, alone.
    before = Context(settings, env={"QANT_SECRET_KEY": OLD_KEY}, transport=MemoryTransport())
    prepared = issues.prepare(before, settings.root / SAMPLE)
    sending.send(before, prepared)
    assert isinstance(before.transport, MemoryTransport)
    mailed = {
        recipient.split("@")[0]: (sender, data)
        for sender, recipient, data in before.transport.messages
    }

    def link(reader: str) -> str:
        head = mailed[reader][1].split(b"\r\n\r\n", 1)[0].decode()
        found = re.search(r"List-Unsubscribe:\s*<https?://[^/]+(/unsubscribe/[^>]+)>", head)
        assert found is not None
        return found[1]

    def bounce(reader: str, corpus: str, env: dict[str, str]) -> Outcome:
        sender, data = mailed[reader]
        message_id = re.search(rb"Message-ID: (<[^>]+>)", data.split(b"\r\n\r\n", 1)[0])
        assert message_id is not None
        text = (ROOT / "tests" / "bounces" / f"{corpus}.eml").read_text(encoding="utf-8")
        text = re.sub(r"\{verp:\w+\}", sender, text)
        text = re.sub(r"\{message_id:\w+\}", message_id[1].decode(), text)
        text = re.sub(r"reader\d@", f"{reader}@", text)
        # The report's own Message-Id: each reader's is another report.
        text = text.replace("Message-Id: <", f"Message-Id: <{reader}.", 1)
        report = process(Context(settings, env=env), [Letter(reader, text.encode())])
        (finding,) = report.findings
        return finding.outcome

    def one_click(reader: str, env: dict[str, str]) -> int:
        site = build_archive(settings, settings.output_dir / "archive").folder
        with TestClient(create_app(Context(settings, env=env), site)) as client:
            answer = client.post(
                link(reader), content="List-Unsubscribe=One-Click", headers=ONE_CLICK
            )
        return answer.status_code

    def status(reader: str) -> Status:
        with Subscribers.open(settings.store_path) as store:
            found = store.get(f"{reader}@example.com")
        assert found is not None
        return found.status

    rotated = {"QANT_SECRET_KEYS": f"{NEW_KEY}, {OLD_KEY}"}
    assert bytes(tokens.secret_from_env(rotated)) == NEW_KEY.encode()  # the new one signs
    assert one_click("lea", rotated) == 200
    assert bounce("max", "postfix-hard", rotated) is Outcome.HARD  # by its VERP address
    assert bounce("zoe", "dsn-without-verp", rotated) is Outcome.HARD  # by its Message-ID
    assert [status(r) for r in ("lea", "max", "zoe")] == [
        Status.UNSUBSCRIBED,
        Status.BOUNCED,
        Status.BOUNCED,
    ]

    retired = {"QANT_SECRET_KEYS": NEW_KEY}
    assert one_click("ana", retired) != 200
    assert bounce("eve", "postfix-hard", retired) is Outcome.FORGED
    assert bounce("ugo", "dsn-without-verp", retired) is Outcome.UNPROVEN
    assert [status(r) for r in ("ana", "eve", "ugo")] == [Status.ACTIVE] * 3


def test_the_link_secret_is_refused_when_set_twice_or_a_key_is_short() -> None:
    with pytest.raises(ConfigError, match="QANT_SECRET_KEY and QANT_SECRET_KEYS are both set"):
        tokens.secret_from_env({"QANT_SECRET_KEY": NEW_KEY, "QANT_SECRET_KEYS": NEW_KEY})
    with pytest.raises(ConfigError, match="QANT_SECRET_KEYS: key 2 of 2 is too short") as caught:
        tokens.secret_from_env({"QANT_SECRET_KEYS": f"{NEW_KEY} short"})
    assert "short" not in str(caught.value).replace("too short", "")
    assert NEW_KEY not in str(caught.value)


# ---- a database that wants a password ---------------------------------------------------

ROLE = "qant_with_password"
PASSWORD = "the store's password"


@pytest.fixture(scope="module")
def password_store(postgres_server: Path) -> Iterator[str]:
    """A database owned by a role that must give its password (SCRAM, on the suite's
    server's socket); its URL, without the password."""
    import psycopg

    hba = postgres_server / "data" / "pg_hba.conf"
    before = hba.read_text()
    admin_url = url_of(postgres_server, "postgres")
    url = url_of(postgres_server, "qant_password_store").replace("qant@", f"{ROLE}@")
    with psycopg.connect(admin_url, autocommit=True) as admin:
        admin.execute(
            f"CREATE ROLE {ROLE} LOGIN PASSWORD '{PASSWORD.replace(chr(39), chr(39) * 2)}'"
        )
        admin.execute(f"CREATE DATABASE qant_password_store OWNER {ROLE}")
        # The first line that matches decides: this role alone must give its password.
        hba.write_text(f"local all {ROLE} scram-sha-256\n{before}")
        admin.execute("SELECT pg_reload_conf()")
    try:
        _wait_for_password_rule(url)
        yield url
    finally:
        hba.write_text(before)
        with psycopg.connect(admin_url, autocommit=True) as admin:
            admin.execute("SELECT pg_reload_conf()")
            admin.execute("DROP DATABASE IF EXISTS qant_password_store WITH (FORCE)")
            admin.execute(f"DROP ROLE IF EXISTS {ROLE}")


def _wait_for_password_rule(url: str) -> None:
    import psycopg

    deadline = time.monotonic() + 10
    while True:
        try:
            psycopg.connect(url, password=None, passfile="/nonexistent").close()
        except psycopg.OperationalError as err:
            if "no password supplied" in str(err):
                return
            raise
        assert time.monotonic() < deadline, "the server did not reload pg_hba.conf"
        time.sleep(0.05)


@pytest.fixture
def no_libpq_password(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No password from libpq's own places: PGPASSWORD, ~/.pgpass."""
    monkeypatch.delenv("PGPASSWORD", raising=False)
    monkeypatch.setenv("PGPASSFILE", str(tmp_path / "no-pgpass"))


@pytest.mark.usefixtures("no_libpq_password")
def test_a_database_that_asks_for_a_password_names_QANT_STORE_PASSWORD(
    password_store: str, project: Path
) -> None:
    asked = run_cli(["db", "status"], cwd=project, env={"QANT_STORE_URL": password_store})
    assert asked.exit_code == ExitCode.UNAVAILABLE, asked.output
    assert "no password supplied" in asked.stderr
    assert "set QANT_STORE_PASSWORD, or QANT_STORE_PASSWORD_FILE" in asked.stderr


@pytest.mark.usefixtures("no_libpq_password")
def test_a_refused_password_names_where_it_came_from_never_itself(
    password_store: str, project: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    wrong = secret_file(tmp_path_factory.mktemp("secrets"), "not the password")
    variable = {"QANT_STORE_PASSWORD": "not the password either"}
    in_file = {"QANT_STORE_PASSWORD_FILE": str(wrong)}
    for given, named in [
        (variable, "QANT_STORE_PASSWORD"),
        (in_file, f"QANT_STORE_PASSWORD_FILE ({wrong})"),
    ]:
        refused = run_cli(
            ["db", "status"], cwd=project, env={"QANT_STORE_URL": password_store, **given}
        )
        assert refused.exit_code == ExitCode.UNAVAILABLE, refused.output
        assert "password authentication failed" in refused.stderr
        assert f"(the password of {named} was refused)" in refused.stderr
        assert "not the password" not in refused.output
