"""A new issue: the commented skeleton an editor starts from."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

from qant_mail.authoring.model import SCHEMA_FILE, json_schema
from qant_mail.authoring.render import Renderer
from qant_mail.base.config import Settings
from qant_mail.base.files import create_new, write_all

SKELETON_TEMPLATE = "issue.yaml.j2"


def skeleton_path(settings: Settings, day: dt.date) -> Path:
    """Return where the issue of `day` lives."""
    return settings.issues_dir / f"{day.isoformat()}.yaml"


def write_skeleton(settings: Settings, day: dt.date) -> Path:
    """Write the skeleton issue for `day`; refuse to overwrite an existing file."""
    path = skeleton_path(settings, day)
    renderer = Renderer(settings)
    shown = path.relative_to(settings.root) if path.is_relative_to(settings.root) else path
    text = renderer.render_string(
        SKELETON_TEMPLATE,
        date=day.isoformat(),
        date_long=renderer.format_date(day),
        path=str(shown),
    )
    create_new(path, text.encode("utf-8"))
    write_schema(settings.issues_dir / SCHEMA_FILE)
    return path


def write_schema(path: Path) -> None:
    """Write the issue format's JSON Schema to `path` (the skeleton points at it)."""
    data = json_schema().encode("utf-8")
    try:
        if path.read_bytes() == data:
            return
    except OSError:
        pass  # absent or unreadable: write it
    write_all({path: data})
