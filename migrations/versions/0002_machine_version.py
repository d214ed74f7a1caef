"""machine_version on orders and transitions

Every order and every transition row records the machine (`fsm.machine.MACHINE_VERSION`,
a hash of the transition tables) it was written under. Rows that exist already get the
machine installed when this revision runs: they were written before versions existed, and
`order-saga check-upgrade` (not this label) decides whether the machine can drive them.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-28 17:30:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
import sqlmodel
from alembic import op

from fsm.version import MACHINE_VERSION

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

TABLES = ("orders", "transitions")


def upgrade() -> None:
    for table in TABLES:
        # The server default fills the existing rows in the same statement, then goes:
        # new rows must name their machine explicitly, never inherit this one.
        with op.batch_alter_table(table, schema=None) as batch_op:
            batch_op.add_column(
                sa.Column(
                    "machine_version",
                    sqlmodel.sql.sqltypes.AutoString(length=12),
                    nullable=False,
                    server_default=MACHINE_VERSION,
                )
            )
        with op.batch_alter_table(table, schema=None) as batch_op:
            batch_op.alter_column("machine_version", server_default=None)


def downgrade() -> None:
    for table in TABLES:
        with op.batch_alter_table(table, schema=None) as batch_op:
            batch_op.drop_column("machine_version")
