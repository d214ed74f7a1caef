"""The roles a client key, a console user or the bootstrap token can hold (issue 17).

Apart from `fsm.keys` so that `order-saga --help` (whose `keys create --role` lists them)
does not load the database layer.
"""

from __future__ import annotations

from enum import StrEnum


class Role(StrEnum):
    """Roles, least to most: a client places and reads its own orders; a reader reads
    everything; an operator also acts on orders; an admin also manages keys and faults."""

    CLIENT = "client"
    READER = "reader"
    OPERATOR = "operator"
    ADMIN = "admin"
