"""Read an issue file: YAML → `Issue`, every problem located by line and column."""

from __future__ import annotations

import contextlib
import datetime as dt
import errno
import re
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import ValidationError
from ruamel.yaml import YAML
from ruamel.yaml.comments import CommentedMap, CommentedSeq
from ruamel.yaml.constructor import ConstructorError, RoundTripConstructor, SafeConstructor
from ruamel.yaml.error import MarkedYAMLError, YAMLError
from ruamel.yaml.reader import ReaderError
from ruamel.yaml.scalarstring import LiteralScalarString

from qant_mail.authoring.model import Issue
from qant_mail.base.errors import IssueError, Problem, Severity
from qant_mail.base.files import read_file
from qant_mail.base.schema import Loc, readable_errors

MAX_BYTES = 5 * 1024 * 1024
# An issue is a few hundred YAML nodes; aliases that expand past this are an attack
# ("billion laughs"), not a newsletter.
MAX_NODES = 100_000
# An issue nests some eight levels deep. The YAML parser recurses in C for each level:
# 50,000 nested brackets crash the interpreter, so depth is measured before parsing.
MAX_DEPTH = 64
MAX_INDENT = 256

_FILE = "(file)"
# The file's name becomes the address of the issue's web page and part of its message
# IDs and headers: only characters that are safe in all of them.
_KEY = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")
# A YAML alias ("*name") where a value can start; Markdown's "**bold**" does not match.
# The "*" comes first, so that the search jumps from star to star; what may stand before
# it (a space, a bracket, a comma, or nothing) is looked back at from there.
_ALIAS = re.compile(r"\*(?<![^\s\[{,]\*)[^\s*,\]}]")


@dataclass
class Document:
    """A validated issue and where each of its fields is written in its file."""

    path: Path
    text: str
    issue: Issue
    _positions: _Positions | None = field(default=None, repr=False)

    @property
    def key(self) -> str:
        """Return the issue's identifier: its file name without `.yaml`."""
        return self.path.stem

    def locate(self, loc: Loc, *, key: bool = False) -> tuple[int, int]:
        """Return the 1-based (line, column) of the field at `loc` (or its key)."""
        return self._map().locate(loc, key=key)

    def problem(self, loc: Loc, message: str, severity: Severity) -> Problem:
        """Return a problem about the field at `loc`, located in the file."""
        line, column = self.locate(loc)
        dotted = ".".join(map(str, loc)) or "(document)"
        return Problem(self.path, line, column, dotted, message, severity)

    def _map(self) -> _Positions:
        # Positions need ruamel's round-trip parser, ten times slower than the safe one:
        # only pay for it when there is something to report.
        if self._positions is None:
            self._positions = _Positions.parse(self.text)
        return self._positions


def load(path: Path) -> Document:
    """Read, parse and validate the issue at `path`; raise `IssueError` listing every problem."""
    try:
        raw = read_file(path, MAX_BYTES)
    except FileNotFoundError as err:
        raise _fail(path, "no such file") from err
    except IsADirectoryError as err:
        raise _fail(path, "is a folder, not an issue file") from err
    except OSError as err:
        if err.errno == errno.EFBIG:
            raise _fail(path, str(err.strerror)) from err
        raise _fail(path, f"cannot read: {err.strerror or err}") from err
    return parse(raw, path)


def parse(raw: bytes, path: Path) -> Document:
    """Parse and validate the bytes of an issue file named `path`."""
    if len(raw) > MAX_BYTES:
        raise _fail(path, f"the file is {len(raw) / 1e6:.1f} MB; an issue is at most 5 MB")
    text = _decode(raw, path)
    data = _yaml(text, path)
    problems = [] if _KEY.fullmatch(path.stem) else [_name_problem(path)]
    context: dict[str, Any] = {"base_dir": path.parent, "default_date": _date_in_name(path)}
    try:
        issue = Issue.model_validate(data, context=context)
    except ValidationError as err:
        positions = _Positions.parse(text)
        for error in readable_errors(err, Issue):
            if error.loc == ("date",) and error.kind == "missing":
                message = "required (or name the file after the date: YYYY-MM-DD.yaml)"
            else:
                message = error.message
            line, column = positions.locate(
                error.loc,
                key=error.kind == "extra_forbidden",
                missing=error.kind == "missing",
                line_offset=error.line_offset,
            )
            problems.append(Problem(path, line, column, error.dotted, message))
        raise IssueError(path, problems) from err
    if problems:
        raise IssueError(path, problems)
    return Document(path, text, issue)


