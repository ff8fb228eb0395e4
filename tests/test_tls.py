"""SMTP over TLS: STARTTLS and implicit TLS, certificates verified unless told not to."""

from __future__ import annotations

import dataclasses
import ssl
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from aiosmtpd.controller import Controller

from qant_mail.base.config import Settings
from qant_mail.base.errors import ConfigError
from qant_mail.delivery.transport import SmtpTransport, TransportUnavailable
from tests.smtp_server import ScriptedHandler, SmtpServer, free_port


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("tls")
    key, cert = folder / "key.pem", folder / "cert.pem"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "2",
            "-subj",
            "/CN=localhost",
            "-keyout",
            str(key),
            "-out",
            str(cert),
        ],
        check=True,
        capture_output=True,
    )
    return key, cert


def _starttls_server(key: Path, cert: Path) -> Iterator[tuple[int, ScriptedHandler]]:
    """Run a server that requires STARTTLS, with this certificate; yield its port."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    handler, port = ScriptedHandler(), free_port()
    controller = Controller(
        handler, hostname="127.0.0.1", port=port, tls_context=context, require_starttls=True
    )
    controller.start()
    yield port, handler
    controller.stop()


@pytest.fixture
def starttls_server(certificate: tuple[Path, Path]) -> Iterator[tuple[int, ScriptedHandler]]:
    yield from _starttls_server(*certificate)


def with_smtp(settings: Settings, **changes: object) -> Settings:
    return dataclasses.replace(settings, smtp=settings.smtp.model_copy(update=changes))


def test_starttls_refuses_an_untrusted_certificate(
    project_settings: Settings, starttls_server: tuple[int, ScriptedHandler]
) -> None:
    port, handler = starttls_server
    settings = with_smtp(project_settings, host="127.0.0.1", port=port, security="starttls")
    with pytest.raises(TransportUnavailable, match="certificate not trusted"):
        SmtpTransport(settings, env={}).connect()
    assert handler.received == []


def test_starttls_sends_when_verification_is_turned_off(
    project_settings: Settings, starttls_server: tuple[int, ScriptedHandler]
) -> None:
    port, handler = starttls_server
    settings = with_smtp(
        project_settings,
        host="127.0.0.1",
        port=port,
        security="starttls",
        verify_certificates=False,
    )
    connection = SmtpTransport(settings, env={}).connect()
    reply = connection.send("a@qant.example", "b@example.com", b"Subject: x\r\n\r\nbody\r\n")
    connection.close()
    assert reply.ok
    assert [r.recipient for r in handler.received] == ["b@example.com"]


def test_plain_server_without_starttls_is_refused_when_tls_is_asked(
    project_settings: Settings, smtp_server: SmtpServer
) -> None:
    settings = with_smtp(
        project_settings, host=smtp_server.host, port=smtp_server.port, security="starttls"
    )
    with pytest.raises(TransportUnavailable, match="does not offer STARTTLS"):
        SmtpTransport(settings, env={}).connect()


def test_implicit_tls_to_a_plain_server_fails_clearly(
    project_settings: Settings, smtp_server: SmtpServer
) -> None:
    settings = with_smtp(
        project_settings,
        host=smtp_server.host,
        port=smtp_server.port,
        security="tls",
        timeout=3,
    )
    with pytest.raises(
        TransportUnavailable, match=f"cannot connect to 127.0.0.1:{smtp_server.port}"
    ):
        SmtpTransport(settings, env={}).connect()


@pytest.fixture(scope="module")
def private_ca(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """A certificate authority of our own, and a certificate for 127.0.0.1 it signed."""
    folder = tmp_path_factory.mktemp("ca")
    ca_key, ca_cert = folder / "ca.key", folder / "ca.pem"
    key, request, cert = folder / "relay.key", folder / "relay.csr", folder / "relay.pem"
    (folder / "san.cnf").write_text("subjectAltName = IP:127.0.0.1\n")

    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True)

    days = ("-days", "2")
    openssl(
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        *days,
        "-subj",
        "/CN=Qant test CA",
        "-keyout",
        str(ca_key),
        "-out",
        str(ca_cert),
    )
    openssl(
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-subj",
        "/CN=127.0.0.1",
        "-keyout",
        str(key),
        "-out",
        str(request),
    )
    openssl(
        "x509",
        "-req",
        "-in",
        str(request),
        "-CA",
        str(ca_cert),
        "-CAkey",
        str(ca_key),
        "-CAcreateserial",
        *days,
        "-out",
        str(cert),
        "-extfile",
        str(folder / "san.cnf"),
    )
    return ca_cert, key, cert


@pytest.fixture
def privately_signed_server(
    private_ca: tuple[Path, Path, Path],
) -> Iterator[tuple[int, ScriptedHandler]]:
    _, key, cert = private_ca
    yield from _starttls_server(key, cert)


def test_a_relay_signed_by_a_private_ca_is_trusted_with_ca_file_only(
    project_settings: Settings,
    privately_signed_server: tuple[int, ScriptedHandler],
    private_ca: tuple[Path, Path, Path],
) -> None:
    port, handler = privately_signed_server
    settings = with_smtp(project_settings, host="127.0.0.1", port=port, security="starttls")
    with pytest.raises(TransportUnavailable, match=r"smtp\.ca_file"):
        SmtpTransport(settings, env={}).connect()
    trusted = with_smtp(settings, ca_file=str(private_ca[0]))
    connection = SmtpTransport(trusted, env={}).connect()
    reply = connection.send("a@qant.example", "b@example.com", b"Subject: x\r\n\r\nbody\r\n")
    connection.close()
    assert reply.ok
    assert [r.recipient for r in handler.received] == ["b@example.com"]


@pytest.mark.parametrize(("content", "message"), [(None, "no such file"), ("x", "no certificate")])
def test_a_ca_file_that_is_missing_or_not_pem_is_named(
    project_settings: Settings, tmp_path: Path, content: str | None, message: str
) -> None:
    path = tmp_path / "ca.pem"
    if content is not None:
        path.write_text(content)
    settings = with_smtp(project_settings, security="starttls", ca_file=str(path))
    with pytest.raises(ConfigError, match=f"smtp.ca_file: .*{message}"):
        SmtpTransport(settings, env={})
