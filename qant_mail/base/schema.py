"""The pydantic base for our schemas, and validation errors worded for editors."""

from __future__ import annotations

import ast
import difflib
import functools
import inspect
import itertools
import textwrap
import types
import typing
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError

Loc = tuple[str | int, ...]


def describe_fields(schema: dict[str, Any], model: type[BaseModel]) -> None:
    """Give each property of a model's JSON Schema the docstring written under its field."""
    docs = attribute_docstrings(model)
    for name, field in model.model_fields.items():
        spec = schema.get("properties", {}).get(field.alias or name)
        if isinstance(spec, dict) and name in docs and "description" not in spec:
            spec["description"] = docs[name]


@functools.cache
def attribute_docstrings(model: type[BaseModel]) -> dict[str, str]:
    """Return the docstring written under each field of `model` and of its bases."""
    docs: dict[str, str] = {}
    for cls in reversed(model.__mro__):
        if not issubclass(cls, BaseModel) or cls is BaseModel:
            continue
        try:
            body = ast.parse(textwrap.dedent(inspect.getsource(cls))).body[0]
        except (OSError, TypeError, SyntaxError):  # no source (a frozen build): no docs
            continue
        statements = body.body if isinstance(body, ast.ClassDef) else []
        for node, after in itertools.pairwise(statements):
            if (
                isinstance(node, ast.AnnAssign)
                and isinstance(node.target, ast.Name)
                and isinstance(after, ast.Expr)
                and isinstance(after.value, ast.Constant)
                and isinstance(after.value.value, str)
            ):
                docs[node.target.id] = inspect.cleandoc(after.value.value)
    return docs


class Strict(BaseModel):
    """A schema that refuses unknown keys and is immutable once validated."""

    # The docstrings under the fields become the descriptions of the published JSON
    # Schema when it is generated (`describe_fields`), not when each class is defined:
    # pydantic's `use_attribute_docstrings` reads and parses the source of every model
    # at import, a tenth of the start-up of every command. Validators are built on first
    # use for the same reason: the nested models are never validated on their own.
    model_config = ConfigDict(
        extra="forbid",
        frozen=True,
        str_strip_whitespace=True,
        defer_build=True,
        json_schema_extra=describe_fields,
    )


@dataclass(frozen=True)
class FieldError:
    """One validation failure: where in the document, what kind, and what to tell the user."""

    loc: Loc
    kind: str
    message: str
    # Some errors point inside a value (a line of a Markdown body); `offset` is that line, 0-based.
    line_offset: int | None = None

    @property
    def dotted(self) -> str:
        """Return the location as the editor writes it: `special.articles.0.title`."""
        return ".".join(str(part) for part in self.loc) or "(document)"


def readable_errors(err: ValidationError, root: type[BaseModel]) -> list[FieldError]:
    """Turn pydantic's errors into located, editor-friendly ones."""
    out: list[FieldError] = []
    for detail in err.errors(include_url=False):
        kind = detail["type"]
        loc, models = _resolve(root, tuple(detail["loc"]), unknown_key=kind == "extra_forbidden")
        ctx = detail.get("ctx") or {}
        message = _message(kind, detail["msg"], loc, models, ctx)
        offset = ctx.get("line_offset")
        out.append(FieldError(loc, kind, message, offset if isinstance(offset, int) else None))
    return out


def _message(
    kind: str, msg: str, loc: Loc, models: list[type[BaseModel]], ctx: dict[str, Any]
) -> str:
    if kind == "missing":
        return "required, but missing"
    if kind == "extra_forbidden":
        return _unknown_key(str(loc[-1]) if loc else "", models)
    if kind in {"string_too_short", "too_short"} and ctx.get("min_length") == 1:
        return "must not be empty"
    if kind == "value_error":
        msg = msg.removeprefix("Value error, ")
    if kind == "assertion_error":
        msg = msg.removeprefix("Assertion failed, ")
    return msg[:1].lower() + msg[1:]


def _unknown_key(key: str, models: list[type[BaseModel]]) -> str:
    for model in models:
        hint = getattr(model, "unknown_key_hints", {}).get(key)
        if hint:
            return f"unknown key {key!r}: {hint}"
    known = sorted({name for model in models for name in _field_names(model)})
    close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
    if close:
        return f"unknown key {key!r}; did you mean {close[0]!r}?"
    if known:
        return f"unknown key {key!r}; expected one of: {', '.join(known)}"
    return f"unknown key {key!r}"


def _field_names(model: type[BaseModel]) -> Iterator[str]:
    for name, field in model.model_fields.items():
        yield field.alias or name


def _resolve(
    root: type[BaseModel], loc: Loc, *, unknown_key: bool
) -> tuple[Loc, list[type[BaseModel]]]:
    """Walk `loc` through the schema: drop union tags from it, find the parent models."""
    current: list[Any] = [root]
    before: list[Any] = [root]
    clean: list[str | int] = []
    for index, part in enumerate(loc):
        following = list(_step(current, part))
        if following:
            before, current = current, following
            clean.append(part)
        elif unknown_key and index == len(loc) - 1:
            # The last part of an "extra_forbidden" error is the unknown key itself.
            clean.append(part)
            before = current
        # Otherwise it is the tag pydantic puts in a union member's location: editors
        # never wrote it, so it is left out.
    parents = [m for t in before for m in _flatten(t) if _is_model(m)]
    return tuple(clean), parents


def _step(current: Iterable[Any], part: str | int) -> Iterator[Any]:
    for tp in current:
        for member in _flatten(tp):
            origin = typing.get_origin(member)
            args = typing.get_args(member)
            if isinstance(part, int) and origin in (list, tuple) and args:
                yield args[0]
            elif isinstance(part, str) and _is_model(member):
                for name, field in member.model_fields.items():
                    if part in (name, field.alias):
                        yield field.annotation
            elif isinstance(part, str) and origin is dict and len(args) == 2:
                yield args[1]


def _flatten(tp: Any) -> Iterator[Any]:
    origin = typing.get_origin(tp)
    if origin is typing.Annotated:
        yield from _flatten(typing.get_args(tp)[0])
    elif origin is typing.Union or isinstance(tp, types.UnionType):
        for arg in typing.get_args(tp):
            yield from _flatten(arg)
    else:
        yield tp


def _is_model(tp: Any) -> bool:
    return isinstance(tp, type) and issubclass(tp, BaseModel)
