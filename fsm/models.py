"""The schema and the in-memory records of an order.

SQLModel defines the tables (`OrderTable`, `TransitionTable`; Alembic owns the schema). The
objects the engine passes around are plain slotted dataclasses (`Order`, `Transition`): the
executor writes ~70 attributes per order, and an instrumented table model made each write
pay SQLAlchemy's attribute bookkeeping. Definitions only; the statements live in `fsm.sql`
(writes, run by `fsm.store`) and `fsm.queries` (reads).
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field, fields, make_dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Column,
    DateTime,
    FunctionElement,
    Identity,
    Index,
    Integer,
    PrimaryKeyConstraint,
    String,
    UniqueConstraint,
    event,
    text,
)
from sqlalchemy.ext.compiler import compiles
from sqlmodel import Field, SQLModel

from fsm import partitions
from fsm.bounds import MAX_DELIVERY_CHARS
from fsm.machine import StepState
from fsm.registry import STEPS


def _utc() -> Any:
    return DateTime(timezone=True)


class OrderTable(SQLModel, table=True):
    __tablename__ = "orders"
    __table_args__ = (
        Index("ix_orders_status_updated", "status", "updated_at"),
        # The few orders whose driver died under them (revision 0013): what /metrics
        # counts as held at each scrape reads this, not the whole table.
        Index(
            "ix_orders_interrupted",
            "interruptions",
            postgresql_where=text("interruptions > 0"),
            sqlite_where=text("interruptions > 0"),
        ),
        # Idempotency keys are scoped per caller (issue 17): two clients may both send
        # "checkout-42" and get two orders.
        UniqueConstraint("created_by", "idempotency_key", name="uq_orders_created_by_key"),
    )

    id: uuid.UUID = Field(primary_key=True)
    idempotency_key: str | None = Field(default=None, max_length=200)
    user_id: int
    product_id: int
    quantity: int
    # cents: price x quantity, fixed at product lookup; 8 bytes (revision 0011)
    amount: int | None = Field(default=None, sa_type=BigInteger().with_variant(Integer(), "sqlite"))

    state: str = Field(max_length=32)  # the order machine's exact state
    status: str = Field(max_length=32)  # coarse status shown by the API
    payment_state: str = Field(max_length=32)
    inventory_state: str = Field(max_length=32)
    shipping_state: str = Field(max_length=32)

    shipping_address: str | None = None
    expected_delivery: str | None = Field(default=None, max_length=MAX_DELIVERY_CHARS)

    # Optimistic concurrency: every state write checks and bumps it; it is also the
    # sequence number of the transition that write records.
    version: int = 0
    lease_owner: str | None = Field(default=None, max_length=200)
    # With no owner: None, or when a stopping driver handed the order back (fsm.sql.HANDED_BACK).
    lease_expires_at: datetime | None = Field(default=None, sa_type=_utc())

    # Retry schedule, persisted so it survives a restart.
    attempts: dict[str, int] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))
    last_error: str | None = None
    next_attempt_at: datetime | None = Field(default=None, sa_type=_utc())
    deadline_at: datetime | None = Field(default=None, sa_type=_utc())  # forward steps
    attention_reason: str | None = None
    cancel_requested: bool = False

    created_at: datetime = Field(sa_type=_utc())
    updated_at: datetime = Field(sa_type=_utc())
    # The machine (fsm.machine.MACHINE_VERSION) the order was created under; a state
    # migration that rewrites its states rewrites this too (issue 10).
    machine_version: str = Field(default="", max_length=12)
    # Who placed it: the API key's name ("" for orders placed with no identity, i.e. on an
    # open laptop install or before issue 17). A `client` key sees only its own orders.
    created_by: str = Field(default="", max_length=64, index=True)
    # How many times in a row a claim took the order over from a driver whose lease ran
    # out (its process died mid-run); a transition written by a driver, or a person's
    # action, sets it back to 0. At ORDER_SAGA_MAX_INTERRUPTIONS the sweep holds the order
    # for an operator (revision 0013; the default lets an older release insert rows).
    interruptions: int = Field(default=0, sa_column_kwargs={"server_default": "0"})


class TransitionTable(SQLModel, table=True):
    """The append-only log. Each row carries its order's creation time (`order_created_at`)
    so that PostgreSQL can partition the log by it (`fsm.partitions`: one order's rows in
    one day's partition) and retention drops a whole day at once; (order_id, seq,
    order_created_at) is unique exactly when (order_id, seq) is. `id` numbers the rows in
    insertion order, never reused (the heatmap roll-up's cursor): SQLite's rowid with
    AUTOINCREMENT (revision 0010); on PostgreSQL a sequence, the key being (id,
    order_created_at) since a partitioned table's key must hold the partition key
    (`_transitions_key`). No foreign key to `orders`: the log and
    its order are written and deleted in one transaction, and a key would make dropping a
    partition look for each deleted order's log in every other partition under the table
    lock (README, "Keeping the database small")."""

    __tablename__ = "transitions"
    __table_args__ = (
        UniqueConstraint("order_id", "seq", "order_created_at", name="uq_transitions_order_seq"),
        # SQLite: AUTOINCREMENT, so an id is never handed out twice (the roll-up's cursor
        # would pass new rows that took the ids of deleted newest ones); PostgreSQL's
        # sequence never goes back.
        {"postgresql_partition_by": "RANGE (order_created_at)", "sqlite_autoincrement": True},
    )

    id: int | None = Field(default=None, primary_key=True)
    order_id: uuid.UUID
    seq: int
    scope: str = Field(max_length=16)  # "order" or the step: payment, inventory, shipping
    trigger: str = Field(max_length=40)
    from_state: str = Field(max_length=32)
    to_state: str = Field(max_length=32)
    detail: dict[str, Any] | None = Field(default=None, sa_column=Column(JSON))
    # Indexed for the heatmap's windows (the part of an hour the roll-up cannot split).
    created_at: datetime = Field(sa_type=_utc(), index=True)
    machine_version: str = Field(default="", max_length=12)  # the machine that made the move
    order_created_at: datetime = Field(sa_type=_utc())  # = its order's created_at


@compiles(PrimaryKeyConstraint, "postgresql")
def _transitions_key(constraint: PrimaryKeyConstraint, compiler: Any, **kw: Any) -> str:
    """PostgreSQL: the partitioned log's key holds the partition key, (id,
    order_created_at); every other table's (the log's before revision 0007 too) is as
    declared."""
    table = constraint.table
    if table is not None and table.name == "transitions" and "order_created_at" in table.c:
        return "CONSTRAINT pk_transitions PRIMARY KEY (id, order_created_at)"
    return str(compiler.visit_primary_key_constraint(constraint, **kw))


@event.listens_for(TransitionTable.__table__, "after_create")  # type: ignore[attr-defined]
def _first_partitions(target: Any, connection: Any, **kw: Any) -> None:
    """`metadata.create_all` on PostgreSQL (tests): the default partition and this week's
    (the migration does the same for a database it converts)."""
    if connection.dialect.name == "postgresql":
        for statement in partitions.create_statements(have=set(), default=False):
            connection.execute(text(statement))


# A step plugged in at start-up (fsm.registry, ORDER_SAGA_STEP_MODULES) has no field above:
# its state column is added to the table here (its migration adds it to the database).
_orders = OrderTable.__table__  # type: ignore[attr-defined]
for _row in STEPS:
    if _row.column not in _orders.c:
        _orders.append_column(
            Column(_row.column, String(32), nullable=False, server_default=StepState.PENDING.value)
        )


class AttemptTable(SQLModel, table=True):
    """A downstream call that did not succeed (its error, when the next try is due), or
    that waits for an open circuit breaker: why an order stands still, shown in its
    timeline. Written only when a call fails or waits, never on the happy path; not a
    transition (the machines know nothing of it). No foreign key: a log beside the orders."""

    __tablename__ = "attempts"

    id: int | None = Field(default=None, primary_key=True)
    order_id: uuid.UUID = Field(index=True)
    created_at: datetime = Field(sa_type=_utc())
    call: str = Field(max_length=40)  # "<step>:<action>", e.g. "payment:refund"
    attempt: int  # the call's failed attempts so far (persisted on the order too)
    error: str | None = None
    next_attempt_at: datetime | None = Field(default=None, sa_type=_utc())  # or the probe
    waiting_on: str | None = Field(default=None, max_length=40)  # an operation's open breaker


class HeatTotalTable(SQLModel, table=True):
    """The heatmap's roll-up of the whole log (`fsm.rollup`): per edge and per bucket of
    the stay that edge ended (time spent in its `from_state`; `fsm.queries.NO_STAY`: none,
    the scope's first move), how many transitions. Written by `fsm.rollup.roll` only,
    never by the engine."""

    __tablename__ = "heat_totals"

    scope: str = Field(primary_key=True, max_length=16)
    trigger: str = Field(primary_key=True, max_length=40)
    from_state: str = Field(primary_key=True, max_length=32)
    to_state: str = Field(primary_key=True, max_length=32)
    bucket: int = Field(primary_key=True)
    n: int


class HeatHourTable(SQLModel, table=True):
    """`heat_totals` per hour of the transitions' time, for the last hour and day windows
    (hours older than `fsm.rollup.KEEP_HOURS` are deleted by the roll)."""

    __tablename__ = "heat_hours"

    hour: datetime = Field(primary_key=True, sa_type=_utc())
    scope: str = Field(primary_key=True, max_length=16)
    trigger: str = Field(primary_key=True, max_length=40)
    from_state: str = Field(primary_key=True, max_length=32)
    to_state: str = Field(primary_key=True, max_length=32)
    bucket: int = Field(primary_key=True)
    n: int


class HeatCursorTable(SQLModel, table=True):
    """One row: every transition with `id <= rolled_id` is in the roll-up, none above."""

    __tablename__ = "heat_cursor"

    id: int = Field(primary_key=True)
    rolled_id: int = Field(sa_type=BigInteger())


# Which column holds a scope's state: the one place that knows ("order" or a step name).
STATE_COLUMN: dict[str, str] = {"order": "state", **{row.name: row.column for row in STEPS}}
ORDER_COLUMNS: tuple[str, ...] = tuple(column.name for column in _orders.columns)


@dataclass(slots=True)
class Order:
    """One order as the engine sees it: a row of `orders`, plus the writes it has queued."""

    id: uuid.UUID
    user_id: int
    product_id: int
    quantity: int
    state: str
    status: str
    created_at: datetime
    updated_at: datetime
    payment_state: str = StepState.PENDING.value
    inventory_state: str = StepState.PENDING.value
    shipping_state: str = StepState.PENDING.value
    idempotency_key: str | None = None
    amount: int | None = None
    shipping_address: str | None = None
    expected_delivery: str | None = None
    version: int = 0
    lease_owner: str | None = None
    lease_expires_at: datetime | None = None
    attempts: dict[str, int] = field(default_factory=dict)
    last_error: str | None = None
    next_attempt_at: datetime | None = None
    deadline_at: datetime | None = None
    attention_reason: str | None = None
    cancel_requested: bool = False
    machine_version: str = ""
    created_by: str = ""
    interruptions: int = 0

    def state_of(self, scope: str) -> str:
        """The state of the order ("order") or of one of its steps."""
        value: str = getattr(self, STATE_COLUMN[scope])
        return value

    def step_states(self) -> dict[str, str]:
        return {row.name: getattr(self, row.column) for row in STEPS}

    def leased_at(self, now: datetime) -> bool:
        """Does a driver hold the order's lease at `now`? The claim's rule (fsm.sql): taken
        again only once it expired before `now`."""
        expires = self.lease_expires_at
        return self.lease_owner is not None and expires is not None and expires >= now

    def held(self, limit: int) -> bool:
        """Has its driver died under it `limit` times in a row (ORDER_SAGA_MAX_
        INTERRUPTIONS; 0: never held)? Then no automatic run drives it: the sweep's claim
        leaves it (fsm.sql.claim_batch) and a run that took it over anyway, the claim that
        counted the last interruption, gives it back undriven (Executor._audited, which
        says so through fsm.attempts.hold); a person's run drives it. `order-saga resume`
        leaves it too unless --include-held (HELD_HINT)."""
        return 0 < limit <= self.interruptions


# What a person does about a held order (`order-saga resume`'s lines and notes).
HELD_HINT = "find why its driver died, then `resume --order ID`, or all with --include-held"


def _with_plugged_in_steps(base: type[Order]) -> type[Order]:
    """`Order` plus a field per plugged-in step's column (pending by default)."""
    known = {f.name for f in fields(base)}
    extra = [row.column for row in STEPS if row.column not in known]
    if not extra:
        return base
    columns = [(c, str, field(default=StepState.PENDING.value)) for c in extra]
    return make_dataclass("Order", columns, bases=(base,), slots=True)


if not TYPE_CHECKING:  # the type checker knows the declared fields only
    Order = _with_plugged_in_steps(Order)


@dataclass(slots=True, frozen=True)
class Transition:
    """One line of the append-only transition log."""

    order_id: uuid.UUID
    seq: int
    scope: str
    trigger: str
    from_state: str
    to_state: str
    created_at: datetime
    detail: dict[str, Any] | None = None
    id: int | None = None
    machine_version: str = ""
    order_created_at: datetime | None = None  # its order's (the partition key)


class ApiKeyTable(SQLModel, table=True):
    """One client key (issue 17): a name, a role and a keyed hash of its secret, never the
    secret itself. Revoked keys stay (names are not reused; the audit trail names them)."""

    __tablename__ = "api_keys"

    id: int | None = Field(default=None, primary_key=True)
    name: str = Field(max_length=64, unique=True)
    role: str = Field(max_length=16)
    key_hash: str = Field(max_length=64, unique=True)  # hex HMAC-SHA256(pepper, secret)
    created_at: datetime = Field(sa_type=_utc())
    last_used_at: datetime | None = Field(default=None, sa_type=_utc())
    revoked_at: datetime | None = Field(default=None, sa_type=_utc())


class ServerSecretTable(SQLModel, table=True):
    """Random secrets of this deployment, made once and shared through the database by
    every `serve`/`worker` process: the key pepper, the console's cookie signing key."""

    __tablename__ = "server_secrets"

    name: str = Field(primary_key=True, max_length=32)
    value: str = Field(max_length=128)  # hex


class EndedSessionTable(SQLModel, table=True):
    """A console session signed out before its cookie expired (fsm.sessions): its id,
    kept until `ends_at`, when the cookie would have expired anyway."""

    __tablename__ = "ended_sessions"

    sid: str = Field(primary_key=True, max_length=43)
    ends_at: datetime = Field(sa_type=_utc(), index=True)


# -- order events: the transactional outbox (fsm.outbox) ----------------------------------


class EventDestinationTable(SQLModel, table=True):
    """Where events go: a webhook (URL + signing secret) or the RabbitMQ exchange."""

    __tablename__ = "event_destinations"

    id: int | None = Field(default=None, primary_key=True)
    name: str = Field(max_length=200, unique=True)
    kind: str = Field(max_length=16)  # "webhook" or "amqp"
    url: str = Field(max_length=2000)  # amqp: shown with its userinfo masked (***@)
    secret: str | None = Field(default=None, max_length=200)  # webhooks: whsec_..., one
    # A rotation's overlap: the secret it replaced, signing beside `secret` until
    # `previous_until`. Columns of their own, never in `secret`: a relay of an earlier
    # release reads `secret` as one secret and signs with it.
    previous_secret: str | None = Field(default=None, max_length=200)
    previous_until: datetime | None = Field(default=None, sa_type=_utc())
    # Whose overlap the two are: a fingerprint of the `secret` the rotation wrote with them
    # (`fsm.destinations.webhook.fingerprint`). A release before these columns rotates by
    # `secret` alone; its new secret does not match, so the columns no longer sign.
    previous_for: str | None = Field(default=None, max_length=64)
    events: str = Field(max_length=1000)  # ",order.created,order.completed," (matched by LIKE)
    created_at: datetime = Field(sa_type=_utc())


class _CurrentTxid(FunctionElement):  # type: ignore[type-arg]
    """The writing transaction's id on PostgreSQL (64 bits: never wraps); 0 on SQLite,
    where positions alone are in commit order."""

    inherit_cache = True


@compiles(_CurrentTxid)
def _current_txid_pg(element: Any, compiler: Any, **kw: Any) -> str:
    return "(pg_current_xact_id()::text::bigint)"


@compiles(_CurrentTxid, "sqlite")
def _current_txid_sqlite(element: Any, compiler: Any, **kw: Any) -> str:
    return "0"


# Ordered by (txid, position) on PostgreSQL only: on SQLite txid is 0 and position is the
# rowid (one index fewer in the engine's commit): partitions.OUTBOX_STREAM_INDEX.


class OutboxEventTable(SQLModel, table=True):
    """One event per order status change, written in the commit of its transition; each
    destination's relay follows it by (txid, position) (fsm.outbox_sql)."""

    __tablename__ = "outbox_events"
    __table_args__ = (
        Index(partitions.OUTBOX_STREAM_INDEX, "txid", "position").ddl_if(dialect="postgresql"),
        {"sqlite_autoincrement": True},
    )

    # In commit order on SQLite (AUTOINCREMENT: never reused); a sequence on PostgreSQL.
    position: int | None = Field(
        default=None,
        sa_column=Column(
            BigInteger().with_variant(Integer(), "sqlite"),
            Identity(always=True),
            primary_key=True,
        ),
    )
    id: str = Field(max_length=80, unique=True)  # "<order_id>:<seq>"
    order_id: uuid.UUID = Field(index=True)
    seq: int
    type: str = Field(max_length=40)
    created_at: datetime = Field(sa_type=_utc())
    body: str  # the CloudEvent, as sent
    txid: int = Field(
        default=None,
        sa_column=Column(BigInteger(), nullable=False, server_default=_CurrentTxid()),
    )


class OutboxCursorTable(SQLModel, table=True):
    """Where each destination's relay is in the event stream: every event at or before
    (txid, position) was delivered, set aside as an exception row, or not subscribed to.
    One relay at a time holds it (its lease)."""

    __tablename__ = "outbox_cursors"

    destination_id: int = Field(primary_key=True, sa_column_kwargs={"autoincrement": False})
    txid: int = Field(sa_type=BigInteger())
    position: int = Field(sa_type=BigInteger())
    lease_owner: str | None = Field(default=None, max_length=200)
    lease_until: datetime | None = Field(default=None, sa_type=_utc())


class OutboxDeliveryTable(SQLModel, table=True):
    """The exceptions of the stream: one row per (destination, event) whose delivery failed
    once (retried by state, or dead), or that is held behind such a one of its order."""

    __tablename__ = "outbox_deliveries"
    __table_args__ = (
        Index("ix_outbox_deliveries_due", "destination_id", "state", "next_attempt_at"),
        Index("ix_outbox_deliveries_order", "destination_id", "order_id", "seq"),
    )

    destination_id: int = Field(primary_key=True)
    event_id: str = Field(primary_key=True, max_length=80)
    order_id: uuid.UUID
    seq: int
    state: str = Field(max_length=16)  # pending | delivered | dead
    attempts: int = 0
    next_attempt_at: datetime = Field(sa_type=_utc())
    lease_owner: str | None = Field(default=None, max_length=200)
    lease_until: datetime | None = Field(default=None, sa_type=_utc())
    last_error: str | None = None
    created_at: datetime = Field(sa_type=_utc())  # the event's time: the lag
    retry_from: datetime = Field(sa_type=_utc())  # the age limit counts from here
    delivered_at: datetime | None = Field(default=None, sa_type=_utc())
