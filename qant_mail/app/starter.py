"""A newsletter of one's own: `qant-mail init DIR` writes a folder whose sample issue
checks, renders and goes through the demo as it is, with settings to fill in."""

from __future__ import annotations

import datetime as dt
import json
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from string import Template

from qant_mail.app import issues
from qant_mail.authoring.model import SCHEMA_FILE
from qant_mail.base.addresses import is_plain_address
from qant_mail.base.config import check_base_url, check_timezone, load_settings
from qant_mail.base.errors import ExitCode, QantError

_SKELETON = resources.files("qant_mail") / "skeleton"
_LOCALES = resources.files("qant_mail") / "locales"


class InitError(QantError):
    """The folder cannot be made a newsletter's (settings there already, a bad value)."""

    exit_code = ExitCode.INVALID


@dataclass(frozen=True)
class Starter:
    """What a new newsletter is called, who sends it, where it lives."""

    name: str = "Ma lettre"
    sender: str = "lettre@example.com"
    base_url: str = "https://lettre.example.com"
    timezone: str = "Europe/Paris"
    locale: str = "fr"
    tagline: str = "Chaque semaine, l’essentiel en cinq minutes."

    def problems(self) -> list[str]:
        """Return what is wrong with these values, each naming its option."""
        found = []
        if not self.name.strip() or re.search(r"[\x00-\x1f\x7f]", self.name):
            found.append(f"--name: {self.name!r} is not a name on one line")
        if not is_plain_address(self.sender):
            found.append(f"--sender: {self.sender!r} is not an address (name@domain.tld)")
        # The settings' own checks: what init accepts, qant.toml accepts.
        for option, check, value in (
            ("--base-url", check_base_url, self.base_url),
            ("--timezone", check_timezone, self.timezone),
        ):
            try:
                check(value)
            except ValueError as err:
                found.append(f"{option}: {err}")
        known = sorted(p.name.removesuffix(".toml") for p in _LOCALES.iterdir())
        if self.locale not in known:
            found.append(f"--locale: {self.locale!r}: the built-in ones are {', '.join(known)}")
        return found


def init_newsletter(
    folder: Path,
    starter: Starter | None = None,
    *,
    today: dt.date | None = None,
    clock: Callable[[], float] = time.time,
) -> list[Path]:
    """Write a working newsletter in `folder` (created if need be): commented settings,
    a sample issue and a welcome issue with the schema editors use, a demo list,
    placeholder logos, a .gitignore and a README for the editors. Return the files
    written. The sample is the issue of `today` (default: today where the editors are,
    in the starter's time zone, as `qant-mail new` counts it). Refuse a folder that holds
    settings already, or values that would not work, naming each."""
    starter = starter or Starter()
    problems = starter.problems()
    if problems:
        raise InitError("; ".join(problems))
    settings_file = folder / "qant.toml"
    if settings_file.exists():
        raise InitError(f"{settings_file}: a newsletter is there already (its settings)")
    day = today or issues.day_in(starter.timezone, clock())
    values = {
        "name": starter.name,
        "date": day.isoformat(),
        "q_name": _quoted(starter.name),
        "q_tagline": _quoted(starter.tagline),
        "q_byline": _quoted(f"la rédaction de {starter.name}"),
        "q_locale": _quoted(starter.locale),
        "q_base_url": _quoted(starter.base_url.rstrip("/")),
        "q_timezone": _quoted(starter.timezone),
        "q_sender": _quoted(starter.sender),
        "y_subject": _quoted(f"Le premier numéro de {starter.name}"),
        "y_welcome": _quoted(f"Bienvenue dans {starter.name}"),
        "y_signature": _quoted(f"La rédaction de {starter.name}"),
    }
    plan = {
        "qant.toml": _filled("qant.toml.in", values),
        f"issues/{day.isoformat()}.yaml": _filled("sample.yaml.in", values),
        "issues/welcome.yaml": _filled("welcome.yaml.in", values),
        "issues/demo-subscribers.csv": _raw("demo-subscribers.csv"),
        "assets/logo.png": _raw("logo.png"),
        "assets/logo-dark.png": _raw("logo-dark.png"),
        ".gitignore": _raw("gitignore"),
        "README.md": _filled("README.md.in", values),
    }
    written: list[Path] = []
    try:
        for relative, content in plan.items():
            path = folder / relative
            if path.exists():
                raise InitError(f"{path}: exists already; init writes into a new folder")
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(content)
            written.append(path)
        schema = folder / "issues" / SCHEMA_FILE
        issues.write_schema(schema)
        written.append(schema)
    except OSError as err:
        raise InitError(f"{err.filename or folder}: cannot write: {err.strerror}") from err
    # What was written must load: a value that slipped past the checks above is named
    # here, not at the editor's first command.
    load_settings(settings_file, env={})
    return written


def _quoted(value: str) -> str:
    # JSON's double-quoted strings are TOML's basic strings and YAML's double-quoted
    # ones alike: quotes, backslashes and accents come out as written.
    return json.dumps(value, ensure_ascii=False)


def _raw(name: str) -> bytes:
    return (_SKELETON / name).read_bytes()


def _filled(name: str, values: dict[str, str]) -> bytes:
    return Template((_SKELETON / name).read_text(encoding="utf-8")).substitute(values).encode()
