"""Log lines as text or as JSON, each carrying the trace it was written in (a foundation module, like
``clock`` and ``errors``: the replica workers use it without loading the observability package).

``lamina up`` and the replica workers set the root logger up once (:func:`configure_logging`), and uvicorn's
own lines go through it too. The JSON form is one object per line on stderr, which log shippers (Vector,
Fluent Bit, Promtail, CloudWatch) take without a parsing pattern: ``time`` (RFC 3339, UTC, milliseconds),
``level``, ``logger``, ``message``; ``trace_id`` and ``span_id`` when the line was written inside a span
(or given as ``extra``); ``exception`` with the traceback; and the record's ``fields`` (a dict given as
``extra={"fields": ...}``, e.g. the access log's). The trace id is the one the answer's
``x-lamina-trace-id`` header carries and ``lamina trace ID`` opens, so a log line leads to its trace and a
trace to its log lines.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any, Literal, TextIO

#: the environment variable that carries the format to the processes ``lamina up`` starts (the workers)
LOG_FORMAT_ENV = "LAMINA_LOG_FORMAT"
LogFormat = Literal["text", "json"]
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
#: how the gateway and the workers run uvicorn's logging: its warnings and errors only, no access lines of
#: its own (``observability.access_log`` is Lamina's), through the root logger's handler and format
UVICORN_LOGGING: dict[str, Any] = {"log_level": "warning", "access_log": False, "log_config": None}
#: a LogRecord's own attributes: anything else on a record came as ``extra`` (not repeated as fields)
_RECORD_KEYS = frozenset(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    """One JSON object per record (see the module doc)."""

    def format(self, record: logging.LogRecord) -> str:
        stamp = datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds")
        out: dict[str, Any] = {
            "time": stamp.replace("+00:00", "Z"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        trace_id, span_id = getattr(record, "trace_id", None), getattr(record, "span_id", None)
        otel = sys.modules.get("opentelemetry.trace")  # a process that never loaded it has no span
        if trace_id is None and otel is not None:
            ctx = otel.get_current_span().get_span_context()
            if ctx.is_valid:
                trace_id, span_id = format(ctx.trace_id, "032x"), format(ctx.span_id, "016x")
        if trace_id is not None:
            out["trace_id"] = trace_id
        if span_id is not None:
            out["span_id"] = span_id
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            out.update((k, v) for k, v in fields.items() if k not in out)
        for key, value in record.__dict__.items():  # other ``extra`` keys, as they are
            if key not in _RECORD_KEYS and key not in ("fields", "trace_id", "span_id") and key not in out:
                out[key] = value
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        if record.stack_info:
            out["stack"] = self.formatStack(record.stack_info)
        return json.dumps(out, ensure_ascii=False, default=str)


class _LaminaHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """The handler :func:`configure_logging` installs (and replaces when called again): to the
    ``sys.stderr`` of the moment it writes, as ``logging.lastResort`` does (not one swapped out since)."""

    def __init__(self) -> None:
        logging.Handler.__init__(self)

    @property
    def stream(self) -> TextIO:
        return sys.stderr


def configure_logging(log_format: str | None = None, level: int = logging.INFO) -> LogFormat:
    """Send the root logger's lines to stderr as ``log_format`` (``text`` or ``json``; None: the
    environment's :data:`LOG_FORMAT_ENV`, else text) and return the format used. httpx's line per request
    is turned off. Others' handlers (a test's log capture) are left in place."""
    chosen = log_format or os.environ.get(LOG_FORMAT_ENV) or "text"
    if chosen not in ("text", "json"):
        raise ValueError(f"log format {chosen!r}: use text or json")
    root = logging.getLogger()
    for handler in [h for h in root.handlers if isinstance(h, _LaminaHandler)]:
        root.removeHandler(handler)
    handler = _LaminaHandler()
    handler.setFormatter(JsonFormatter() if chosen == "json" else logging.Formatter(TEXT_FORMAT))
    root.addHandler(handler)
    root.setLevel(level)
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per replica call is noise
    # a line per plugin and per migration on a new state directory: the store logs one line instead
    logging.getLogger("alembic").setLevel(logging.WARNING)
    return "json" if chosen == "json" else "text"


def start_line(name: str, argv: list[str], env: Mapping[str, str] | None = None) -> bytes:
    """The line a process's log file gets before the process starts (a replica's, a job's), in the format
    of :data:`LOG_FORMAT_ENV` in ``env`` (the process's environment; None: this one's), the one the
    process will write in."""
    if (os.environ if env is None else env).get(LOG_FORMAT_ENV) == "json":
        fields = {"name": "lamina", "levelno": logging.INFO, "levelname": "INFO", "argv": argv}
        record = logging.makeLogRecord({**fields, "msg": f"starting {name}"})
        return (JsonFormatter().format(record) + "\n").encode()
    return f"--- lamina {time.strftime('%Y-%m-%d %H:%M:%S')}: starting {name}: {' '.join(argv)}\n".encode()
