"""event_destinations: a rotated webhook secret's overlap in columns of its own

`webhooks rotate --overlap` stored `<new> <old>@<until>` (epoch seconds) in `secret`; a
relay of the release before `rotate` read that whole string as one secret, could not sign
with it and stopped delivering to the webhook until it was upgraded. From this revision
`rotate` writes `secret` as the current secret alone, and the one it replaced signs
beside it, until `previous_until`, from `previous_secret`, while `secret` is still the one
whose fingerprint is `previous_for` (a rotation by a release before this one writes
`secret` alone: its new secret ends the overlap).

Additive only: rows are left as they are. A row in the old form keeps it (this release
reads it, fsm.destinations.webhook.signing_keys; the release before, still running during
a rolling deploy, does too: splitting it here would cut that release's overlap short) and
moves to the columns at its next rotation. The downgrade folds an overlap of the columns
back into the old form where `secret` is a plain secret the overlap belongs to. The
columns are nullable: adding them rewrites nothing (PostgreSQL: a catalog change).

Revision ID: 0012
Revises: 0011
Create Date: 2026-12-02 00:40:00
"""

import hashlib
from collections.abc import Sequence
from datetime import UTC

import sqlalchemy as sa
import sqlmodel
from alembic import op

revision: str = "0012"
down_revision: str | None = "0011"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

destinations = sa.table(
    "event_destinations",
    sa.column("id", sa.Integer()),
    sa.column("secret", sqlmodel.sql.sqltypes.AutoString(length=200)),
    sa.column("previous_secret", sqlmodel.sql.sqltypes.AutoString(length=200)),
    sa.column("previous_until", sa.DateTime(timezone=True)),
    sa.column("previous_for", sqlmodel.sql.sqltypes.AutoString(length=64)),
)


def upgrade() -> None:
    with op.batch_alter_table("event_destinations", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column(
                "previous_secret", sqlmodel.sql.sqltypes.AutoString(length=200), nullable=True
            )
        )
        batch_op.add_column(sa.Column("previous_until", sa.DateTime(timezone=True), nullable=True))
        batch_op.add_column(
            sa.Column("previous_for", sqlmodel.sql.sqltypes.AutoString(length=64), nullable=True)
        )


def _fingerprint(secret: str) -> str:  # frozen copy of fsm.destinations.webhook.fingerprint
    return hashlib.sha256(secret.encode()).hexdigest()[:16]


def downgrade() -> None:
    t, bind = destinations, op.get_bind()
    overlapping = sa.select(
        t.c.id, t.c.secret, t.c.previous_secret, t.c.previous_until, t.c.previous_for
    ).where(t.c.previous_secret.is_not(None), t.c.previous_until.is_not(None))
    for row_id, current, previous, until, of in bind.execute(overlapping).all():
        if " " in current or of != _fingerprint(current):
            continue  # the old form already, or an overlap a later rotation ended: as is
        if until.tzinfo is None:  # SQLite hands it back naive: it was written in UTC
            until = until.replace(tzinfo=UTC)
        folded = f"{current} {previous}@{until.timestamp():.0f}"
        bind.execute(t.update().where(t.c.id == row_id).values(secret=folded))
    with op.batch_alter_table("event_destinations", schema=None) as batch_op:
        batch_op.drop_column("previous_for")
        batch_op.drop_column("previous_until")
        batch_op.drop_column("previous_secret")
