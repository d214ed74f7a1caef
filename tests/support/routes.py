"""Every endpoint of an app, walked from its router table (included routers and mounted
apps): (method, path template) pairs, and a concrete path for each. Used by the route x
role matrix, so a route added later is in the matrix without anyone listing it."""

from __future__ import annotations

import re
from collections.abc import Iterator

from fastapi.routing import iter_route_contexts
from starlette.routing import BaseRoute, Mount

PARAM = re.compile(r"{([^}:]+)(?::[^}]+)?}")


def endpoints(routes: list[BaseRoute], prefix: str = "") -> Iterator[tuple[str, str]]:
    """(method, template) of every endpoint; a mounted app without routes of its own (a
    static directory) as (GET, its prefix + "/{file}")."""
    for route in iter_route_contexts(routes):
        original = route.original_route
        if isinstance(original, Mount):
            inner = list(original.routes)
            if inner:
                yield from endpoints(inner, prefix + str(route.path))
            else:
                yield "GET", prefix + str(route.path) + "/{file}"
            continue
        for method in sorted(route.methods or {"GET"}):
            if method != "HEAD":
                yield method, prefix + str(route.path)


def concrete(template: str, values: dict[str, str]) -> str:
    """The template with each parameter replaced by `values[name]` (else "1")."""
    return PARAM.sub(lambda m: values.get(m.group(1), "1"), template)
