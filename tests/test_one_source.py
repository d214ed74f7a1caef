"""One source for each fact (issue 15 items 3 and 4), checked over the source's syntax tree:
SQL text is written only in `fsm/sql.py` and `fsm/queries.py`, and no module spells a step's
name or state column by hand: the steps come from the registry (`fsm.registry.STEPS`).

Docstrings are prose and are not checked; every other string literal (f-string parts
included) and every attribute name is.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from fsm.registry import STEPS

REPO = Path(__file__).resolve().parent.parent
ENGINE_PACKAGES = ("fsm", "api", "order_saga")
# fsm/outbox_sql.py: the order events' statements (issue 19), beside the orders' own;
# fsm/partitions.py: the PostgreSQL partitions' DDL and catalog reads (issue 22), written
# beside the scheme they implement (day bounds, names), not data statements.
SQL_MODULES = {"fsm/sql.py", "fsm/queries.py", "fsm/outbox_sql.py", "fsm/partitions.py"}
# The registry, the only module that may write the steps' names, and the schema (the
# tables' columns, declared as SQLModel fields).
STEP_REGISTRY = {"fsm/registry.py", "fsm/machine.py", "fsm/models.py"}
# A literal equal to a step's name that is not about the step list.
# The order's `shipping` field (SPEC §4), in its model and in the document events carry.
NOT_A_STEP = {("api/schemas.py", "shipping"), ("fsm/outbox.py", "shipping")}

SQL = re.compile(
    r"\b(SELECT\s.+\sFROM|INSERT\s+INTO|UPDATE\s+\w+\s+SET|DELETE\s+FROM|PRAGMA\s|"
    r"BEGIN\s+IMMEDIATE|CREATE\s+(TABLE|INDEX))\b",
    re.DOTALL,
)
STEP_NAMES = {row.name for row in STEPS} | {row.column for row in STEPS}
# Identifiers: only the state columns (a bare `inventory` names the service, `Services`' field).
STEP_COLUMNS = {row.column for row in STEPS}


def sources(*packages: str) -> Iterator[tuple[str, ast.AST]]:
    for package in packages:
        for path in sorted((REPO / package).rglob("*.py")):
            yield path.relative_to(REPO).as_posix(), ast.parse(path.read_text(), str(path))


def _docstrings(tree: ast.AST) -> set[int]:
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
                found.add(id(body[0].value))
    return found


def literals(tree: ast.AST) -> Iterator[tuple[int, str]]:
    """(line, text) of every string literal but docstrings."""
    skip = _docstrings(tree)
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in skip:
            yield node.lineno, node.value


def names(tree: ast.AST) -> Iterator[tuple[int, str]]:
    """(line, name) of every attribute, keyword argument and variable."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute):
            yield node.lineno, node.attr
        elif isinstance(node, ast.keyword) and node.arg is not None:
            yield node.value.lineno, node.arg
        elif isinstance(node, ast.Name):
            yield node.lineno, node.id


def test_sql_text_lives_in_the_sql_and_queries_modules_only() -> None:
    found = [
        f"{path}:{line}: {text[:60]!r}"
        for path, tree in sources(*ENGINE_PACKAGES)
        if path not in SQL_MODULES
        for line, text in literals(tree)
        if SQL.search(text)
    ]
    assert found == []


def test_the_checker_finds_sql_and_step_names() -> None:
    """The two checks above and below are not vacuous: they see what they look for."""
    tree = ast.parse('x = f"UPDATE orders SET {c} = 1"\ny = "payment"\norder.shipping_state\n')
    assert [text for _, text in literals(tree) if SQL.search(text)] == ["UPDATE orders SET "]
    assert [t for _, t in literals(tree) if t in STEP_NAMES] == ["payment"]
    assert [n for _, n in names(tree) if n in STEP_COLUMNS] == ["shipping_state"]
    sql_module = ast.parse((REPO / "fsm/sql.py").read_text())
    assert any(SQL.search(text) for _, text in literals(sql_module))


@pytest.mark.parametrize("packages", [ENGINE_PACKAGES, ("tests/support",)], ids=str)
def test_no_step_name_is_written_outside_the_registry(packages: tuple[str, ...]) -> None:
    found = [
        f"{path}:{line}: {text!r}"
        for path, tree in sources(*packages)
        if path not in STEP_REGISTRY
        for line, text in [
            *((n, t) for n, t in literals(tree) if t in STEP_NAMES),
            *((n, t) for n, t in names(tree) if t in STEP_COLUMNS),
        ]
        if (path, text) not in NOT_A_STEP
    ]
    assert found == []
