"""heatmap roll-up: heat_totals, heat_hours, heat_cursor; transitions.created_at indexed

The heatmap (issue 18 §4) read the whole transition log on each load (~11 s at 1M
transitions on PostgreSQL). `fsm.rollup.roll` folds the log into per-edge counts with a
histogram of the stays each edge ended, all time and per hour, behind a cursor on the
log's id; a load reads the roll-up plus the few transitions past the cursor. The engine
never writes these tables. The index on transitions.created_at serves the edge of a
window that falls inside an hour.

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-30 13:30:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
import sqlmodel
from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_STR = sqlmodel.sql.sqltypes.AutoString


def _edge() -> list[sa.Column]:  # type: ignore[type-arg]
    return [
        sa.Column("scope", _STR(length=16), nullable=False),
        sa.Column("trigger", _STR(length=40), nullable=False),
        sa.Column("from_state", _STR(length=32), nullable=False),
        sa.Column("to_state", _STR(length=32), nullable=False),
        sa.Column("bucket", sa.Integer(), nullable=False),
        sa.Column("n", sa.Integer(), nullable=False),
    ]


def upgrade() -> None:
    op.create_table(
        "heat_totals",
        *_edge(),
        sa.PrimaryKeyConstraint("scope", "trigger", "from_state", "to_state", "bucket"),
    )
    op.create_table(
        "heat_hours",
        sa.Column("hour", sa.DateTime(timezone=True), nullable=False),
        *_edge(),
        sa.PrimaryKeyConstraint("hour", "scope", "trigger", "from_state", "to_state", "bucket"),
    )
    op.create_table(
        "heat_cursor",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("rolled_id", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index(op.f("ix_transitions_created_at"), "transitions", ["created_at"], unique=False)


def downgrade() -> None:
    op.drop_index(op.f("ix_transitions_created_at"), table_name="transitions")
    op.drop_table("heat_cursor")
    op.drop_table("heat_hours")
    op.drop_table("heat_totals")