def _name_problem(path: Path) -> Problem:
    return Problem(
        path,
        1,
        1,
        _FILE,
        f"the file name {path.name!r} is not usable: it becomes the issue's web address "
        "and message IDs; use letters, digits, '-', '_' and '.' (like 2024-02-29.yaml), "
        "starting with a letter or digit, at most 100",
    )


def _fail(path: Path, message: str, line: int = 1, column: int = 1) -> IssueError:
    return IssueError(path, [Problem(path, line, column, _FILE, message)])


def _decode(raw: bytes, path: Path) -> str:
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = raw.count(b"\n", 0, err.start) + 1
        column = err.start - (raw.rfind(b"\n", 0, err.start) + 1) + 1
        raise _fail(
            path,
            f"not UTF-8 (byte 0x{raw[err.start]:02x}); save the file as UTF-8",
            line,
            column,
        ) from err
    if not text.strip():
        raise _fail(path, "the file is empty; `qant-mail new` writes a skeleton to start from")
    return text


def _yaml(text: str, path: Path) -> dict[str, Any]:
    _refuse_deep_nesting(text, path)
    try:
        data = _safe_yaml().load(text)
    except MarkedYAMLError as err:
        mark = err.problem_mark or err.context_mark
        line, column = (mark.line + 1, mark.column + 1) if mark else (1, 1)
        message = _yaml_message(err)
        raise _fail(path, message, line, column) from err
    except ReaderError as err:
        line = text.count("\n", 0, err.position) + 1
        column = err.position - (text.rfind("\n", 0, err.position) + 1) + 1
        character = f"U+{err.character:04X}" if isinstance(err.character, int) else "?"
        message = f"the character {character} cannot be in a YAML file; remove it"
        raise _fail(path, message, line, column) from err
    except YAMLError as err:
        raise _fail(path, f"not valid YAML: {err}") from err
    except RecursionError as err:
        raise _fail(path, "the YAML is nested too deeply") from err
    if data is None:
        raise _fail(path, "the file holds only comments; an issue needs at least a subject")
    if not isinstance(data, dict):
        raise _fail(path, "an issue is a mapping of fields (date:, subject:, event: …)")
    # Walking the document costs a millisecond; a file without aliases need not pay it.
    if _ALIAS.search(text):
        size = _expanded_size(data)
        if size is None:
            raise _fail(path, "a YAML alias refers to a value that contains it; remove it")
        if size > MAX_NODES:
            raise _fail(
                path, f"YAML aliases expand this file past {MAX_NODES:,} values; remove them"
            )
    return data


_BRACKETS = re.compile(r"[\[\]{}]")
_LEAD = re.compile(r"^[ \t\-?:]*", re.MULTILINE)
_DEEP_LEAD = re.compile(rf"^[ \t\-?:]{{{MAX_INDENT + 1}}}", re.MULTILINE)


def _refuse_deep_nesting(text: str, path: Path) -> None:
    """Refuse a document nested deeper than any issue, before the parser recurses into it."""
    if _DEEP_LEAD.search(text):
        lead = max(map(len, _LEAD.findall(text)), default=0)
        raise _fail(path, f"a line is indented or nested {lead} levels deep; {MAX_INDENT} at most")
    if text.count("[") + text.count("{") <= MAX_DEPTH:
        return  # cannot nest deeper than it has brackets
    depth = 0
    for match in _BRACKETS.finditer(text):
        depth = depth + 1 if match.group() in "[{" else max(depth - 1, 0)
        if depth > MAX_DEPTH:
            line = text.count("\n", 0, match.start()) + 1
            raise _fail(path, f"brackets nested more than {MAX_DEPTH} deep", line)


