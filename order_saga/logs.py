"""Logging for `serve`, `worker` and `resume`: one handler on the root logger, text or JSON
(ORDER_SAGA_LOG_FORMAT=json, via python-json-logger), every line carrying the request id
of the API request it belongs to (asgi-correlation-id) and, for saga events, `order_id`,
`state` and `trigger`. httpx's line per request is off (it would log every downstream call);
database URLs are printed only through `fsm.text.masked`, and the access log carries no secret
(`redact_query`: OpenID Connect's `code` and `state`, a token, a key, by the parameter's
name; `redact_secrets`: a key or a signing secret by its shape, wherever it stands).

Lines are formatted and written by a `QueueListener` thread, not by the code that logs:
the event loop only puts the record on a queue (its request id taken there, while the
request's context is current). Records are passed as they are, their message formatted
later by the listener (our arguments are ids and strings). The listener writes what has
queued up meanwhile in one write (`_Lines`): ~10 lines per order, one system call each
before. `flush()` (also at exit) waits until every queued line is written. This module
does not decide what is logged.
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

from order_saga.redact import redact_query, redact_secrets

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


class _Redact(logging.Filter):
    """uvicorn's access line names the request's path with its query string (its args);
    a secret in it (the OpenID Connect callback's code and state, a key sent under any
    name, in the path or inside another parameter's value) is redacted before the line is
    queued, so no log holds it."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name == "uvicorn.access" and isinstance(record.args, tuple):
            record.args = tuple(
                redact_secrets(redact_query(a) if "?" in a else a) if isinstance(a, str) else a
                for a in record.args
            )
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


# The most a write to a pipe keeps whole (POSIX PIPE_BUF; 4096 on Linux): `serve --workers`
# shares one stderr pipe (systemd, docker) between processes, and a longer write can be
# cut and interleaved with another process's lines, mid-line.
ATOMIC_WRITE = 4096


class _Lines(logging.StreamHandler):  # type: ignore[type-arg]
    """A stream handler that can write many records at once: each filtered and formatted
    as `emit` would, the lines written in as few writes as whole lines of at most
    `ATOMIC_WRITE` bytes make (a longer line goes alone), each flushed."""

    def emit_all(self, records: list[logging.LogRecord]) -> None:
        chunks: list[str] = []
        chunk: list[str] = []
        size = 0
        for record in records:
            if record.levelno < self.level or not self.filter(record):
                continue
            try:
                line = self.format(record) + self.terminator
            except Exception:
                self.handleError(record)
                continue
            length = len(line) if line.isascii() else len(line.encode(errors="replace"))
            if chunk and size + length > ATOMIC_WRITE:
                chunks.append("".join(chunk))
                chunk, size = [], 0
            chunk.append(line)
            size += length
        if chunk:
            chunks.append("".join(chunk))
        with self.lock:  # type: ignore[union-attr]
            try:
                for text in chunks:
                    self.stream.write(text)
                    self.flush()
            except Exception:
                self.handleError(records[-1])


class _Listener(logging.handlers.QueueListener):
    """Takes every record queued by the time it wakes (up to `most`) and hands them to
    its one `_Lines` handler in one go."""

    most = 1000
    gather = 0.01  # seconds the thread lets lines queue up after the first one

    def _monitor(self) -> None:
        records: queue.SimpleQueue[logging.LogRecord | None] = self.queue  # type: ignore[assignment]
        (lines,) = self.handlers
        assert isinstance(lines, _Lines)
        while True:
            first = records.get()
            if first is not None:
                time.sleep(self.gather)
            batch: list[logging.LogRecord] = []
            while first is not None:  # None: `stop()`'s sentinel
                batch.append(first)
                if len(batch) >= self.most:
                    break
                try:
                    first = records.get_nowait()
                except queue.Empty:
                    break
            if batch:
                lines.emit_all(batch)
            if first is None:
                return


_listener: _Listener | None = None


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
    handler = _Lines(stream if stream is not None else sys.stderr)
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
    enqueue.addFilter(_Redact())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(enqueue)
    _listener = _Listener(records, handler, respect_handler_level=True)
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
