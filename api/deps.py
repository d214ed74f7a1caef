"""FastAPI dependencies as Annotated aliases: the store, the executor, the settings, the
caller.

Authentication is not a dependency: `api.auth.AuthGate` enforces it for every path and
leaves the caller on the scope; `PrincipalDep` reads it, `visible` hides another
client's order behind a 404.

Each is `async def` although it awaits nothing: FastAPI runs a plain `def` dependency in
its thread pool, a thread hop per dependency per request (four on `POST /orders`).
"""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from api.auth import principal_of
from fsm.errors import OrderNotFound
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


def visible(order: Order, principal: Principal) -> Order:
    """The order, unless the caller is a client key that did not place it: then the same
    404 as an order that does not exist (no existence oracle)."""
    if principal.sees_only_own and order.created_by != principal.creator:
        raise OrderNotFound(f"order {order.id} not found")
    return order


StoreDep = Annotated[Store, Depends(get_store)]
ExecutorDep = Annotated[Executor, Depends(get_executor)]
SettingsDep = Annotated[Settings, Depends(get_app_settings)]
PrincipalDep = Annotated[Principal, Depends(get_principal)]
