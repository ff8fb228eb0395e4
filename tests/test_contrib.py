"""The systemd units of `contrib/`: valid for systemd, and running commands that exist
with options that exist."""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT

UNITS = sorted((ROOT / "contrib" / "systemd").iterdir())
QANT_MAIL = Path(sys.executable).parent / "qant-mail"


def test_the_units_are_those_the_readme_names() -> None:
    assert {u.name for u in UNITS} == {
        "qant-serve.service",
        "qant-run-due.service",
        "qant-run-due.timer",
        "qant-bounces.service",
        "qant-bounces.timer",
    }
    readme = (ROOT / "README.md").read_text()
    assert "contrib/systemd/" in readme


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="no systemd-analyze here")
def test_systemd_finds_nothing_wrong_with_the_units(tmp_path: Path) -> None:
    for unit in UNITS:
        # The installed path of the units, made this machine's: systemd checks it exists.
        text = unit.read_text().replace("/srv/qant/.venv/bin/qant-mail", str(QANT_MAIL))
        (tmp_path / unit.name).write_text(text)
    done = subprocess.run(
        ["systemd-analyze", "verify", "--man=no", *(str(tmp_path / u.name) for u in UNITS)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert done.stderr.strip() == "", done.stderr


@pytest.mark.parametrize("unit", [u for u in UNITS if u.suffix == ".service"], ids=lambda u: u.name)
def test_each_unit_runs_a_command_and_options_qant_mail_has(unit: Path) -> None:
    (line,) = re.findall(r"^ExecStart=(.*)$", unit.read_text(), re.MULTILINE)
    words = shlex.split(line)
    command = words[1]
    options = [w.split("=")[0] for w in words[2:] if w.startswith("--")]
    shown = subprocess.run(
        [str(QANT_MAIL), command, "--help"], capture_output=True, text=True, timeout=60
    )
    assert shown.returncode == 0, shown.stderr
    for option in options:
        assert option in shown.stdout, (command, option)
    # Secrets come as credentials (files), never written in the unit.
    assert not re.search(r"Environment=QANT_\w*(KEY|PASSWORD)=", unit.read_text())