class _IssueConstructor(SafeConstructor):
    """YAML's safe constructor, with every scalar it cannot build reported at its place.

    Dates stay text: pydantic turns the `date` field into one and says where a date is
    wrong, and a title that looks like a date ("2023-02-29") stays a title. Tags that no
    issue needs (!!binary, !!set, !!omap…) are refused."""

    def construct_yaml_timestamp(self, node: Any, values: Any = None) -> Any:
        return self.construct_scalar(node)

    def construct_yaml_int(self, node: Any) -> Any:
        value = str(self.construct_scalar(node))
        if len(value) > 30:
            raise _scalar_error(node, f"a number of {len(value)} digits; quote it if it is text")
        try:
            return super().construct_yaml_int(node)
        except ValueError as err:
            raise _scalar_error(node, f"{value[:40]!r} is not a whole number") from err

    def construct_yaml_float(self, node: Any) -> Any:
        try:
            return super().construct_yaml_float(node)
        except ValueError as err:
            raise _scalar_error(node, "not a number") from err

    def construct_yaml_bool(self, node: Any) -> Any:
        try:
            return super().construct_yaml_bool(node)
        except KeyError as err:
            raise _scalar_error(node, "not true or false") from err

    def construct_unused(self, node: Any) -> Any:
        tag = str(node.tag).replace("tag:yaml.org,2002:", "!!")
        raise _scalar_error(node, f"the tag {tag} has no use in an issue; remove it")


class _PositionsConstructor(RoundTripConstructor):
    """The round-trip constructor, for positions only: scalars stay text, never fail."""

    def construct_as_text(self, node: Any, values: Any = None) -> Any:
        return self.construct_scalar(node)


for _tag in ("timestamp", "int", "float", "bool", "binary", "set", "omap", "pairs"):
    _PositionsConstructor.add_constructor(
        f"tag:yaml.org,2002:{_tag}", _PositionsConstructor.construct_as_text
    )


def _scalar_error(node: Any, problem: str) -> ConstructorError:
    return ConstructorError(None, None, problem, node.start_mark)


for _tag, _method in (
    ("timestamp", _IssueConstructor.construct_yaml_timestamp),
    ("int", _IssueConstructor.construct_yaml_int),
    ("float", _IssueConstructor.construct_yaml_float),
    ("bool", _IssueConstructor.construct_yaml_bool),
    ("binary", _IssueConstructor.construct_unused),
    ("set", _IssueConstructor.construct_unused),
    ("omap", _IssueConstructor.construct_unused),
    ("pairs", _IssueConstructor.construct_unused),
):
    _IssueConstructor.add_constructor(f"tag:yaml.org,2002:{_tag}", _method)


def _safe_yaml() -> YAML:
    """Return this thread's YAML loader (building one costs more than a small load)."""
    loader: YAML | None = getattr(_loaders, "yaml", None)
    if loader is None:
        loader = _loaders.yaml = YAML(typ="safe")
        loader.Constructor = _IssueConstructor
    return loader


_loaders = threading.local()


def _yaml_message(err: MarkedYAMLError) -> str:
    problem = (err.problem or "").strip()
    duplicate = re.match(r'found duplicate key "(.*?)"', problem)
    if duplicate:
        original = err.context_mark.line + 1 if err.context_mark else None
        where = f" (the mapping starts at line {original})" if original else ""
        return f"duplicate key {duplicate.group(1)!r}{where}"
    if isinstance(err, ConstructorError):
        return problem  # a value, not the syntax
    context = (err.context or "").strip()
    return f"YAML syntax: {problem}" + (f" ({context})" if context else "")


