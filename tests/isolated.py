"""Run a `qant-mail` command in a forked child with a deadline: a hang becomes a timeout
and a crash of the interpreter a signal, instead of taking the test run down."""

from __future__ import annotations

import json
import os
import select
import signal
import time
import traceback
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Outcome:
    """How a command ended."""

    exit_code: int | None  # None: it did not end by itself
    stdout: str = ""
    stderr: str = ""
    traceback: str = ""  # an exception that escaped the command
    timed_out: bool = False
    signal: int | None = None  # the signal that killed it (a crash)
    seconds: float = 0.0

    @property
    def output(self) -> str:
        """Return both streams."""
        return self.stdout + self.stderr


def run_cli(
    args: list[str],
    *,
    cwd: Path,
    stdin: bytes = b"",
    env: dict[str, str] | None = None,
    timeout: float = 30.0,
) -> Outcome:
    """Run `qant-mail ARGS` in a child process forked from this one (the modules are
    loaded already, so it starts in milliseconds)."""
    read_end, write_end = os.pipe()
    started = time.monotonic()
    pid = os.fork()
    if pid == 0:  # the child
        status = 0
        try:
            os.close(read_end)
            os.chdir(cwd)
            payload = _invoke(args, stdin, env)
            data = json.dumps(payload).encode()
            while data:
                data = data[os.write(write_end, data) :]
        except BaseException:  # noqa: BLE001 - the child reports anything, then exits
            status = 70
        finally:
            os._exit(status)
    os.close(write_end)
    chunks: list[bytes] = []
    deadline = started + timeout
    timed_out = False
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            timed_out = True
            break
        ready, _, _ = select.select([read_end], [], [], remaining)
        if not ready:
            continue
        chunk = os.read(read_end, 1 << 16)
        if not chunk:
            break
        chunks.append(chunk)
    os.close(read_end)
    if timed_out:
        os.kill(pid, signal.SIGKILL)
    _, status = os.waitpid(pid, 0)
    seconds = time.monotonic() - started
    if timed_out:
        return Outcome(None, timed_out=True, seconds=seconds)
    if os.WIFSIGNALED(status):
        return Outcome(None, signal=os.WTERMSIG(status), seconds=seconds)
    if not chunks:
        return Outcome(None, traceback="the child died without a word", seconds=seconds)
    payload = json.loads(b"".join(chunks))
    return Outcome(
        payload["code"],
        payload["stdout"],
        payload["stderr"],
        payload["traceback"],
        seconds=seconds,
    )


def _invoke(args: list[str], stdin: bytes, env: dict[str, str] | None) -> dict[str, object]:
    from typer.testing import CliRunner

    from qant_mail.cli import app

    # Signals as the real command sees them; pytest's own handlers stay in the parent.
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    result = CliRunner().invoke(app, args, input=stdin, env=env, catch_exceptions=True)
    escaped = ""
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        escaped = "".join(traceback.format_exception(result.exception))
    return {
        "code": result.exit_code,
        "stdout": result.stdout,
        "stderr": result.stderr,
        "traceback": escaped,
    }
