"""A non-editable install works (issue 11, item 13): build the wheel from a copy of the
source, install it into a fresh venv, and `order-saga db upgrade` a new SQLite file from
a directory that is not the checkout, so only what the wheel carries can be used."""

from __future__ import annotations

import os
import shutil
import sqlite3
import subprocess
import sys
import sysconfig
import tomllib
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
