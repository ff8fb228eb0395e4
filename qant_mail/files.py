"""Writing output files so that a failure never leaves one half-written."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path

from qant_mail.errors import OutputError


def write_all(files: Mapping[Path, bytes]) -> None:
    """Write every file, or none: each goes to a temporary file first, renamed at the end."""
    staged: list[tuple[Path, Path]] = []
    try:
        for path, data in files.items():
            path.parent.mkdir(parents=True, exist_ok=True)
            handle, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
            staged.append((Path(name), path))
            with os.fdopen(handle, "wb") as out:
                out.write(data)
                out.flush()
                os.fsync(out.fileno())
        for temporary, final in staged:
            temporary.replace(final)
    except OSError as err:
        for temporary, _ in staged:
            with contextlib.suppress(OSError):
                temporary.unlink()
        where = err.filename or (staged[-1][1] if staged else "output")
        raise OutputError(f"{where}: cannot write: {err.strerror}") from None


def create_new(path: Path, data: bytes) -> None:
    """Write a file that must not exist yet; never overwrite one."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("xb") as out:
            out.write(data)
    except FileExistsError:
        raise OutputError(f"{path} already exists; edit it, or remove it first") from None
    except OSError as err:
        raise OutputError(f"{path}: cannot write: {err.strerror}") from None
