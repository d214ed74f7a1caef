"""event_destinations: a rotated webhook secret's overlap in columns of its own

`webhooks rotate --overlap` stored `<new> <old>@<until>` (epoch seconds) in `secret`; a
relay of the release before `rotate` read that whole string as one secret, could not sign
with it and stopped delivering to the webhook until it was upgraded. Now `secret` holds
the current secret alone, and the one it replaced signs beside it, until
`previous_until`, from `previous_secret`. Rows in the old form are split here; the
downgrade folds them back (the old form, whatever the overlap's end). Both columns are
nullable: adding them rewrites nothing (PostgreSQL: a catalog change).

Revision ID: 0012
Revises: 0011
Create Date: 2026-12-02 00:40:00
"""

import re
from collections.abc import Sequence
from datetime import UTC, datetime

import sqlalchemy as sa
import sqlmodel
from alembic import op

revision: str = "0012"
down_revision: str | None = "0011"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# What fsm.destinations.webhook.rotated wrote (frozen here: that function is gone).
OVERLAPPING = re.compile(r"(\S+) (\S+)@(\d+)")

destinations = sa.table(
    "event_destinations",
    sa.column("id", sa.Integer()),
    sa.column("secret", sqlmodel.sql.sqltypes.AutoString(length=200)),
    sa.column("previous_secret", sqlmodel.sql.sqltypes.AutoString(length=200)),
    sa.column("previous_until", sa.DateTime(timezone=True)),
)


def upgrade() -> None:
    with op.batch_alter_table("event_destinations", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column(
                "previous_secret", sqlmodel.sql.sqltypes.AutoString(length=200), nullable=True
            )
        )
        batch_op.add_column(sa.Column("previous_until", sa.DateTime(timezone=True), nullable=True))
    t, bind = destinations, op.get_bind()
    # A handful of webhooks at most: row by row, parsed here, alike on both databases.
    overlapping = sa.select(t.c.id, t.c.secret).where(t.c.secret.like("% %"))
    for row_id, stored in bind.execute(overlapping).all():
        split = OVERLAPPING.fullmatch(stored)
        if split is None:  # not rotate's form: no relay could sign with it; left as found
            continue
        current, previous, until = split.groups()
        bind.execute(
            t.update()
            .where(t.c.id == row_id)
            .values(
                secret=current,
                previous_secret=previous,
                previous_until=datetime.fromtimestamp(int(until), UTC),
            )
        )


def downgrade() -> None:
    t, bind = destinations, op.get_bind()
    overlapping = sa.select(t.c.id, t.c.secret, t.c.previous_secret, t.c.previous_until).where(
        t.c.previous_secret.is_not(None), t.c.previous_until.is_not(None)
    )
    for row_id, current, previous, until in bind.execute(overlapping).all():
        if until.tzinfo is None:  # SQLite hands it back naive: it was written in UTC
            until = until.replace(tzinfo=UTC)
        folded = f"{current} {previous}@{until.timestamp():.0f}"
        bind.execute(t.update().where(t.c.id == row_id).values(secret=folded))
    with op.batch_alter_table("event_destinations", schema=None) as batch_op:
        batch_op.drop_column("previous_until")
        batch_op.drop_column("previous_secret")
