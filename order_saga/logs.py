"""Logging for `serve`, `worker` and `resume`: one handler on the root logger, text or JSON
(ORDER_SAGA_LOG_FORMAT=json, via python-json-logger), every line carrying the request id
of the API request it belongs to (asgi-correlation-id) and, for saga events, `order_id`,
`state` and `trigger`. httpx's line per request is off (it would log every downstream call);
database URLs are printed only through `masked`.

Lines are formatted and written by a `QueueListener` thread, not by the code that logs:
the event loop only puts the record on a queue (its request id taken there, while the
request's context is current). Records are passed as they are, their message formatted
later by the listener (our arguments are ids and strings). `flush()` (also at exit) waits
until every queued line is written. This module does not decide what is logged.
"""

from __future__ import annotations

import atexit
import logging
import logging.handlers
import queue
import sys
import time
from typing import IO, Literal

from asgi_correlation_id import CorrelationIdFilter
from pythonjsonlogger.json import JsonFormatter

LogFormat = Literal["text", "json"]
# Timestamps are UTC ISO 8601 in both formats (SPEC §4), e.g. 2026-11-30T10:19:06.919Z.
_TEXT = "%(asctime)s.%(msecs)03dZ %(levelname)s %(name)s [%(correlation_id)s] %(message)s"
_DATES = "%Y-%m-%dT%H:%M:%S"
_JSON_FIELDS = ["timestamp", "levelname", "name", "correlation_id", "message"]


class _Plain(logging.Filter):
    """Drop uvicorn's `color_message` (the same text with ANSI colour codes) from records:
    as a JSON field it would put escape codes into every access line."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.__dict__.pop("color_message", None)
        return True


# Chatty libraries: their INFO lines are noise for an operator (httpx logs every request,
# transitions every event; ours says the same once, with the order id).
_QUIET = ("httpx", "httpcore", "transitions")


class _Enqueue(logging.handlers.QueueHandler):
    """Puts the record on the queue as it is: no formatting on the logging thread (the
    stdlib's `prepare` formats the message and copies the record, for pickling, which an
    in-process queue does not need). A traceback is rendered now, while its frames hold."""

    def prepare(self, record: logging.LogRecord) -> logging.LogRecord:
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
            record.exc_info = None
        return record


_listener: logging.handlers.QueueListener | None = None


def flush() -> None:
    """Write every queued line and stop the writer thread (logging goes on synchronously
    through nothing until `configure` is called again)."""
    global _listener
    if _listener is not None:
        _listener.stop()
        _listener = None


atexit.register(flush)


def configure(
    fmt: LogFormat = "text", level: int = logging.INFO, *, stream: IO[str] | None = None
) -> None:
    """Root logger -> queue -> one writer thread -> `stream` (default stderr)."""
    global _listener
    flush()
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    handler.addFilter(_Plain())
    if fmt == "json":  # "timestamp": ISO 8601 in UTC (python-json-logger's timestamp=True)
        handler.setFormatter(
            JsonFormatter(_JSON_FIELDS, rename_fields={"levelname": "level"}, timestamp=True)
        )
    else:
        text = logging.Formatter(_TEXT, datefmt=_DATES)
        text.converter = time.gmtime
        handler.setFormatter(text)
    # No line names the caller's file, line, thread or process: every record skips finding
    # them (the logging HOWTO's "Optimization"; ~10 records per order on serve's loop).
    logging._srcfile = None
    logging.logThreads = logging.logProcesses = logging.logMultiprocessing = False
    records: queue.SimpleQueue[logging.LogRecord] = queue.SimpleQueue()
    enqueue = _Enqueue(records)
    enqueue.addFilter(CorrelationIdFilter(default_value="-"))  # on the logging side
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(enqueue)
    _listener = logging.handlers.QueueListener(records, handler, respect_handler_level=True)
    _listener.start()
    root.setLevel(level)
    for name in _QUIET:
        logging.getLogger(name).setLevel(logging.WARNING)
    # uvicorn's loggers propagate to ours (serve passes log_config=None).
    # Their level too: an earlier uvicorn.Config in this process (log_level=...) set it.
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logging.getLogger(name).handlers.clear()
        logging.getLogger(name).propagate = True
        logging.getLogger(name).setLevel(logging.NOTSET)
