"""api keys with roles, the order's creator, idempotency keys scoped per creator

Issue 17. `api_keys` holds one row per client key (name, role, keyed hash of the secret,
never the secret); `server_secrets` the deployment's random secrets shared through the
database (the key pepper, the console's cookie signing key). `orders.created_by` names
the key that placed an order ("" for the orders that exist already: they were placed
with no identity), and the idempotency key becomes unique per creator, not globally.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-30 10:15:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
import sqlmodel
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# 0001 left the unique constraint on idempotency_key unnamed: PostgreSQL named it itself,
# SQLite's batch mode names it through this convention so it can be dropped.
NAMING = {"uq": "uq_%(table_name)s_%(column_0_name)s"}


def _old_unique() -> str:
    if op.get_bind().dialect.name == "postgresql":
        return "orders_idempotency_key_key"
    return "uq_orders_idempotency_key"


def upgrade() -> None:
    op.create_table(
        "api_keys",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
        sa.Column("role", sqlmodel.sql.sqltypes.AutoString(length=16), nullable=False),
        sa.Column("key_hash", sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("last_used_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("revoked_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("key_hash"),
        sa.UniqueConstraint("name"),
    )
    op.create_table(
        "server_secrets",
        sa.Column("name", sqlmodel.sql.sqltypes.AutoString(length=32), nullable=False),
        sa.Column("value", sqlmodel.sql.sqltypes.AutoString(length=128), nullable=False),
        sa.PrimaryKeyConstraint("name"),
    )
    with op.batch_alter_table("orders", naming_convention=NAMING) as batch_op:
        batch_op.add_column(
            sa.Column(
                "created_by",
                sqlmodel.sql.sqltypes.AutoString(length=64),
                nullable=False,
                server_default="",
            )
        )
        batch_op.drop_constraint(_old_unique(), type_="unique")
        batch_op.create_unique_constraint(
            "uq_orders_created_by_key", ["created_by", "idempotency_key"]
        )
        batch_op.create_index("ix_orders_created_by", ["created_by"], unique=False)
    with op.batch_alter_table("orders") as batch_op:
        batch_op.alter_column("created_by", server_default=None)


def downgrade() -> None:
    with op.batch_alter_table("orders", naming_convention=NAMING) as batch_op:
        batch_op.drop_index("ix_orders_created_by")
        batch_op.drop_constraint("uq_orders_created_by_key", type_="unique")
        batch_op.create_unique_constraint(_old_unique(), ["idempotency_key"])
        batch_op.drop_column("created_by")
    op.drop_table("server_secrets")
    op.drop_table("api_keys")
