"""House rules for the tests themselves (STYLE.md 15, 17, 22), read from the source with
`ast`: a test module never imports another test module (shared pieces live in
tests/support/), the console-script path is defined once. Nothing here runs the saga."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent


def modules() -> Iterator[tuple[str, ast.Module]]:
    """(path relative to the repository, parsed module) for every .py under tests/."""
    for path in sorted(TESTS.rglob("*.py")):
        yield path.relative_to(ROOT).as_posix(), ast.parse(path.read_text(), str(path))


def imported(path: str, tree: ast.Module) -> Iterator[str]:
    """Every module name `tree` imports, relative imports resolved against `path`."""
    package = path.removesuffix(".py").split("/")[:-1]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            module = ".".join([*base, *([node.module] if node.module else [])])
            yield module
            # `from tests import test_cli` names a module in the alias, not in `module`.
            yield from (f"{module}.{alias.name}" for alias in node.names)


def is_test_helper(module: str) -> bool:
    return module == "tests.support" or module.startswith("tests.support.")


def test_no_test_module_imports_another() -> None:
    known = {p.removesuffix(".py").replace("/", ".") for p, _ in modules()}
    found = [
        f"{path} imports {name}"
        for path, tree in modules()
        for name in imported(path, tree)
        if name in known and not is_test_helper(name) and not name.endswith("__init__")
    ]
    assert not found, "shared test pieces belong in tests/support/:\n" + "\n".join(found)


def test_the_console_script_path_is_defined_once() -> None:
    definitions = [
        f"{path}:{node.lineno}"
        for path, tree in modules()
        for node in ast.walk(tree)
        if isinstance(node, ast.Assign | ast.AnnAssign)
        for target in (node.targets if isinstance(node, ast.Assign) else [node.target])
        if isinstance(target, ast.Name) and target.id == "ORDER_SAGA"
    ]
    assert [d.split(":")[0] for d in definitions] == ["tests/support/processes.py"], definitions
