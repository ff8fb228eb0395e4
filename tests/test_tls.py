"""SMTP over TLS: STARTTLS and implicit TLS, certificates verified unless told not to."""

from __future__ import annotations

import dataclasses
import ssl
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from aiosmtpd.controller import Controller

from qant_mail.config import Settings
from qant_mail.transport import SmtpTransport, TransportUnavailable
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


@pytest.fixture
def starttls_server(certificate: tuple[Path, Path]) -> Iterator[tuple[int, ScriptedHandler]]:
    key, cert = certificate
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    handler, port = ScriptedHandler(), free_port()
    controller = Controller(
        handler, hostname="127.0.0.1", port=port, tls_context=context, require_starttls=True
    )
    controller.start()
    yield port, handler
    controller.stop()


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
