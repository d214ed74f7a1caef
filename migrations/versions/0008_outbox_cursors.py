"""the outbox becomes a stream with a cursor per destination; deliveries only the exceptions

Issue 19's performance row: the engine's commit wrote one `outbox_deliveries` row per
destination beside each event, and the relay updated each of them twice (lease, then
delivered), on SQLite under the write lock the engine waits on. Now the commit writes the
event row only; each destination has a cursor (`outbox_cursors`) over the events in commit
order (fsm.outbox_sql says how that order is had on each database), and a delivery gets a
row only when it failed once or waits behind one that did.

`outbox_events` gains `position` (the key: SQLite INTEGER PRIMARY KEY AUTOINCREMENT, the
table rebuilt; PostgreSQL an identity column) and `txid` (PostgreSQL: the writing
transaction's id; 0 on SQLite and for the events that exist already); `id` stays unique.
Existing events get positions in (created_at, seq) order. Every existing destination gets
a cursor after the last event: what its deliveries rows say is still owed (pending or
dead) stays there and is delivered through them, as exception rows.

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-01 03:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
import sqlmodel
from alembic import op

revision: str = "0008"
down_revision: str | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_STR = sqlmodel.sql.sqltypes.AutoString
_COPIED = "id, order_id, seq, type, created_at, body"


def upgrade() -> None:
    postgres = op.get_bind().dialect.name == "postgresql"
    if postgres:
        op.execute("ALTER TABLE outbox_events DROP CONSTRAINT outbox_events_pkey")
        op.execute("ALTER TABLE outbox_events ADD COLUMN position BIGINT")
        # Existing rows numbered in their order, then the identity takes over after them.
        op.execute(
            "WITH ranked AS (SELECT id, row_number() OVER (ORDER BY created_at, seq) AS n "
            "FROM outbox_events) "
            "UPDATE outbox_events e SET position = ranked.n FROM ranked WHERE ranked.id = e.id"
        )
        op.execute("ALTER TABLE outbox_events ALTER COLUMN position SET NOT NULL")
        op.execute(
            "ALTER TABLE outbox_events ALTER COLUMN position ADD GENERATED ALWAYS AS IDENTITY"
        )
        op.execute(
            "SELECT setval(pg_get_serial_sequence('outbox_events', 'position'), "
            "GREATEST((SELECT MAX(position) FROM outbox_events), 1))"
        )
        op.execute("ALTER TABLE outbox_events ADD PRIMARY KEY (position)")
        op.execute("ALTER TABLE outbox_events ADD CONSTRAINT outbox_events_id_key UNIQUE (id)")
        op.execute("ALTER TABLE outbox_events ADD COLUMN txid BIGINT NOT NULL DEFAULT 0")
        op.execute(
            "ALTER TABLE outbox_events ALTER COLUMN txid "
            "SET DEFAULT (pg_current_xact_id()::text::bigint)"
        )
        op.create_index("ix_outbox_events_txid_position", "outbox_events", ["txid", "position"])
    else:
        op.drop_index("ix_outbox_events_order_id", table_name="outbox_events")
        op.rename_table("outbox_events", "outbox_events_old")
        op.execute(
            "CREATE TABLE outbox_events ("
            "position INTEGER NOT NULL PRIMARY KEY AUTOINCREMENT, "
            "id VARCHAR(80) NOT NULL, order_id CHAR(32) NOT NULL, seq INTEGER NOT NULL, "
            "type VARCHAR(40) NOT NULL, created_at DATETIME NOT NULL, body VARCHAR NOT NULL, "
            "txid BIGINT DEFAULT 0 NOT NULL, UNIQUE (id))"
        )
        op.execute(
            f"INSERT INTO outbox_events ({_COPIED}) SELECT {_COPIED} FROM outbox_events_old "
            "ORDER BY created_at, seq"
        )
        op.drop_table("outbox_events_old")
        op.create_index("ix_outbox_events_order_id", "outbox_events", ["order_id"])
    op.create_table(
        "outbox_cursors",
        sa.Column("destination_id", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("txid", sa.BigInteger(), nullable=False),
        sa.Column("position", sa.BigInteger(), nullable=False),
        sa.Column("lease_owner", _STR(length=200), nullable=True),
        sa.Column("lease_until", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("destination_id"),
    )
    # After every event: what is still owed is in outbox_deliveries (pending or dead).
    op.execute(
        "INSERT INTO outbox_cursors (destination_id, txid, position) "
        "SELECT id, 0, COALESCE((SELECT MAX(position) FROM outbox_events), 0) "
        "FROM event_destinations"
    )
    # Delivered rows are no exceptions: the cursor has passed their events.
    op.execute("DELETE FROM outbox_deliveries WHERE state = 'delivered'")


def downgrade() -> None:
    postgres = op.get_bind().dialect.name == "postgresql"
    # Every (event, subscribed destination) a cursor passed without an exception row was
    # delivered; the events after a cursor are pending again.
    passed = "(e.txid < c.txid OR (e.txid = c.txid AND e.position <= c.position))"
    for condition, state in ((passed, "delivered"), (f"NOT {passed}", "pending")):
        op.execute(
            "INSERT INTO outbox_deliveries (destination_id, event_id, order_id, seq, state, "
            "attempts, next_attempt_at, created_at, retry_from) "
            f"SELECT c.destination_id, e.id, e.order_id, e.seq, '{state}', 0, e.created_at, "
            "e.created_at, e.created_at FROM outbox_events e "
            f"JOIN outbox_cursors c ON {condition} "
            "JOIN event_destinations ds ON ds.id = c.destination_id "
            "AND ds.events LIKE '%,' || e.type || ',%' "
            "WHERE NOT EXISTS (SELECT 1 FROM outbox_deliveries o "
            "WHERE o.destination_id = c.destination_id AND o.event_id = e.id)"
        )
    op.drop_table("outbox_cursors")
    if postgres:
        op.drop_index("ix_outbox_events_txid_position", table_name="outbox_events")
        op.execute("ALTER TABLE outbox_events DROP CONSTRAINT outbox_events_pkey")
        op.execute("ALTER TABLE outbox_events DROP CONSTRAINT outbox_events_id_key")
        op.execute("ALTER TABLE outbox_events DROP COLUMN txid")
        op.execute("ALTER TABLE outbox_events DROP COLUMN position")
        op.execute("ALTER TABLE outbox_events ADD PRIMARY KEY (id)")
    else:
        op.drop_index("ix_outbox_events_order_id", table_name="outbox_events")
        op.rename_table("outbox_events", "outbox_events_new")
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
        op.execute(f"INSERT INTO outbox_events ({_COPIED}) SELECT {_COPIED} FROM outbox_events_new")
        op.drop_table("outbox_events_new")
        op.create_index("ix_outbox_events_order_id", "outbox_events", ["order_id"])
