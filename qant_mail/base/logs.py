"""The logs of the commands that keep running (`inbox`, `serve`): one line per event, as
text for people or as one JSON object for machines, on standard output."""

from __future__ import annotations

import datetime as dt
import json
import logging
import re
import sys
from collections.abc import Mapping
from typing import TextIO

FORMATS = ("text", "json")
# The keys every JSON line has, first; an event's own fields follow.
STABLE_KEYS = ("time", "level", "event")

_EVENT = "qant_event"
_FIELDS = "qant_fields"
# The local part of an address (the domain is kept: "…@example.com"); not "/" nor "=",
# which a path or a key=value before the address more likely holds.
_LOCAL_PART = re.compile(r"[\w.!#$%&*+?^`{|}~-]+@(?=[\w-]+(?:\.[\w-]+)+)")
# A value a text line shows as it is; any other is quoted, its control characters escaped,
# so that no value can start a line of its own.
_BARE = re.compile(r"[^\s\"'=\\\x00-\x1f\x7f]+")
# What JSON leaves as it is but `str.splitlines` (and so many a log reader) breaks on.
_BREAKS = str.maketrans({"\x85": "\\u0085", "\u2028": "\\u2028", "\u2029": "\\u2029"})
_CONTROL = re.compile("[\x00-\x1f\x7f\x85\u2028\u2029]")


def event(
    logger: logging.Logger, name: str, level: int = logging.INFO, /, **fields: object
) -> None:
    """Log the event `name` with its fields: `name key=value…` as text, or in JSON."""
    if logger.isEnabledFor(level):
        clash = set(fields) & {*STABLE_KEYS, "logger", "message", "error"}
        assert not clash, f"an event's fields may not be named {sorted(clash)}"
        extra = {_EVENT: name, _FIELDS: fields}
        logger.log(level, "%s %s", name, _pairs(fields), extra=extra)


def setup(format: str, stream: TextIO | None = None, *, hide_addresses: bool = False) -> None:
    """Write the process's log to `stream` (default: standard output) in `format` (text
    or json): qant-mail's own records from INFO, other libraries' from WARNING.
    `hide_addresses`: each address shows its domain only."""
    handler = logging.StreamHandler(sys.stdout if stream is None else stream)
    handler.setFormatter(formatter(format, hide_addresses=hide_addresses))
    root = logging.getLogger()
    root.addHandler(handler)
    # Libraries say at INFO what only their debugging needs (aiosmtpd: every connection).
    root.setLevel(logging.WARNING)
    logging.getLogger("qant_mail").setLevel(logging.INFO)


def formatter(format: str, *, hide_addresses: bool = False) -> logging.Formatter:
    """Return the formatter of `format`: "text" or "json"."""
    if format == "json":
        return JsonFormatter(hide_addresses)
    if format == "text":
        return TextFormatter(hide_addresses)
    raise ValueError(f"unknown log format {format!r}; expected one of {', '.join(FORMATS)}")


class _Formatter(logging.Formatter):
    def __init__(self, hide_addresses: bool) -> None:
        super().__init__()
        self.hide_addresses = hide_addresses

    def _hide(self, text: str) -> str:
        return _LOCAL_PART.sub("…@", text) if self.hide_addresses else text

    def _fields(self, record: logging.LogRecord) -> dict[str, object]:
        fields: Mapping[str, object] = getattr(record, _FIELDS, {})
        return {key: self._value(value) for key, value in fields.items()}

    def _value(self, value: object) -> object:
        if isinstance(value, str):
            return self._hide(value)
        if isinstance(value, list | tuple):
            return [self._value(item) for item in value]
        return value

    def _error(self, record: logging.LogRecord) -> str:
        parts = []
        if record.exc_info:
            parts.append(self.formatException(record.exc_info))
        if record.stack_info:
            parts.append(self.formatStack(record.stack_info))
        return self._hide("\n".join(parts))


class TextFormatter(_Formatter):
    """`TIME LEVEL event key=value…`, or `TIME LEVEL message` for a record of no event;
    a traceback on the lines after."""

    def format(self, record: logging.LogRecord) -> str:
        name = getattr(record, _EVENT, None)
        if name is None:
            # One record, one line: no character of a message can forge another line,
            # nor drive the terminal that shows it.
            said = _CONTROL.sub(_escaped, self._hide(record.getMessage()).rstrip())
        else:
            said = f"{name} {_pairs(self._fields(record))}".rstrip()
        line = f"{_time(record)} {record.levelname} {said}"
        error = self._error(record)
        return f"{line}\n{error}" if error else line


class JsonFormatter(_Formatter):
    """One JSON object a line: time, level and event first (a record of no event is the
    event "log", with its logger and message), then the event's fields, and `error` (a
    traceback) if any."""

    def format(self, record: logging.LogRecord) -> str:
        name = getattr(record, _EVENT, None)
        line: dict[str, object] = {
            "time": _time(record),
            "level": record.levelname.lower(),
            "event": name or "log",
        }
        if name is None:
            line["logger"] = record.name
            line["message"] = self._hide(record.getMessage())
        else:
            line |= self._fields(record)
        error = self._error(record)
        if error:
            line["error"] = error
        return json.dumps(line, ensure_ascii=False, default=str).translate(_BREAKS)


def _time(record: logging.LogRecord) -> str:
    """Return when `record` was made: UTC, ISO 8601, to the millisecond."""
    return dt.datetime.fromtimestamp(record.created, dt.UTC).isoformat(timespec="milliseconds")


def _escaped(control: re.Match[str]) -> str:
    char = control[0]
    return {"\n": "\\n", "\r": "\\r", "\t": "\\t"}.get(char) or f"\\u{ord(char):04x}"


def _pairs(fields: Mapping[str, object]) -> str:
    return " ".join(f"{key}={_shown(value)}" for key, value in fields.items())


def _shown(value: object) -> str:
    if value is None or value == []:
        return "-"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list | tuple):
        value = ",".join(str(item) for item in value)
    text = str(value)
    return (
        text if _BARE.fullmatch(text) else json.dumps(text, ensure_ascii=False).translate(_BREAKS)
    )
