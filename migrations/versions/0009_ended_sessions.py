"""ended console sessions: signing out ends the session on the server

A console cookie carries a random session id; `ended_sessions` holds the ids of the
sessions signed out before their cookie expired, each until `ends_at` (then it is
dropped: the cookie opens nothing by then anyway). Cookies issued before this revision
have no id and are refused: people sign in again once.

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-01 14:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
import sqlmodel
from alembic import op

revision: str = "0009"
down_revision: str | None = "0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "ended_sessions",
        sa.Column("sid", sqlmodel.sql.sqltypes.AutoString(length=43), nullable=False),
        sa.Column("ends_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("sid"),
    )
    op.create_index("ix_ended_sessions_ends_at", "ended_sessions", ["ends_at"], unique=False)


def downgrade() -> None:
    op.drop_index("ix_ended_sessions_ends_at", table_name="ended_sessions")
    op.drop_table("ended_sessions")
