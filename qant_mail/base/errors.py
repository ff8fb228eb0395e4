"""What a user can get wrong, and the exit codes the CLI reports it with."""

from __future__ import annotations

import enum
from dataclasses import dataclass
from pathlib import Path


class ExitCode(enum.IntEnum):
    """Exit statuses of the `qant-mail` command, documented in the README."""

    OK = 0  # everything went as asked
    INVALID = 1  # bad input: an issue, a setting, a template or a file the user gave
    USAGE = 2  # the command line itself is wrong (unknown option, missing argument)
    PARTIAL = 3  # the job ran, but some recipients were deferred, failed or are unknown
    UNAVAILABLE = 4  # a server could not be reached or refused us (SMTP host, login)
    # `qant-mail doctor`: scripts tell "look at it" from "do not send" by the status.
    WARNINGS = 5  # doctor: warnings only; a send would go, perhaps worse than it could
    BLOCKING = 6  # doctor: a check failed that would make the send fail (or go unread)
    # A mail server that pipes a message to us reads these (sysexits.h):
    DATAERR = 65  # the message cannot be used: the server returns it to its sender
    TEMPFAIL = 75  # try again later: the message stays in the server's queue
    INTERRUPTED = 130  # stopped by Ctrl-C; what was done is recorded


class Severity(enum.StrEnum):
    """How bad a problem is: errors stop a render or a send, warnings do not."""

    ERROR = "error"
    WARNING = "warning"


@dataclass(frozen=True, order=True)
class Problem:
    """One thing wrong with a file, located by line and column (1-based)."""

    path: Path
    line: int
    column: int
    field: str
    message: str
    severity: Severity = Severity.ERROR

    def __str__(self) -> str:
        return f"{self.path}:{self.line}:{self.column}: {self.field}: {self.message}"

    def short(self) -> str:
        """Return the problem without its file name, as the preview shows it."""
        return f"{self.line}:{self.column}: {self.field}: {self.message}"


class QantError(Exception):
    """Root of every error a user can cause; its message is shown as `error: …`."""

    exit_code: ExitCode = ExitCode.INVALID


class ConfigError(QantError):
    """A setting is missing or invalid (the message names the key and its source)."""


class IssueError(QantError):
    """An issue file cannot be used: it lists every problem found at once."""

    def __init__(self, path: Path, problems: list[Problem]) -> None:
        self.path = path
        self.problems = sorted(problems, key=lambda p: (p.line, p.column, p.field))
        noun = "problem" if len(self.problems) == 1 else "problems"
        super().__init__(f"{path}: {len(self.problems)} {noun}")


class SendError(QantError):
    """An issue that must not be sent as it is (a draft, errors in the email), or a send
    that does not exist."""


class TemplateError(QantError):
    """A template could not be found, compiled or rendered."""


class OutputError(QantError):
    """A file could not be written where the user asked."""
