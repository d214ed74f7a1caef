"""FastAPI dependencies as Annotated aliases: the store, the executor, the settings, the
caller.

Authentication is not a dependency: `api.auth.AuthGate` enforces it for every path and
leaves the caller on the scope; `PrincipalDep` reads it, `visible` hides another
client's order behind a 404 (a corrupt one too).

Each is `async def` although it awaits nothing: FastAPI runs a plain `def` dependency in
its thread pool, a thread hop per dependency per request (four on `POST /orders`).
"""

from __future__ import annotations

import uuid
from typing import Annotated

from fastapi import Depends, Request

from api.auth import principal_of
from fsm.errors import CorruptOrder, OrderNotFound
from fsm.executor import Executor
from fsm.keys import Principal
from fsm.models import Order
from fsm.settings import Settings
from fsm.store import Store


async def get_store(request: Request) -> Store:
    store: Store = request.app.state.store
    return store


async def get_executor(request: Request) -> Executor:
    executor: Executor = request.app.state.executor
    return executor


async def get_app_settings(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


async def get_principal(request: Request) -> Principal:
    return principal_of(request.scope)


def visible(store: Store, order_id: uuid.UUID, principal: Principal) -> Order:
    """The order, unless the caller is a client key that did not place it: then the same
    404 as an order that does not exist (no existence oracle). A row that cannot be
    decoded raises CorruptOrder only to a caller who may see it: its owner is checked on
    the stored `created_by` first, so another client gets the same 404 for it as for a
    healthy order (the extra read is paid on a corrupt row only)."""
    try:
        order = store.get(order_id)
    except CorruptOrder:
        may_see(store, order_id, principal)
        raise
    if principal.sees_only_own and order.created_by != principal.creator:
        raise OrderNotFound(f"order {order_id} not found")
    return order


def may_see(store: Store, order_id: uuid.UUID, principal: Principal) -> None:
    """OrderNotFound unless the order exists and the caller may see it, from its stored
    `created_by` alone: for a row that cannot be decoded (its log is still served)."""
    creator = store.created_by(order_id)
    if principal.sees_only_own and creator != principal.creator:
        raise OrderNotFound(f"order {order_id} not found")


StoreDep = Annotated[Store, Depends(get_store)]
ExecutorDep = Annotated[Executor, Depends(get_executor)]
SettingsDep = Annotated[Settings, Depends(get_app_settings)]
PrincipalDep = Annotated[Principal, Depends(get_principal)]
