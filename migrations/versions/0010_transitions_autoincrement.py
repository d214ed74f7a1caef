"""SQLite: the transition log's ids are never reused (AUTOINCREMENT)

The heatmap roll-up (`fsm.rollup`) folds the log past a cursor on its id. SQLite's plain
INTEGER PRIMARY KEY hands out max(id) + 1, so once retention deleted the newest rows the
next transitions took ids at or below the cursor and were never folded (the heatmap
missed them for good). The table is rebuilt with AUTOINCREMENT, its counter started at the
larger of the highest id and the cursor; rows keep their ids. PostgreSQL: nothing to do,
its sequence never goes back.

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-01 14:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
import sqlmodel
from alembic import op

revision: str = "0010"
down_revision: str | None = "0009"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_STR = sqlmodel.sql.sqltypes.AutoString
_COPIED = (
    "id, order_id, seq, scope, trigger, from_state, to_state, detail, created_at, "
    "machine_version, order_created_at"
)


def _rebuild(*, autoincrement: bool) -> None:
    """SQLite: the log as 0007 made it, with or without AUTOINCREMENT, rows and ids kept."""
    op.rename_table("transitions", "transitions_old")
    op.drop_index("ix_transitions_created_at", table_name="transitions_old")  # names are global
    op.create_table(
        "transitions",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("order_id", sa.Uuid(), nullable=False),
        sa.Column("seq", sa.Integer(), nullable=False),
        sa.Column("scope", _STR(length=16), nullable=False),
        sa.Column("trigger", _STR(length=40), nullable=False),
        sa.Column("from_state", _STR(length=32), nullable=False),
        sa.Column("to_state", _STR(length=32), nullable=False),
        sa.Column("detail", sa.JSON(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("machine_version", _STR(length=12), nullable=False),
        sa.Column("order_created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("order_id", "seq", "order_created_at", name="uq_transitions_order_seq"),
        sqlite_autoincrement=autoincrement,
    )
    op.create_index("ix_transitions_created_at", "transitions", ["created_at"], unique=False)
    op.execute(f"INSERT INTO transitions ({_COPIED}) SELECT {_COPIED} FROM transitions_old")
    op.drop_table("transitions_old")


def upgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        return
    _rebuild(autoincrement=True)
    # The next id comes after every id the log holds and every id the roll-up has folded
    # (the newest rows may be gone already, their ids below the cursor).
    op.execute("DELETE FROM sqlite_sequence WHERE name = 'transitions'")
    op.execute(
        "INSERT INTO sqlite_sequence (name, seq) SELECT 'transitions', max("
        "COALESCE((SELECT max(id) FROM transitions), 0), "
        "COALESCE((SELECT max(rolled_id) FROM heat_cursor), 0))"
    )


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        return
    _rebuild(autoincrement=False)
