"""The code is as docs/architecture.md says: modules listed, libraries at home, no cycles."""

from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "qant_mail"
PAGE = (ROOT / "docs" / "architecture.md").read_text(encoding="utf-8")

# Each library's import name, and the modules allowed to import it.
HOMES = {
    "typer": {"cli"},
    "rich": {"cli"},
    "ruamel": {"load"},
    "markdown_it_pyrs": {"prose"},
    "jinja2": {"render"},
    "markupsafe": {"render"},
    "mjml": {"render"},
    "css_inline": {"render"},
    "babel": {"render"},
    "PIL": {"images"},
    "psycopg": {"store"},
    "email_validator": {"addresses"},
    "cryptography": {"dkim"},
    "flufl": {"bounces"},
    "aiosmtpd": {"inbox"},
    "uvicorn": {"webserver"},
    "watchfiles": {"preview"},
    "pydantic": {"schema", "model", "config", "load", "lint"},
    "pydantic_core": {"model"},
    "starlette": {"preview", "serve", "webserver"},
    "anyio": {"preview", "serve", "webserver"},
}


def _modules() -> list[str]:
    return sorted(path.stem for path in PACKAGE.glob("*.py"))


def _imports(module: str) -> list[str]:
    """Return every module `module` imports, at its top or inside a function."""
    tree = ast.parse((PACKAGE / f"{module}.py").read_text(encoding="utf-8"))
    found: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if node.module == "qant_mail":
                found += [f"qant_mail.{alias.name}" for alias in node.names]
            else:
                found.append(node.module)
    return found


def _internal(module: str) -> set[str]:
    names = {name.split(".")[1] for name in _imports(module) if name.startswith("qant_mail.")}
    return names & set(_modules())


def test_every_module_is_on_the_architecture_page_and_every_listed_one_exists() -> None:
    listed = set(re.findall(r"`(\w+)\.py`", PAGE))
    for module in _modules():
        assert f"`{module}.py`" in PAGE, f"{module}.py is not in docs/architecture.md"
    assert listed - set(_modules()) == set(), "the page lists modules that do not exist"


def test_each_library_is_imported_from_its_home_only() -> None:
    for module in _modules():
        for name in _imports(module):
            top = name.split(".")[0]
            if top in sys.stdlib_module_names or top in ("qant_mail", "__future__"):
                continue
            assert top in HOMES, f"{module}.py imports {top}, which has no home on the page"
            assert module in HOMES[top], f"{module}.py imports {top}, whose home is elsewhere"


def test_nothing_imports_the_command_line_and_rendering_knows_no_subscriber() -> None:
    for module in _modules():
        if module != "__main__":
            assert "cli" not in _internal(module), module
    for module in ("load", "model", "prose", "typography", "images", "render", "lint"):
        assert not _internal(module) & {"subscribers", "ledger", "send", "transport", "store"}


def test_the_modules_import_each_other_without_a_cycle() -> None:
    graph = {module: _internal(module) for module in _modules()}
    done: set[str] = set()

    def visit(module: str, path: tuple[str, ...]) -> None:
        if module in path:
            cycle = " → ".join((*path[path.index(module) :], module))
            raise AssertionError(f"import cycle: {cycle}")
        if module in done:
            return
        for other in sorted(graph[module]):
            visit(other, (*path, module))
        done.add(module)

    for module in graph:
        visit(module, ())
