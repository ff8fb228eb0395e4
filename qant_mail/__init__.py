"""qant-mail: write, check, preview and send a structured newsletter by email."""

from __future__ import annotations


def __getattr__(name: str) -> str:
    # The installed distribution's own version, one number written in pyproject.toml;
    # looked up when asked for: importlib.metadata would cost every command's start.
    if name != "__version__":
        raise AttributeError(name)
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("qant-mail")
    except PackageNotFoundError:  # a source tree that was never installed
        return "0.0.0+source"
