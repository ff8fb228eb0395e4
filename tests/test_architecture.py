"""The code is as docs/architecture.md says: modules listed, grouped in layers that only
import downwards, libraries at home, no cycles."""

from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "qant_mail"
PAGE = (ROOT / "docs" / "architecture.md").read_text(encoding="utf-8")

# The layers, the lowest first: each may import those before it, never one after it.
# Beside each other, `authoring` and `store` know nothing of one another.
LAYERS = ["base", "authoring", "store", "audience", "delivery", "app", "web", "cli"]
BESIDE = {frozenset({"authoring", "store"})}

# The edges parse, call the application layer and answer: they reach nothing else.
EDGES = {"web": {"web", "app", "base"}, "cli": {"cli", "web", "app", "base"}}
_SQL = re.compile(
    r"\b(SELECT\s.*\sFROM|INSERT\s+INTO|UPDATE\s+\w+\s+SET|DELETE\s+FROM|CREATE\s+TABLE)\b",
    re.IGNORECASE | re.DOTALL,
)

# Each library's import name, and the modules allowed to import it.
HOMES = {
    "typer": {"cli"},
    "rich": {"cli"},
    "ruamel": {"authoring.load"},
    "markdown_it_pyrs": {"authoring.prose"},
    "jinja2": {"authoring.render"},
    "markupsafe": {"authoring.render"},
    "mjml": {"authoring.render"},
    "css_inline": {"authoring.render"},
    "babel": {"authoring.render"},
    "PIL": {"authoring.images"},
    "psycopg": {"store.db"},
    "psycopg_pool": {"store.db"},
    "email_validator": {"base.addresses"},
    "cryptography": {"delivery.dkim"},
    "flufl": {"delivery.bounces"},
    "aiosmtpd": {"delivery.inbox"},
    "dns": {"delivery.resolver"},
    "uvicorn": {"web.webserver"},
    "watchfiles": {"web.preview"},
    "pydantic": {
        "base.schema",
        "base.config",
        "authoring.model",
        "authoring.load",
        "authoring.lint",
    },
    "pydantic_core": {"authoring.model"},
    "starlette": {"web.preview", "web.serve", "web.webserver"},
    "anyio": {"web.preview", "web.serve", "web.webserver"},
}


def _modules() -> list[str]:
    """Return every module of the package, dotted below it: `cli`, `store.db`…"""
    return sorted(
        ".".join(path.relative_to(PACKAGE).with_suffix("").parts)
        for path in PACKAGE.rglob("*.py")
        if path.name != "__init__.py"
    )


def _layer(module: str) -> str:
    return "cli" if module in ("cli", "__main__") else module.split(".")[0]


def _imports(module: str) -> list[str]:
    """Return every module `module` imports, at its top or inside a function."""
    path = PACKAGE.joinpath(*module.split(".")).with_suffix(".py")
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if node.module == "qant_mail" or node.module.count(".") == 1:
                found += [f"{node.module}.{alias.name}" for alias in node.names]
            found.append(node.module)
    return found


def _internal(module: str) -> set[str]:
    known = set(_modules())
    return {
        name.removeprefix("qant_mail.")
        for name in _imports(module)
        if name.startswith("qant_mail.") and name.removeprefix("qant_mail.") in known
    }


def test_every_module_is_on_the_architecture_page_and_every_listed_one_exists() -> None:
    listed = set(re.findall(r"`((?:\w+/)?\w+)\.py`", PAGE))
    paths = {module.replace(".", "/") for module in _modules()}
    for path in sorted(paths):
        assert path in listed, f"{path}.py is not in docs/architecture.md"
    extra = {path for path in listed - paths if not path.startswith(("tests/", "__init__"))}
    assert extra == set(), f"the page lists modules that do not exist: {extra}"


def test_every_module_sits_in_a_layer() -> None:
    for module in _modules():
        assert _layer(module) in LAYERS, f"{module} is in no layer"


def test_no_import_runs_up_a_layer() -> None:
    for module in _modules():
        own = LAYERS.index(_layer(module))
        for other in _internal(module):
            layer = _layer(other)
            if frozenset({layer, _layer(module)}) in BESIDE:
                raise AssertionError(f"{module} imports {other}: the two layers stand apart")
            assert LAYERS.index(layer) <= own, f"{module} imports {other}, a layer above"


def test_the_command_line_and_the_web_side_call_the_application_layer_only() -> None:
    for module in _modules():
        allowed = EDGES.get(_layer(module))
        if allowed is None:
            continue
        for other in _internal(module):
            assert _layer(other) in allowed, f"{module} imports {other}: call a use case"


def _tree(module: str) -> ast.Module:
    path = PACKAGE.joinpath(*module.split(".")).with_suffix(".py")
    return ast.parse(path.read_text(encoding="utf-8"))


def test_no_sql_is_written_outside_the_store() -> None:
    for module in _modules():
        if _layer(module) == "store":
            continue
        for node in ast.walk(_tree(module)):
            if isinstance(node, ast.Constant) and isinstance(node.value, str):
                assert not _SQL.search(node.value), f"{module} writes SQL: {node.value[:60]!r}"


def test_messages_leave_through_the_outbox_only() -> None:
    """Only the outbox opens connections to the relay and hands messages over: every
    road applies the same rules."""
    for module in _modules():
        # (The store connects to databases: not a road out.)
        if module in ("delivery.outbox", "delivery.transport") or _layer(module) == "store":
            continue
        for node in ast.walk(_tree(module)):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
                name = node.func.attr
                assert name not in ("connect", "hand_over"), f"{module} calls .{name}()"


def test_each_library_is_imported_from_its_home_only() -> None:
    for module in _modules():
        for name in _imports(module):
            top = name.split(".")[0]
            if top in sys.stdlib_module_names or top in ("qant_mail", "__future__"):
                continue
            assert top in HOMES, f"{module} imports {top}, which has no home on the page"
            assert module in HOMES[top], f"{module} imports {top}, whose home is elsewhere"


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
