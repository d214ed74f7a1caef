"""transitions carry order_created_at and are partitioned by day on PostgreSQL

Issue 22: retention drops a whole day of the transition log instead of deleting rows.
Each transition carries its order's creation time (`order_created_at`, the partition key);
the unique (order_id, seq) becomes (order_id, seq, order_created_at) (unique exactly when
the former is: an order has one creation time). The separate order_id index (the unique
one leads with order_id) and the foreign key to `orders` go (see fsm.partitions and the
README, "Keeping the database small"). `id` keeps its values and its sequence (the
heatmap roll-up's cursor); on PostgreSQL the key becomes (id, order_created_at).

PostgreSQL: a new table PARTITION BY RANGE (order_created_at) with a default partition and
one partition per UTC day from the oldest order's day to a week ahead; the log is copied
in with each order's creation time, then the old table dropped, all in this migration's
transaction (stop `serve`/`worker` first, as for any migration). SQLite: the same plain
table, copied the same way.

Revision ID: 0007
Revises: 0006
Create Date: 2026-11-30 14:15:00
"""

from collections.abc import Sequence
from datetime import UTC, datetime

import sqlalchemy as sa
import sqlmodel
from alembic import op

from fsm import partitions

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_STR = sqlmodel.sql.sqltypes.AutoString
_COPIED = (
    "id, order_id, seq, scope, trigger, from_state, to_state, detail, created_at, machine_version"
)
_PG_COLUMNS = """
    order_id UUID NOT NULL,
    seq INTEGER NOT NULL,
    scope VARCHAR(16) NOT NULL,
    trigger VARCHAR(40) NOT NULL,
    from_state VARCHAR(32) NOT NULL,
    to_state VARCHAR(32) NOT NULL,
    detail JSON,
    created_at TIMESTAMP WITH TIME ZONE NOT NULL,
    machine_version VARCHAR(12) NOT NULL"""


def _columns() -> list[sa.Column]:  # type: ignore[type-arg]
    return [
        sa.Column("order_id", sa.Uuid(), nullable=False),
        sa.Column("seq", sa.Integer(), nullable=False),
        sa.Column("scope", _STR(length=16), nullable=False),
        sa.Column("trigger", _STR(length=40), nullable=False),
        sa.Column("from_state", _STR(length=32), nullable=False),
        sa.Column("to_state", _STR(length=32), nullable=False),
        sa.Column("detail", sa.JSON(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("machine_version", _STR(length=12), nullable=False),
    ]


def upgrade() -> None:
    postgres = op.get_bind().dialect.name == "postgresql"
    op.rename_table("transitions", "transitions_old")
    op.drop_index("ix_transitions_created_at", table_name="transitions_old")  # names are global
    if postgres:
        op.drop_constraint("uq_transitions_order_seq", "transitions_old", type_="unique")
        op.execute(
            "CREATE TABLE transitions ("
            "id INTEGER NOT NULL DEFAULT nextval('transitions_id_seq'::regclass),"
            f"{_PG_COLUMNS}, order_created_at TIMESTAMP WITH TIME ZONE NOT NULL, "
            "CONSTRAINT pk_transitions PRIMARY KEY (id, order_created_at), "
            "CONSTRAINT uq_transitions_order_seq UNIQUE (order_id, seq, order_created_at)"
            ") PARTITION BY RANGE (order_created_at)"
        )
        op.execute("ALTER SEQUENCE transitions_id_seq OWNED BY transitions.id")  # kept
        oldest = op.get_bind().execute(sa.text("SELECT min(created_at) FROM orders")).scalar()
        first = (oldest or datetime.now(UTC)).astimezone(UTC).date()
        for statement in partitions.create_statements(have=set(), default=False, first=first):
            op.execute(statement)
    else:
        op.create_table(
            "transitions",
            sa.Column("id", sa.Integer(), nullable=False),
            *_columns(),
            sa.Column("order_created_at", sa.DateTime(timezone=True), nullable=False),
            sa.PrimaryKeyConstraint("id"),
            sa.UniqueConstraint(
                "order_id", "seq", "order_created_at", name="uq_transitions_order_seq"
            ),
        )
    op.create_index("ix_transitions_created_at", "transitions", ["created_at"], unique=False)
    op.execute(
        f"INSERT INTO transitions ({_COPIED}, order_created_at) "
        f"SELECT {', '.join('t.' + c for c in _COPIED.split(', '))}, o.created_at "
        "FROM transitions_old t JOIN orders o ON o.id = t.order_id"
    )
    op.drop_table("transitions_old")


def downgrade() -> None:
    postgres = op.get_bind().dialect.name == "postgresql"
    op.rename_table("transitions", "transitions_new")
    op.drop_index("ix_transitions_created_at", table_name="transitions_new")
    if postgres:
        op.drop_constraint("uq_transitions_order_seq", "transitions_new", type_="unique")
        op.execute(
            "CREATE TABLE transitions ("
            "id INTEGER NOT NULL DEFAULT nextval('transitions_id_seq'::regclass),"
            f"{_PG_COLUMNS}, PRIMARY KEY (id), "
            "CONSTRAINT uq_transitions_order_seq UNIQUE (order_id, seq), "
            "FOREIGN KEY (order_id) REFERENCES orders (id))"
        )
        op.execute("ALTER SEQUENCE transitions_id_seq OWNED BY transitions.id")
    else:
        op.create_table(
            "transitions",
            sa.Column("id", sa.Integer(), nullable=False),
            *_columns(),
            sa.ForeignKeyConstraint(["order_id"], ["orders.id"]),
            sa.PrimaryKeyConstraint("id"),
            sa.UniqueConstraint("order_id", "seq", name="uq_transitions_order_seq"),
        )
    op.create_index("ix_transitions_order_id", "transitions", ["order_id"], unique=False)
    op.create_index("ix_transitions_created_at", "transitions", ["created_at"], unique=False)
    op.execute(f"INSERT INTO transitions ({_COPIED}) SELECT {_COPIED} FROM transitions_new")
    op.drop_table("transitions_new")  # on PostgreSQL its partitions with it
