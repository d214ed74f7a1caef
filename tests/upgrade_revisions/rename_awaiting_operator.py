"""rename the order state awaiting_operator -> needs_attention (a state migration)

The README's recipe ("Upgrading the machine safely"), run by tests/test_upgrade.py: the
previous release called the parked state `awaiting_operator`, this one `needs_attention`.
Every row in the old state is rewritten (live or not: `fsm.store` refuses to read a state
its machine does not declare) with its coarse status and the version of the machine that
now drives it, in the migration's single transaction. The transition log is history and
keeps the old names, each row with the machine version that wrote it.

Revision ID: rename_example
Revises: 0002
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from fsm.upgrade import Tables

revision: str = "rename_example"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

OLD, NEW, STATUS = "awaiting_operator", "needs_attention", "needs_attention"
# A real revision writes both versions as literals (`order-saga diagram` prints the new
# one); this example derives them so that it stays valid while the machine evolves.
NEW_VERSION = Tables.installed().version
OLD_VERSION = Tables.installed().renamed("order", NEW, OLD).version

orders = sa.table("orders", sa.column("state"), sa.column("status"), sa.column("machine_version"))


def upgrade() -> None:
    op.execute(
        orders.update()
        .where(orders.c.state == OLD)
        .values(state=NEW, status=STATUS, machine_version=NEW_VERSION)
    )


def downgrade() -> None:
    op.execute(
        orders.update()
        .where(orders.c.state == NEW, orders.c.machine_version == NEW_VERSION)
        .values(state=OLD, machine_version=OLD_VERSION)
    )
