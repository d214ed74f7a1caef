"""House rules for the tests themselves (STYLE.md 15, 17, 22), read from the source with
`ast`: a test module never imports another test module (shared pieces live in
tests/support/), the console-script path is defined once. Nothing here runs the saga."""

from __future__ import annotations

import ast
from collections.abc import Callable, Iterator, Mapping
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


# Fixed sleeps left on purpose, by (file, test): where idle time IS what the test checks.
SLEEPS_ALLOWED = {
    ("tests/test_racing.py", "test_two_workers_share_the_stuck_orders"): (
        "after every order is done, a few more idle sweeps must change nothing"
    ),
    ("tests/test_outage.py", "test_a_partial_outage_is_shielded_by_its_own_breaker"): (
        "a refund every 2 s through a 20 s outage: the pacing is the scenario"
    ),
    ("tests/test_keys.py", "scenario"): (
        "the cache entry must expire (its TTL is the scenario); the revoked key is then "
        "polled under the revocation bound"
    ),
    ("tests/test_auth_outage.py", "scenario"): (
        "each lookup must come after the cache entry expired (its TTL is the scenario): "
        "a miss each, and still one last_used_at write"
    ),
    (
        "tests/test_group_commit.py",
        "test_a_small_batch_waits_for_the_orders_in_flight_but_a_lone_order_never_waits",
    ): "a lingering write must still be waiting 0.2 s later: an absence over time",
    (
        "tests/test_relay.py",
        "test_a_trickle_of_events_is_claimed_in_batches_at_most_every_gather",
    ): "one order every 20 ms for 1.2 s: the trickle's pacing is the scenario",
}


class Sleeps(ast.NodeVisitor):
    """(innermost function, line) of every `time.sleep(...)`/`sleep(...)` call, and of every
    `asyncio.sleep(x)` but `asyncio.sleep(0)` (a yield to the loop, not a wait)."""

    def __init__(self) -> None:
        self.where: list[str] = ["<module>"]
        self.found: list[tuple[str, int]] = []

    def visit_FunctionDef(self, node: ast.FunctionDef | ast.AsyncFunctionDef) -> None:
        self.where.append(node.name)
        self.generic_visit(node)
        self.where.pop()

    visit_AsyncFunctionDef = visit_FunctionDef

    def visit_Call(self, node: ast.Call) -> None:
        called = ast.unparse(node.func)
        zero = bool(node.args) and ast.unparse(node.args[0]) in ("0", "0.0")
        if called in ("time.sleep", "sleep") or (called == "asyncio.sleep" and not zero):
            self.found.append((self.where[-1], node.lineno))
        self.generic_visit(node)


def calls_outside_the_allowed(
    visitor: type[Sleeps], skip: Callable[[str], bool], allowed: Mapping[tuple[str, str], str]
) -> tuple[list[str], list[tuple[str, str]]]:
    """The calls `visitor` finds in the test modules not skipped, as (those the allow-list
    does not name, the allow-list's entries no longer found)."""
    found: dict[tuple[str, str], int] = {}
    for path, tree in modules():
        if not skip(path):
            seen = visitor()
            seen.visit(tree)
            found |= {(path, name): line for name, line in seen.found}
    unexpected = [f"{p}:{line} in {n}" for (p, n), line in found.items() if (p, n) not in allowed]
    return unexpected, [key for key in allowed if key not in found]


def test_tests_wait_on_conditions_not_fixed_sleeps() -> None:
    """A test waits with tests.support.waiting (a condition polled under a deadline); only
    the helpers in tests/support/ sleep (a poll interval, a signal given time to land)."""
    unexpected, gone = calls_outside_the_allowed(
        Sleeps, lambda path: path.startswith("tests/support/"), SLEEPS_ALLOWED
    )
    assert not unexpected, "wait on a condition (tests.support.waiting):\n" + "\n".join(unexpected)
    assert not gone, f"allowed sleeps no longer there, drop them from the list: {gone}"


# Settings(...) written by hand, by (file, function): none of them configures a saga.
SETTINGS_ALLOWED = {
    ("tests/test_auth.py", "test_an_unusable_token_is_refused_at_start_up"): (
        "the validation of Settings itself"
    ),
    ("tests/test_clients.py", "call"): "one HTTP client and its timeout, no saga",
    ("tests/test_schemathesis.py", "services_live"): "the services' body limit, as deployed",
    ("tests/test_registry.py", "settings"): "the validation of the service URL map itself",
    ("tests/test_settings.py", "validated"): "the validation of Settings itself",
}


class SettingsCalls(Sleeps):
    """(innermost function, line) of every `Settings(...)` call."""

    def visit_Call(self, node: ast.Call) -> None:
        if ast.unparse(node.func) == "Settings":
            self.found.append((self.where[-1], node.lineno))
        self.generic_visit(node)


def test_test_settings_are_built_one_way() -> None:
    """tests/support/settings.py builds every saga's settings (and its ORDER_SAGA_* env)."""
    unexpected, gone = calls_outside_the_allowed(
        SettingsCalls, lambda path: path == "tests/support/settings.py", SETTINGS_ALLOWED
    )
    assert not unexpected, "use tests.support.settings:\n" + "\n".join(unexpected)
    assert not gone, f"allowed Settings(...) no longer there, drop them from the list: {gone}"
