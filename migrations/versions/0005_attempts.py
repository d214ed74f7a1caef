"""attempts: failed and waiting downstream calls, beside the transition log

Why an order stands still (issue 18): each failed attempt of a call (its error and when
the next one is due) and each wait for an open circuit breaker, written by the executor
only when a call fails or waits. Not transitions: the machines are unchanged.

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-30 10:30:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
import sqlmodel
from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "attempts",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("order_id", sa.Uuid(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("call", sqlmodel.sql.sqltypes.AutoString(length=40), nullable=False),
        sa.Column("attempt", sa.Integer(), nullable=False),
        sa.Column("error", sqlmodel.sql.sqltypes.AutoString(), nullable=True),
        sa.Column("next_attempt_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("waiting_on", sqlmodel.sql.sqltypes.AutoString(length=40), nullable=True),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index(op.f("ix_attempts_order_id"), "attempts", ["order_id"], unique=False)


def downgrade() -> None:
    op.drop_index(op.f("ix_attempts_order_id"), table_name="attempts")
    op.drop_table("attempts")
