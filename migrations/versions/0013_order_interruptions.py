"""orders.interruptions: how many times in a row the order's driver died under it

A claim that takes over a lease another owner held and let expire (its process died:
OOM, a segfault, a watchdog's kill -9) counts one; a transition its driver writes puts it
back to 0. The sweep leaves an order at ORDER_SAGA_MAX_INTERRUPTIONS for an operator
(Order.held). Additive: NOT NULL with a server default of 0, so every order there
is starts at 0 and a release before this one, which never names the column, still inserts
orders during a rolling deploy.

Revision ID: 0013
Revises: 0012
Create Date: 2026-12-02 00:40:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0013"
down_revision: str | None = "0012"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # PostgreSQL 11+ adds a column with a constant default without rewriting the table;
    # SQLite's ADD COLUMN never rewrites it either (no batch rebuild needed).
    op.add_column(
        "orders", sa.Column("interruptions", sa.Integer(), nullable=False, server_default="0")
    )
    # Partial: the few orders with a count (all 0 here), what /metrics reads at each scrape.
    op.create_index(
        "ix_orders_interrupted",
        "orders",
        ["interruptions"],
        postgresql_where=sa.text("interruptions > 0"),
        sqlite_where=sa.text("interruptions > 0"),
    )


def downgrade() -> None:
    op.drop_index("ix_orders_interrupted", table_name="orders")
    with op.batch_alter_table("orders") as batch_op:
        batch_op.drop_column("interruptions")
