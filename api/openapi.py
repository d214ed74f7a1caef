"""The OpenAPI document says what the edge does: problem+json errors, who may call what.

FastAPI documents each route's own answers; the answers the middleware and the shared
error mapping give to every route (401, 403, 404 for another client's order, 413, 422,
415, 503) are added here, from the same constants and the same route x role table they use,
so the document cannot drift from `api/auth.py`, `api/access.py`, `api/guard.py` and
`api/problems.py`. The security schemes are always described: authentication turns on
at run time, once ORDER_SAGA_API_TOKEN is set, single sign-on is configured or the first
key is created.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from api.access import OWN, OWN_ACT, ROUTES, Access, roles_of
from api.auth import BEARER
from api.guard import JSON_METHODS
from api.problems import MEDIA_TYPE, RETRY_AFTER, Problem

PROBLEM_REF = {"$ref": "#/components/schemas/Problem"}
ERROR_SCHEMAS = ("HTTPValidationError", "ValidationError")
EVERYWHERE = {503: "the database is unavailable; see Retry-After"}
WITH_BODY = {
    413: "the body is larger than ORDER_SAGA_MAX_BODY_BYTES",
    415: "a body not declared `Content-Type: application/json` (unsupported_media_type; "
    "the console's forms under /ui/ excepted), or declared in another charset than UTF-8 "
    "(unsupported_charset)",
    422: "invalid input: not strict JSON (NaN, duplicate keys, lone surrogates) or not the schema",
}
SESSION = {
    "type": "apiKey",
    "in": "cookie",
    "name": "order_saga_session",
    "description": "The console's session (sign in at /ui/login; named "
    "__Host-order_saga_session on https); a request other than GET also needs its "
    "X-CSRF-Token header",
}


def _secured(access: Access) -> dict[int, str]:
    roles = ", ".join(r.value for r in roles_of(access))
    answers = {
        401: "no credentials, a wrong or revoked key (once authentication is on)",
        403: f"the caller's role may not call this; allowed: {roles}",
    }
    if access in (OWN, OWN_ACT):
        answers[404] = "no such order, or (for a client key) an order another key created"
    return answers


RETRY_AFTER_HEADER = {
    "description": f"seconds (the database: {RETRY_AFTER} or less; a circuit breaker: until "
    "its probe)",
    "schema": {"type": "integer"},
}


def _problem(description: str, status: int) -> dict[str, Any]:
    answer: dict[str, Any] = {"description": description}
    _as_problem(answer, status)
    return answer


def _as_problem(answer: dict[str, Any], status: int) -> None:
    """An error answer is problem+json: one FastAPI documents as application/json with an
    error schema, or with no content at all (a route's own `responses` entry, which wins
    over the edge's); a 503 carries Retry-After. A route's own body (the rejected order of
    `POST /orders`' 404) stays as it is."""
    content = answer.setdefault("content", {})
    schema = content.get("application/json", {}).get("schema", {})
    ref = str(schema.get("$ref", ""))
    if ref.endswith(("/Problem", *(f"/{name}" for name in ERROR_SCHEMAS))):
        del content["application/json"]
    if not content:
        content[MEDIA_TYPE] = {"schema": PROBLEM_REF}
    if status == 503:
        answer.setdefault("headers", {}).setdefault("Retry-After", RETRY_AFTER_HEADER)


def build(app: FastAPI) -> dict[str, Any]:
    schema = get_openapi(
        title=app.title,
        version=app.version,
        description=app.description,
        routes=app.routes,
    )
    components = schema.setdefault("components", {})
    schemas = components.setdefault("schemas", {})
    schemas.update(Problem.model_json_schema(ref_template="#/components/schemas/{model}")["$defs"])
    schemas["Problem"] = Problem.model_json_schema(ref_template="#/components/schemas/{model}")
    schemas["Problem"].pop("$defs", None)
    components["securitySchemes"] = {
        "bearer": BEARER.model.model_dump(mode="json", by_alias=True, exclude_none=True),
        "session": SESSION,
    }
    for path, operations in schema.get("paths", {}).items():
        for method, operation in operations.items():
            responses = operation.setdefault("responses", {})
            for code, answer in responses.items():
                if code.isdigit() and int(code) >= 400:
                    _as_problem(answer, int(code))
            extra = dict(EVERYWHERE)
            if method.upper() in JSON_METHODS:
                extra |= WITH_BODY
            access = ROUTES.get((method.upper(), path))
            if access is None or not access.public:
                extra |= _secured(access) if access else {401: "no credentials", 403: "admin"}
                operation["security"] = [{"bearer": []}, {"session": []}]
            for status, description in extra.items():
                responses.setdefault(str(status), _problem(description, status))
    for name in ERROR_SCHEMAS:  # replaced by Problem everywhere
        schemas.pop(name, None)
    return schema


def install(app: FastAPI) -> None:
    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = build(app)
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
