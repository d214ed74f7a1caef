"""FastAPI dependencies as Annotated aliases: the store, the executor, the auth check."""

from __future__ import annotations

import secrets
from typing import Annotated

from fastapi import Depends, Header, HTTPException, Request, status

from fsm.executor import Executor
from fsm.settings import Settings
from fsm.store import Store


def get_store(request: Request) -> Store:
    store: Store = request.app.state.store
    return store


def get_executor(request: Request) -> Executor:
    executor: Executor = request.app.state.executor
    return executor


def get_app_settings(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


def require_token(request: Request, authorization: Annotated[str | None, Header()] = None) -> None:
    """When ORDER_SAGA_API_TOKEN is set, mutating endpoints need `Bearer <token>`."""
    token = request.app.state.settings.api_token
    if not token:
        return
    scheme, _, given = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not secrets.compare_digest(given, token):
        raise HTTPException(
            status.HTTP_401_UNAUTHORIZED,
            detail="missing or wrong bearer token",
            headers={"WWW-Authenticate": "Bearer"},
        )


StoreDep = Annotated[Store, Depends(get_store)]
ExecutorDep = Annotated[Executor, Depends(get_executor)]
SettingsDep = Annotated[Settings, Depends(get_app_settings)]
Authorized = Depends(require_token)
