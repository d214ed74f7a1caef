"""/redoc with nothing fetched from outside: fastapi-offline ships ReDoc's script, but that
script draws its "API docs by Redocly" logo from cdn.redoc.ly; this serves the same script
with the logo pointed at the favicon shipped beside it. No routes of the API itself.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path

import fastapi_offline
from fastapi import APIRouter
from fastapi.openapi.docs import get_redoc_html
from fastapi.responses import HTMLResponse, Response

STATIC = Path(fastapi_offline.__file__).parent / "static"
OUTSIDE_LOGO = "https://cdn.redoc.ly/redoc/logo-mini.svg"
LOCAL_LOGO = "/static-offline-docs/favicon.png"  # fastapi-offline's mount
SCRIPT = "/redoc/redoc.standalone.js"

router = APIRouter(include_in_schema=False)


@cache
def _script() -> bytes:
    return (
        (STATIC / "redoc.standalone.js")
        .read_bytes()
        .replace(OUTSIDE_LOGO.encode(), LOCAL_LOGO.encode())
    )


@router.get("/redoc")
def redoc_page() -> HTMLResponse:
    return get_redoc_html(
        openapi_url="/openapi.json",
        title="order-saga - ReDoc",
        redoc_js_url=SCRIPT,
        redoc_favicon_url=LOCAL_LOGO,
        with_google_fonts=False,
    )


@router.get(SCRIPT)
def redoc_script() -> Response:
    return Response(
        _script(),
        media_type="application/javascript",
        headers={"Cache-Control": "public, max-age=86400"},
    )
