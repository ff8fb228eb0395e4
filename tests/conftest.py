"""Fixtures named after the data they give: a project folder, the sample issue, renders."""

from __future__ import annotations

import dataclasses
import shutil
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner, Result

from qant_mail.app import issues, sending
from qant_mail.app.context import Context
from qant_mail.authoring.load import Document, load
from qant_mail.authoring.render import RenderedIssue, Renderer
from qant_mail.base.config import Sending, Settings, load_settings
from qant_mail.delivery.compose import Prepared
from qant_mail.delivery.outbox import SendReport
from qant_mail.delivery.transport import Transport
from tests.smtp_server import SmtpServer

ROOT = Path(__file__).resolve().parent.parent
SAMPLE = ROOT / "issues" / "2023-11-20.yaml"

MINIMAL_ISSUE = """\
date: 2024-01-15
subject: Un sujet
sections:
  - event:
      title: Un titre
      body: Un corps de texte.
"""


def check(path: Path, renderer: Renderer) -> issues.CheckReport:
    """Check the issue at `path` with `renderer`, in the installation of its settings."""
    return issues.check(Context(renderer.settings), path, renderer=renderer)


def prepare_send(
    path: Path, settings: Settings, *, secret: bytes | None = None, test: bool = False
) -> Prepared:
    """Prepare the issue at `path` for a send, in the installation of `settings` (the
    secret: `secret`, or the environment's)."""
    return issues.prepare(Context(settings, secret=secret), path, test=test)


def send_to_list(
    prepared: Prepared, settings: Settings, transport: Transport, **options: Any
) -> SendReport:
    """Send a prepared issue to its list through `transport`, as `qant-mail send` does."""
    return sending.send(Context(settings, transport=transport), prepared, **options)


@pytest.fixture(scope="session")
def settings() -> Settings:
    """The repository's own settings."""
    return load_settings(ROOT / "qant.toml", env={})


@pytest.fixture(scope="session")
def renderer(settings: Settings) -> Renderer:
    """A renderer with the repository's templates."""
    return Renderer(settings)


@pytest.fixture(scope="session")
def sample_document() -> Document:
    """The sample issue, loaded and validated."""
    return load(SAMPLE)


@pytest.fixture(scope="session")
def sample_rendered(renderer: Renderer, sample_document: Document) -> RenderedIssue:
    """The sample issue, rendered once."""
    return renderer.render(sample_document.issue)


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """A copy of the repository's settings, sample issues and logos, free to change; its
    look is the built-in theme (`own_template` gives it a template of its own)."""
    for name in ("assets", "issues"):
        shutil.copytree(ROOT / name, tmp_path / name)
    shutil.copy(ROOT / "qant.toml", tmp_path / "qant.toml")
    return tmp_path


def own_template(project: Path, name: str) -> Path:
    """Give `project` its own copy of the theme's template `name` (which then overrides
    the theme's), and return it."""
    from qant_mail.authoring.render import THEME

    path = project / "templates" / name
    path.parent.mkdir(exist_ok=True)
    shutil.copy(THEME / name, path)
    return path


# The modules whose tests run against both stores: SQLite, and a real PostgreSQL.
BOTH_STORES = {
    "test_subscribers",
    "test_send",
    "test_serve",
    "test_history",
    "test_signup",
    "test_outbox",
    "test_approval",
    "test_roads",
    "test_store_faults",
    "test_api",
    "test_stats",
}


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Run each test of the BOTH_STORES modules on SQLite and on PostgreSQL (but those
    marked `sqlite_only` or `postgresql_only`)."""
    module = metafunc.module.__name__.rsplit(".", 1)[-1]
    if module not in BOTH_STORES or "store_kind" not in metafunc.fixturenames:
        return
    if metafunc.definition.get_closest_marker("postgresql_only"):
        metafunc.parametrize("store_kind", ["postgresql"], indirect=True)
    elif not metafunc.definition.get_closest_marker("sqlite_only"):
        metafunc.parametrize("store_kind", ["sqlite", "postgresql"], indirect=True)


@pytest.fixture
def store_kind(request: pytest.FixtureRequest) -> str:
    """Which store the project uses: "sqlite" (the default) or "postgresql"."""
    return str(getattr(request, "param", "sqlite"))


@pytest.fixture
def project_settings(project: Path, store_kind: str, request: pytest.FixtureRequest) -> Settings:
    """The settings of the `project` copy; with a PostgreSQL store of its own when the
    test runs on PostgreSQL (written in its qant.toml, so that commands use it too)."""
    if store_kind == "postgresql":
        url = request.getfixturevalue("postgres_url")
        path = project / "qant.toml"
        text = path.read_text(encoding="utf-8")
        text = text.replace("[store]\n", f'[store]\nurl = "{url}"\n', 1)
        path.write_text(text, encoding="utf-8")
    return load_settings(project / "qant.toml", env={})


@pytest.fixture
def write_issue(project: Path) -> Callable[[str, str], Path]:
    """Write YAML (dedented) as an issue file of the project; return its path."""

    def write(text: str, name: str = "2024-01-15.yaml") -> Path:
        path = project / "issues" / name
        path.write_text(textwrap.dedent(text), encoding="utf-8")
        return path

    return write


@pytest.fixture
def cli(
    project: Path, project_settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> Callable[..., Result]:
    """Run `qant-mail ARGS` in-process, in the project folder; return the result."""
    from qant_mail.cli import app

    monkeypatch.chdir(project)
    monkeypatch.delenv("QANT_CONFIG", raising=False)
    runner = CliRunner()

    def run(*args: str, env: dict[str, str] | None = None) -> Result:
        return runner.invoke(app, list(args), env=env, catch_exceptions=False)

    return run


@pytest.fixture
def local(project_settings: Settings, smtp_server: SmtpServer) -> Settings:  # noqa: F811
    """The project's settings, sending to the scripted server, retrying quickly."""
    smtp = project_settings.smtp.model_copy(
        update={"host": smtp_server.host, "port": smtp_server.port, "security": "none"}
    )
    sending = Sending(retry_after_seconds=0.05, max_attempts=3)
    return dataclasses.replace(project_settings, smtp=smtp, sending=sending)


# Fixtures shared by several test modules.
from tests.browser import browser  # noqa: E402, F401
from tests.faulty_smtp import faulty_smtp  # noqa: E402, F401
from tests.postgres import (  # noqa: E402, F401
    postgres_empty_url,
    postgres_server,
    postgres_url,
)
from tests.smtp_server import smtp_server  # noqa: E402, F401
