"""A non-editable install works (issue 11, item 13): build the wheel from a copy of the
source, install it into a fresh venv, and `order-saga db upgrade` a new SQLite file from
a directory that is not the checkout, so only what the wheel carries can be used."""

from __future__ import annotations

import ast
import os
import shutil
import sqlite3
import subprocess
import sys
import sysconfig
import tomllib
from importlib import metadata
from pathlib import Path

import pytest
from alembic.script import ScriptDirectory
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name as canonical

ROOT = Path(__file__).resolve().parent.parent
SOURCES = ("pyproject.toml", "README.md", "fsm", "api", "downstream", "order_saga", "migrations")


def sh(*args: str | Path, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ORDER_SAGA_", "PYTHON"))}
    result = subprocess.run(
        [str(a) for a in args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, f"{args}\n{result.stdout}\n{result.stderr}"
    return result


@pytest.mark.slow
def test_the_wheel_installs_and_migrates_a_new_database(tmp_path: Path) -> None:
    source = tmp_path / "src"
    for name in SOURCES:
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, source / name, ignore=shutil.ignore_patterns("__py*"))
        else:
            source.mkdir(exist_ok=True)
            shutil.copy2(ROOT / name, source / name)
    sh(sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", tmp_path / "dist", source,
       cwd=tmp_path)  # fmt: skip
    [wheel] = (tmp_path / "dist").glob("order_saga-*.whl")

    venv = tmp_path / "venv"
    sh(sys.executable, "-m", "venv", "--without-pip", venv, cwd=tmp_path)
    python = venv / "bin" / "python"
    site = Path(sh(python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))",
                   cwd=tmp_path).stdout.strip())  # fmt: skip
    # The dependencies come from this environment (no network); the project only from the
    # wheel: a .pth entry is not a site dir, so this venv's editable finder is not loaded.
    (site / "deps.pth").write_text(sysconfig.get_path("purelib") + "\n")
    sh(sys.executable, "-m", "pip", "--python", python, "install", "-q", "--no-deps", wheel,
       cwd=tmp_path)  # fmt: skip

    where = sh(python, "-c", "import fsm.migrate as m; print(m.script_location())", cwd=tmp_path)
    assert where.stdout.strip() == str(site / "fsm" / "migrations")
    database = tmp_path / "elsewhere" / "new.db"
    database.parent.mkdir()
    env_url = f"ORDER_SAGA_DATABASE_URL=sqlite:///{database}"
    upgraded = sh("env", env_url, venv / "bin" / "order-saga", "db", "upgrade", cwd=database.parent)
    assert upgraded.stdout.strip() == f"database at head: sqlite:///{database}"
    with sqlite3.connect(database) as conn:
        tables = {row[0] for row in conn.execute("SELECT name FROM sqlite_master")}
        [(head,)] = conn.execute("SELECT version_num FROM alembic_version").fetchall()
    assert {"orders", "transitions", "alembic_version"} <= tables
    assert head == ScriptDirectory(str(ROOT / "migrations")).get_current_head()


def test_every_dependency_is_pinned_in_the_constraints() -> None:
    """`make lock` was run after the last change of pyproject.toml's dependencies."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = [*project["dependencies"], *project["optional-dependencies"]["dev"]]
    pinned = {
        canonical(line.split("==")[0]): line.split("==")[1].strip()
        for line in (ROOT / "constraints.txt").read_text().splitlines()
        if "==" in line and not line.startswith("#")
    }
    for requirement in map(Requirement, wanted):
        name = canonical(requirement.name)
        assert name in pinned, f"{name} is not in constraints.txt: run `make lock`"
        assert requirement.specifier.contains(pinned[name]), (name, pinned[name])


def _runtime_distributions() -> set[str]:
    """The distributions an install without the dev extra brings: pyproject.toml's
    dependencies (with the extras they name) and theirs, as this environment's metadata
    says."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    found: set[tuple[str, frozenset[str]]] = set()
    todo = [Requirement(r) for r in project["dependencies"]]
    while todo:
        requirement = todo.pop()
        key = (canonical(requirement.name), frozenset(requirement.extras))
        if key in found:
            continue
        found.add(key)
        try:
            requires = metadata.distribution(key[0]).requires or []
        except metadata.PackageNotFoundError:  # a marker's dependency for another platform
            continue
        for text in requires:
            needed = Requirement(text)
            extras = requirement.extras or {""}
            if needed.marker is None or any(needed.marker.evaluate({"extra": e}) for e in extras):
                todo.append(needed)
    return {name for name, _ in found}


def test_what_the_product_imports_is_installed_without_the_dev_extra() -> None:
    """A production install has no dev extra: a module the product imports (at the top or
    inside a function) that only the dev extra brings fails there, or runs on something
    else. api.oidc's httpx2 did: authlib's OAuth client fell back to plain httpx, a
    deprecated path (AuthlibDeprecationWarning) the tests, with the dev extra, never ran."""
    runtime = _runtime_distributions()
    providers = metadata.packages_distributions()
    ours = {"fsm", "api", "order_saga", "downstream", "migrations"}
    missing = sorted(
        f"{path.relative_to(ROOT)}: {top} ({', '.join(providers.get(top, ['not installed']))})"
        for package in ("fsm", "api", "order_saga", "downstream")
        for path in sorted((ROOT / package).rglob("*.py"))
        for node in ast.walk(ast.parse(path.read_text(), str(path)))
        for top in _imported(node)
        if top not in sys.stdlib_module_names and top not in ours
        if not {canonical(d) for d in providers.get(top, [])} & runtime
    )
    assert missing == []


def _imported(node: ast.AST) -> list[str]:
    """The top-level names of what `node` imports (relative imports are ours)."""
    if isinstance(node, ast.Import):
        return [alias.name.split(".")[0] for alias in node.names]
    if isinstance(node, ast.ImportFrom) and not node.level and node.module:
        return [node.module.split(".")[0]]
    return []
