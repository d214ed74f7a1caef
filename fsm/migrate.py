"""Apply the Alembic migrations programmatically (`order-saga db upgrade`, `serve`).

The migrations ship inside the package (the wheel maps the top-level `migrations/` to
`fsm/migrations`, see pyproject.toml), so an installed `order-saga` needs neither the
source tree nor `alembic.ini`; in a source checkout they are read where they are, and
`alembic upgrade head` with the top-level `alembic.ini` keeps working.
"""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config

PACKAGED = Path(__file__).resolve().parent / "migrations"  # installed from a wheel
SOURCE = Path(__file__).resolve().parent.parent / "migrations"  # a checkout, editable


def script_location() -> Path:
    for candidate in (PACKAGED, SOURCE):
        if (candidate / "env.py").is_file():
            return candidate
    raise FileNotFoundError(f"no migrations in {PACKAGED} or {SOURCE}")


def alembic_config(url: str) -> Config:
    config = Config()
    config.set_main_option("script_location", str(script_location()))
    config.set_main_option("path_separator", "os")
    config.attributes["url"] = url
    config.attributes["configure_logger"] = False
    return config


def upgrade(url: str, revision: str = "head") -> None:
    command.upgrade(alembic_config(url), revision)
