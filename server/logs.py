"""Log lines as text or JSON (--log-format); every line written while serving a call carries that call's request id.

The call's fields live in a context variable: asyncio copies it into each task and each `asyncio.to_thread` the
call starts, so lines from the engine, the batcher's submitter and worker threads are tagged without passing ids
around. In JSON every line is one object: time, level, logger, message, the call's fields, any `extra` fields, and
the traceback as `exception` when there is one, and the trace_id and span_id when the server is traced
(tracing.py).
"""

from __future__ import annotations

import contextvars
import datetime
import json
import logging
from typing import Any

from . import tracing

FORMATS = ("text", "json")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
_CALL: contextvars.ContextVar[dict[str, str]] = contextvars.ContextVar("facetwin_call", default={})
_RECORD_FIELDS = set(vars(logging.makeLogRecord({}))) | {"message", "asctime"}


def bind_call(**fields: str) -> contextvars.Token:
    """Tags every log line of the current call (this task and what it starts) with these fields."""
    return _CALL.set(fields)


def unbind_call(token: contextvars.Token) -> None:
    try:
        _CALL.reset(token)
    except ValueError:  # a stream closed from another context (the loop's shutdown); its own context ends with it
        pass


def current_request_id() -> str:
    """The request id of the call being served, or "" outside a call."""
    return _CALL.get().get("request_id", "")


class _CallFields(logging.Filter):
    def __init__(self, fixed: dict[str, str]) -> None:
        super().__init__()
        self.fixed = fixed

    def filter(self, record: logging.LogRecord) -> bool:
        for key, value in (*self.fixed.items(), *_CALL.get().items(), *tracing.current_ids().items()):
            if not hasattr(record, key):  # a field passed as `extra` wins
                setattr(record, key, value)
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": datetime.datetime.fromtimestamp(record.created, datetime.timezone.utc).isoformat(
                timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        entry.update((key, value) for key, value in vars(record).items() if key not in _RECORD_FIELDS)
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


class TextFormatter(logging.Formatter):
    """The classic line; after the logger, the serving process (where there are several) and the request id of the
    call the line belongs to."""

    def __init__(self) -> None:
        super().__init__(TEXT_FORMAT.replace("%(name)s", "%(name)s%(tags)s"))

    def format(self, record: logging.LogRecord) -> str:
        tags = " ".join(t for t in (getattr(record, "server_process", ""), getattr(record, "request_id", "")) if t)
        record.tags = f" [{tags}]" if tags else ""
        try:
            return super().format(record)
        finally:
            del record.tags


def handler(fmt: str = "text", stream: Any = None, server_process: str = "") -> logging.Handler:
    """A handler writing lines in the given format (to stderr by default), tagged with the current call's fields and
    with `server_process`, the name of this serving process where there are several."""
    if fmt not in FORMATS:
        raise ValueError(f"log format {fmt!r} must be one of {', '.join(FORMATS)}")
    out = logging.StreamHandler(stream)
    out.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    out.addFilter(_CallFields({"server_process": server_process} if server_process else {}))
    return out


def configure(level: str = "INFO", fmt: str = "text", server_process: str = "") -> None:
    """Replaces the root logger's handlers with one stderr handler in the given format."""
    logging.basicConfig(level=level.upper(), handlers=[handler(fmt, server_process=server_process)], force=True)
