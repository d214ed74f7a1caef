"""order events: destinations, the outbox and its per-destination deliveries

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-30 10:30:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
import sqlmodel
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_STR = sqlmodel.sql.sqltypes.AutoString


def upgrade() -> None:
    op.create_table(
        "event_destinations",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", _STR(length=200), nullable=False),
        sa.Column("kind", _STR(length=16), nullable=False),
        sa.Column("url", _STR(length=2000), nullable=False),
        sa.Column("secret", _STR(length=200), nullable=True),
        sa.Column("events", _STR(length=1000), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("name"),
    )
    op.create_table(
        "outbox_events",
        sa.Column("id", _STR(length=80), nullable=False),
        sa.Column("order_id", sa.Uuid(), nullable=False),
        sa.Column("seq", sa.Integer(), nullable=False),
        sa.Column("type", _STR(length=40), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("body", _STR(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_outbox_events_order_id", "outbox_events", ["order_id"], unique=False)
    op.create_table(
        "outbox_deliveries",
        sa.Column("destination_id", sa.Integer(), nullable=False),
        sa.Column("event_id", _STR(length=80), nullable=False),
        sa.Column("order_id", sa.Uuid(), nullable=False),
        sa.Column("seq", sa.Integer(), nullable=False),
        sa.Column("state", _STR(length=16), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("next_attempt_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("lease_owner", _STR(length=200), nullable=True),
        sa.Column("lease_until", sa.DateTime(timezone=True), nullable=True),
        sa.Column("last_error", _STR(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("retry_from", sa.DateTime(timezone=True), nullable=False),
        sa.Column("delivered_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("destination_id", "event_id"),
    )
    op.create_index(
        "ix_outbox_deliveries_due",
        "outbox_deliveries",
        ["destination_id", "state", "next_attempt_at"],
        unique=False,
    )
    op.create_index(
        "ix_outbox_deliveries_order",
        "outbox_deliveries",
        ["destination_id", "order_id", "seq"],
        unique=False,
    )


def downgrade() -> None:
    op.drop_index("ix_outbox_deliveries_order", table_name="outbox_deliveries")
    op.drop_index("ix_outbox_deliveries_due", table_name="outbox_deliveries")
    op.drop_table("outbox_deliveries")
    op.drop_index("ix_outbox_events_order_id", table_name="outbox_events")
    op.drop_table("outbox_events")
    op.drop_table("event_destinations")
