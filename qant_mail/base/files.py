"""Reading the files users give (never a device or a pipe, never without a limit), and
writing output files so that a failure never leaves one half-written."""

from __future__ import annotations

import codecs
import contextlib
import errno
import os
import stat
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import BinaryIO, TextIO

from qant_mail.base.errors import OutputError


def read_file(path: Path, limit: int) -> bytes:
    """Return the bytes of the regular file at `path`, at most `limit` of them; raise
    OSError (with a `strerror` worth showing) for a folder, a device, a pipe or a file
    past the limit. Opening does not block, even on a FIFO with no writer."""
    with _regular(path) as (stream, size):
        if size > limit:
            raise OSError(errno.EFBIG, _too_big(size, limit), str(path))
        data = stream.read(limit + 1)
    if len(data) > limit:  # it grew while being read
        raise OSError(errno.EFBIG, _too_big(len(data), limit), str(path))
    return data


def read_head(path: Path, size: int) -> bytes:
    """Return the first `size` bytes of the regular file at `path` (see `read_file`)."""
    with _regular(path) as (stream, _):
        return stream.read(size)


def open_text(path: Path) -> TextIO:
    """Open the regular file at `path` to read as UTF-8 text (a BOM is skipped), as a
    stream (see `read_file` for what is refused)."""
    handle = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        _check_regular(path, os.fstat(handle))
        os.set_blocking(handle, True)
        return os.fdopen(handle, encoding="utf-8-sig", newline="")
    except BaseException:
        os.close(handle)
        raise


def first_bad_utf8_line(path: Path) -> int:
    """Return the line (1-based) of the first byte of `path` that is not UTF-8."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    line = 1
    with _regular(path) as (stream, _):
        while chunk := stream.read(1 << 16):
            try:
                decoder.decode(chunk)
            except UnicodeDecodeError as err:
                return line + chunk.count(b"\n", 0, max(err.start, 0))
            line += chunk.count(b"\n")
    return line


def _check_regular(path: Path, info: os.stat_result) -> None:
    if stat.S_ISDIR(info.st_mode):
        raise IsADirectoryError(errno.EISDIR, "is a folder, not a file", str(path))
    if not stat.S_ISREG(info.st_mode):
        raise OSError(errno.EINVAL, "not a regular file (a device or a pipe?)", str(path))


@contextlib.contextmanager
def _regular(path: Path) -> Iterator[tuple[BinaryIO, int]]:
    handle = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        info = os.fstat(handle)
        _check_regular(path, info)
        with os.fdopen(handle, "rb", closefd=False) as stream:
            yield stream, info.st_size
    finally:
        os.close(handle)


def _too_big(size: int, limit: int) -> str:
    mb = 1024 * 1024
    return f"the file is {size / mb:.1f} MB; at most {limit / mb:g} MB"


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
        raise OutputError(f"{where}: cannot write: {err.strerror}") from err


def create_new(path: Path, data: bytes, *, mode: int = 0o644) -> None:
    """Write a file that must not exist yet; never overwrite one."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
        with os.fdopen(handle, "wb") as out:
            out.write(data)
    except FileExistsError as err:
        raise OutputError(f"{path} already exists; edit it, or remove it first") from err
    except OSError as err:
        raise OutputError(f"{path}: cannot write: {err.strerror}") from err


def write_private(path: Path, data: bytes, *, replace: bool = False) -> None:
    """Write a file that holds a secret: readable by its owner only from its creation
    (0600; the folders it needs are made 0700), never over an existing file unless
    `replace`, and then all at once."""
    try:
        _make_private_folders(path.parent)
        if not replace:
            _write_new(path, data)
            return
        temporary = path.with_name(f".{path.name}.{os.urandom(6).hex()}.tmp")
        _write_new(temporary, data)
        try:
            temporary.replace(path)
        except BaseException:
            with contextlib.suppress(OSError):
                temporary.unlink()
            raise
    except FileExistsError as err:
        raise OutputError(f"{path} already exists; remove it first, or replace it") from err
    except OSError as err:
        raise OutputError(f"{err.filename or path}: cannot write: {err.strerror}") from err


def _write_new(path: Path, data: bytes) -> None:
    # Created with its mode, never chmod-ed after: no moment when others could open it.
    handle = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        with os.fdopen(handle, "wb") as out:
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
    except BaseException:
        with contextlib.suppress(OSError):
            path.unlink()
        raise


def _make_private_folders(folder: Path) -> None:
    # Path.mkdir(parents=True) gives the parents the umask's mode: each missing level is
    # made here, 0700, the top one first. Folders that exist are left as they are.
    missing: list[Path] = []
    for level in (folder, *folder.parents):
        if level.is_dir():
            break
        missing.append(level)
    for level in reversed(missing):
        with contextlib.suppress(FileExistsError):
            level.mkdir(mode=0o700)


def git_work_tree(path: Path) -> Path | None:
    """Return the top of the git work tree `path` would be in (the folder holding
    `.git`, a folder or a worktree's file), or None."""
    # Resolved: a ~/.config that is a link into a dotfiles repository counts as in it.
    for folder in path.resolve().parents:
        if (folder / ".git").exists():
            return folder
    return None
