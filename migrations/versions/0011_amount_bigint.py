"""orders.amount: BIGINT on PostgreSQL

The amount (cents: price x quantity) was a 4-byte INTEGER on PostgreSQL: a $3,000 product
x 10,000 units (3,000,000,000 cents) could not be written (NumericValueOutOfRange) and the
order stood in product_requested for good. Now 8 bytes, as SQLite's INTEGER always was;
an amount beyond that is refused at the product lookup (invalid_product). PostgreSQL
rewrites the table (an ACCESS EXCLUSIVE lock while it does); SQLite: nothing to do.

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-01 16:10:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0011"
down_revision: str | None = "0010"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def _amount(to: sa.types.TypeEngine[int], was: sa.types.TypeEngine[int]) -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.alter_column("orders", "amount", type_=to, existing_type=was, existing_nullable=True)


def upgrade() -> None:
    _amount(sa.BigInteger(), sa.Integer())


def downgrade() -> None:  # fails if an amount no longer fits 4 bytes: nothing is cut
    _amount(sa.Integer(), sa.BigInteger())
