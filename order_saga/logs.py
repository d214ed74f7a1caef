"""Logging for `serve`, `worker` and `resume`: one handler on the root logger, text or JSON
(ORDER_SAGA_LOG_FORMAT=json, via python-json-logger), every line carrying the request id
of the API request it belongs to (asgi-correlation-id) and, for saga events, `order_id`,
`state` and `trigger`. httpx's line per request is off (it would log every downstream call);
database URLs are printed only through `masked`.
"""

from __future__ import annotations

import logging
import sys
from typing import Literal

from asgi_correlation_id import CorrelationIdFilter
from pythonjsonlogger.json import JsonFormatter

LogFormat = Literal["text", "json"]
_TEXT = "%(asctime)s %(levelname)s %(name)s [%(correlation_id)s] %(message)s"
_JSON_FIELDS = ["asctime", "levelname", "name", "correlation_id", "message"]
# Chatty libraries: their INFO lines are noise for an operator (httpx logs every request,
# transitions every event; ours says the same once, with the order id).
_QUIET = ("httpx", "httpcore", "transitions")


def configure(fmt: LogFormat = "text", level: int = logging.INFO) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(CorrelationIdFilter(default_value="-"))
    if fmt == "json":
        handler.setFormatter(JsonFormatter(_JSON_FIELDS, rename_fields={"levelname": "level"}))
    else:
        handler.setFormatter(logging.Formatter(_TEXT))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    for name in _QUIET:
        logging.getLogger(name).setLevel(logging.WARNING)
    # uvicorn's loggers propagate to ours (serve passes log_config=None).
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logging.getLogger(name).handlers.clear()
        logging.getLogger(name).propagate = True
