"""Secrets from the environment: a variable `NAME`, or the file its twin `NAME_FILE`
names (systemd credentials, container secrets), read the same way for every secret."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

from qant_mail.base.errors import ConfigError
from qant_mail.base.files import read_file

# A password, a signing key or a PEM private key: far below this. A larger file is not
# the one meant, and is not read whole into memory.
_LIMIT = 64 * 1024


def secret(env: Mapping[str, str] | None, name: str) -> str | None:
    """Return the secret in `name`, else the text of the file `name`_FILE names (one
    trailing line end dropped); None when neither is set."""
    env = os.environ if env is None else env
    value = env.get(name, "")
    path = env.get(f"{name}_FILE", "")
    if value and path:
        # Refused rather than one preferred: after a rotation, a stale copy left in one
        # of the two would sign or log in without anyone noticing which one is used.
        raise ConfigError(f"{name} and {name}_FILE are both set: keep one of them")
    if value:
        return value
    if not path:
        return None
    return _read(f"{name}_FILE", Path(path))


def origin(env: Mapping[str, str] | None, name: str) -> str:
    """Return which variable holds the secret `name`: `name`, or `name`_FILE with the
    path it names (for messages: never the secret itself)."""
    env = os.environ if env is None else env
    path = env.get(f"{name}_FILE", "")
    return f"{name}_FILE ({path})" if path and not env.get(name) else name


def is_set(env: Mapping[str, str] | None, name: str) -> bool:
    """Return whether `name` or `name`_FILE is set (the file is not read)."""
    env = os.environ if env is None else env
    return bool(env.get(name) or env.get(f"{name}_FILE"))


def _read(variable: str, path: Path) -> str:
    try:
        data = read_file(path, _LIMIT)
    except OSError as err:
        raise ConfigError(f"{variable}: {path}: cannot read: {err.strerror}") from err
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ConfigError(f"{variable}: {path}: not UTF-8 text (byte {err.start})") from err
    # `echo "$PASSWORD" > file` and editors end the file with a line end that is not
    # part of the secret; only one is dropped, so that a secret may end in spaces.
    text = text[:-2] if text.endswith("\r\n") else text.removesuffix("\n")
    if not text:
        raise ConfigError(f"{variable}: {path} is empty")
    return text
