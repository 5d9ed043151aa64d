"""How ``hitl serve`` logs: readable text (the default) or one JSON object a line.

``--log-format json`` is for log collectors: each record is one line with ``time`` (ISO
8601, UTC), ``level``, ``logger``, ``message``, ``process`` (the pid), ``task_id`` when
the record concerns a task, and ``exc_info`` (the traceback as text) when there is one.
A record concerns a task when its log call says so (``extra={"task_id": ...}``) or when
it is made inside a task's flow, its processor's thread included (:func:`about_task`
sets a context variable that every step and thread of the flow inherits). hypercorn's
own logs go through the same handler.
"""

from __future__ import annotations

import json
import logging
import sys
from contextvars import ContextVar
from datetime import UTC, datetime
from typing import Any

# The task whose flow is running in this context (None: none).
current_task: ContextVar[str | None] = ContextVar("hitl_task_id", default=None)

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def about_task(task_id: str) -> None:
    """From here on in this context (a flow's asyncio task, and threads it starts), log
    records concern ``task_id``."""
    current_task.set(task_id)


def task(task_id: str) -> dict[str, Any]:
    """``extra=`` for a log call about a task made outside its flow."""
    return {"task_id": task_id}


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line (newlines in the message are escaped)."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(
                timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
            "process": record.process,
        }
        task_id = getattr(record, "task_id", None) or current_task.get()
        if task_id:
            entry["task_id"] = task_id
        if record.exc_info:
            entry["exc_info"] = self.formatException(record.exc_info)
        elif record.exc_text:
            entry["exc_info"] = record.exc_text
        if record.stack_info:
            entry["stack_info"] = self.formatStack(record.stack_info)
        return json.dumps(entry, ensure_ascii=False, default=str)


def configure(level: str, log_format: str) -> None:
    """Send every log record (hitl's, hypercorn's, asyncio's) to stderr in ``log_format``,
    replacing whatever handlers the root logger had."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if log_format == "json"
                         else logging.Formatter(TEXT_FORMAT))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    logging.captureWarnings(True)  # a library's warning is a log line too, not raw text
