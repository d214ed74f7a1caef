"""FastAPI dependencies as Annotated aliases: the store, the executor, the settings.

Authentication is not a dependency: `api.guard.TokenGate` enforces it for every path.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

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


StoreDep = Annotated[Store, Depends(get_store)]
ExecutorDep = Annotated[Executor, Depends(get_executor)]
SettingsDep = Annotated[Settings, Depends(get_app_settings)]
