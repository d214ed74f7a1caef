"""The house drawn from its imports (issue 15, items 1 and 5), checked so it stays drawn:

- no circles: no two modules of fsm/api/order_saga/downstream import each other, directly
  or round a longer loop (lazy imports inside functions count: they are edges too);
- `fsm` never imports `api` or `order_saga`; `downstream` imports none of the three;
- `api` never imports `order_saga`, and `order_saga` takes from `api` only what it serves;
- the engine is assembled in one place: nothing outside `fsm/wiring.py` builds a `Store` or
  an `Executor` (tests of those classes themselves excepted), no module of the product
  makes a read pool (`make_engine`) but the wiring (with the settings' timeouts), the
  module that defines it and the migration's, and the token-bearing HTTP client is the
  composition root's, not the API's.

Read from the source with `ast` and a regular expression: nothing is imported to check it.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Iterator
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("fsm", "api", "order_saga", "downstream")

# `grep -rn "Store(\|Executor(" api order_saga tests bench fsm`, as the issue asks (the
# classes' own definitions aside). `build_store`/`build_executor`/`open_store` are the
# composition root's own functions: calling them is not building the engine oneself.
BUILDS_THE_ENGINE = re.compile(r"(?<!class )\b(Store|Executor)\(")
BUILT_ONLY_IN = "fsm/wiring.py"
# A read pool (`fsm.engine.make_engine`) in the product: made by the composition root
# (`open_engine`, `build_store`: DB_LOCK_TIMEOUT and DB_STATEMENT_TIMEOUT applied), by
# `fsm.engine` itself (`migration_engine`) and by `fsm.migrate` (the migration's own look,
# before there is a schema to serve); anywhere else it ran with the defaults' 5 s / 30 s
# whatever the settings said (`keys`, `check-upgrade`, the look for a database did). Tests
# and benchmarks make their own, as fixtures.
MAKES_A_READ_POOL = re.compile(r"(?<!def )\bmake_engine\(")
READ_POOLS_ONLY_IN = frozenset({"fsm/wiring.py", "fsm/engine.py", "fsm/migrate.py"})
# Tests of those classes themselves (the executor's retry policy and deadlines, the store's
# leases), which construct them with the one knob under test.
TESTS_OF_THE_CLASSES = frozenset({"tests/test_faults.py"})
# What the console script takes from the API: the app it serves (`serve`), the server-side
# middleware in front of the lone reference services (`services`), the JSON shapes the
# HTTP API answers with (`orders --json`). Never wiring: that is `fsm.wiring`'s.
CLI_USES_FROM_API = frozenset({"api.app", "api.guard", "api.schemas"})


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


@cache
def modules() -> dict[str, Path]:
    return {
        module_name(path): path for package in PACKAGES for path in (ROOT / package).rglob("*.py")
    }


def _targets(node: ast.Import | ast.ImportFrom, importer: str) -> Iterator[str]:
    if isinstance(node, ast.Import):
        yield from (alias.name for alias in node.names)
        return
    base = node.module or ""
    if node.level:  # relative: resolved against the importing module's package
        package = importer.split(".")
        if not modules()[importer].name == "__init__.py":
            package = package[:-1]
        package = package[: len(package) - (node.level - 1)]
        base = ".".join([*package, base] if base else package)
    yield base
    yield from (f"{base}.{alias.name}" for alias in node.names)  # `from fsm import store`


@cache
def graph() -> dict[str, frozenset[str]]:
    """Module -> the project modules it imports, anywhere in its body."""
    edges = {}
    for name, path in modules().items():
        found = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import | ast.ImportFrom):
                found.update(t for t in _targets(node, name) if t in modules())
        edges[name] = frozenset(found - {name})
    return edges


def imports_of(package: str) -> dict[str, frozenset[str]]:
    return {m: deps for m, deps in graph().items() if m.split(".")[0] == package}


def cycles() -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(graph()[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph()):
        if v not in index:
            visit(v)
    return found


def test_the_import_graph_sees_the_lazy_imports_too() -> None:
    # The reader must find what `order-saga` imports inside its commands, or the other
    # tests here would pass on a graph with the edges that matter left out.
    assert "fsm.wiring" in graph()["order_saga.cli"]
    assert "api.app" in graph()["order_saga.cli"]
    assert "order_saga.console" in graph()["order_saga.orders_cli"]
    assert "fsm.store" in graph()["fsm.wiring"]


def test_no_two_modules_import_each_other() -> None:
    assert cycles() == []


def test_the_engine_never_imports_the_api_or_the_console_script() -> None:
    wrong = {m: sorted(d) for m, d in imports_of("fsm").items() if any(_outside(d, "fsm"))}
    assert wrong == {}


def test_the_reference_services_import_nothing_of_ours() -> None:
    # Someone else's service: replaceable by a real one, so it knows nothing of the engine.
    mine = {
        m: sorted(d) for m, d in imports_of("downstream").items() if any(_outside(d, "downstream"))
    }
    assert mine == {}


def test_the_api_and_the_console_script_never_reach_into_each_other_for_wiring() -> None:
    api_to_cli = {m: sorted(d) for m, d in imports_of("api").items() if any(_in(d, "order_saga"))}
    assert api_to_cli == {}
    cli_to_api = {
        m: sorted(set(_in(d, "api")) - CLI_USES_FROM_API)
        for m, d in imports_of("order_saga").items()
    }
    assert {m: d for m, d in cli_to_api.items() if d} == {}
    # In the API only the app's lifespan opens the engine; the guard is server-side only.
    opens = sorted(m for m, d in imports_of("api").items() if "fsm.wiring" in d)
    assert opens == ["api.app"]


def _in(deps: frozenset[str], package: str) -> Iterator[str]:
    return (d for d in deps if d.split(".")[0] == package)


def _outside(deps: frozenset[str], package: str) -> Iterator[str]:
    return (d for d in deps if d.split(".")[0] != package)


def _sources() -> Iterator[Path]:
    for top in ("fsm", "api", "order_saga", "tests", "bench"):
        yield from sorted((ROOT / top).rglob("*.py"))


def test_only_the_composition_root_builds_the_engine() -> None:
    builders = sorted(
        f"{path.relative_to(ROOT)}:{number}: {line.strip()}"
        for path in _sources()
        if path != Path(__file__)
        and str(path.relative_to(ROOT)) not in {BUILT_ONLY_IN, *TESTS_OF_THE_CLASSES}
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if BUILDS_THE_ENGINE.search(line)
    )
    assert builders == []


def test_only_the_composition_root_makes_a_read_pool() -> None:
    makers = sorted(
        f"{relative}:{number}: {line.strip()}"
        for package in PACKAGES
        for path in sorted((ROOT / package).rglob("*.py"))
        if (relative := str(path.relative_to(ROOT))) not in READ_POOLS_ONLY_IN
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if MAKES_A_READ_POOL.search(line)
    )
    assert makers == []


@pytest.mark.parametrize("name", ["BearerFor", "AiohttpTransport"])
def test_the_service_clients_are_built_in_the_composition_root(name: str) -> None:
    """Our token on calls to our own services, and the HTTP client it rides on: built
    once, in `fsm/wiring.py`, used by everything that opens the engine."""
    here = Path(__file__)
    mentions = sorted(
        str(path.relative_to(ROOT))
        for path in _sources()
        if path != here and re.search(rf"\b{name}\(", path.read_text())
    )
    assert mentions == [BUILT_ONLY_IN]


def test_the_check_fails_on_an_entry_point_that_builds_its_own() -> None:
    # The pattern catches the constructions this test exists to forbid.
    assert BUILDS_THE_ENGINE.search("    store = Store(engine, lease_seconds=1)")
    assert BUILDS_THE_ENGINE.search("executor = fsm.executor.Executor(store=s, services=x)")
    assert not BUILDS_THE_ENGINE.search("with open_store(settings) as store:")
    assert not BUILDS_THE_ENGINE.search("class Store(Reads):")  # the class itself
    assert MAKES_A_READ_POOL.search("    engine = make_engine(settings.database_url)")
    assert MAKES_A_READ_POOL.search("engine = fsm.engine.make_engine(url, lock_timeout=1)")
    assert not MAKES_A_READ_POOL.search("def make_engine(url: str) -> Engine:")
    assert not MAKES_A_READ_POOL.search("with open_engine(settings) as engine:")