def _expanded_size(root: Any) -> int | None:
    """Count the values of `root` as if every alias were copied out, in linear time;
    None when a value contains itself (a recursive alias)."""
    sizes: dict[int, int] = {}
    open_nodes: set[int] = set()  # on the current path: meeting one again is a cycle
    stack: list[tuple[Any, bool]] = [(root, False)]
    while stack:
        node, children_done = stack.pop()
        if children_done:
            open_nodes.discard(id(node))
            total = 1 + sum(sizes.get(id(c), 1) for c in _children(node))
            sizes[id(node)] = min(total, MAX_NODES + 1)
            continue
        if id(node) in sizes:
            continue
        children = _children(node)
        if not children:
            sizes[id(node)] = 1
            continue
        open_nodes.add(id(node))
        stack.append((node, True))
        for child in children:
            if id(child) in open_nodes:
                return None
            if id(child) not in sizes:
                stack.append((child, False))
    return sizes[id(root)]


def _children(node: Any) -> list[Any]:
    if isinstance(node, dict):
        return [*node.keys(), *node.values()]
    if isinstance(node, list):
        return node
    return []


def _date_in_name(path: Path) -> dt.date | None:
    match = re.match(r"(\d{4}-\d{2}-\d{2})", path.name)
    if not match:
        return None
    try:
        return dt.date.fromisoformat(match.group(1))
    except ValueError:
        return None


@dataclass
class _Positions:
    """Where each key and value of a YAML document starts, by path (1-based)."""

    lines: list[str]
    keys: dict[Loc, tuple[int, int]]
    values: dict[Loc, tuple[int, int]]
    literal: set[Loc]

    @classmethod
    def parse(cls, text: str) -> _Positions:
        positions = cls(text.splitlines(), {(): (1, 1)}, {(): (1, 1)}, set())
        loader = YAML(typ="rt")
        loader.Constructor = _PositionsConstructor
        # On failure, the positions found so far stay; the rest fall back to their parent's.
        with contextlib.suppress(YAMLError, RecursionError, ValueError, LookupError):
            positions._walk(loader.load(text), ())
        return positions

    def _walk(self, node: Any, loc: Loc) -> None:
        for child_loc, child, key_pos, value_pos in _entries(node, loc):
            self.keys[child_loc] = key_pos
            self.values[child_loc] = value_pos
            if isinstance(child, LiteralScalarString):
                self.literal.add(child_loc)
            self._walk(child, child_loc)

    def locate(
        self,
        loc: Loc,
        *,
        key: bool = False,
        missing: bool = False,
        line_offset: int | None = None,
    ) -> tuple[int, int]:
        if missing:
            # A missing field is reported where its parent mapping is written.
            return self._nearest(loc[:-1], self.keys)
        if key:
            return self._nearest(loc, self.keys)
        if line_offset is not None:
            # A body written as one text is validated as a list of one: look upwards.
            written = next(
                (loc[:end] for end in range(len(loc), 0, -1) if loc[:end] in self.values), None
            )
            if written in self.literal:
                line = self.values[written][0] + 1 + line_offset
                if line <= len(self.lines):
                    text = self.lines[line - 1]
                    return line, len(text) - len(text.lstrip()) + 1
        return self._nearest(loc, self.values)

    def _nearest(self, loc: Loc, table: dict[Loc, tuple[int, int]]) -> tuple[int, int]:
        for end in range(len(loc), -1, -1):
            found = table.get(loc[:end]) or self.keys.get(loc[:end])
            if found:
                return found
        return (1, 1)


def _entries(node: Any, loc: Loc) -> Iterator[tuple[Loc, Any, tuple[int, int], tuple[int, int]]]:
    if isinstance(node, CommentedMap):
        for key, value in node.items():
            key_line, key_col = node.lc.key(key)
            value_line, value_col = node.lc.value(key)
            yield (
                (*loc, str(key)),
                value,
                (key_line + 1, key_col + 1),
                (value_line + 1, value_col + 1),
            )
    elif isinstance(node, CommentedSeq):
        for index, value in enumerate(node):
            line, col = node.lc.item(index)
            yield (*loc, index), value, (line + 1, col + 1), (line + 1, col + 1)
