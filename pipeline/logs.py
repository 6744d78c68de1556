"""Logging for the command and its worker processes.

Workers send their records to the parent through a queue, and the parent
prints each kind of warning once per window: a Redis outage seen by the
engine and by every worker is one line, not one per process.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import logging.handlers
import queue
import sys
import time
from typing import Any, Optional

FORMAT = "imgpipe: %(levelname)s: %(message)s"
REPEAT_WINDOW_S = 60.0
# extra= for lines that are rare by construction and must each be printed
# (one per outage, one per dead letter).
UNFOLDED = {"fold": False}


class OncePerWindow(logging.Filter):
    """Drop a record whose logger and message template were printed recently."""

    def __init__(self, window_s: float = REPEAT_WINDOW_S) -> None:
        super().__init__()
        self.window_s = window_s
        self.last_seen: dict[tuple[str, str], float] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        if not getattr(record, "fold", True):
            return True
        key = (record.name, str(record.msg))
        now = time.monotonic()
        if now - self.last_seen.get(key, float("-inf")) < self.window_s:
            return False
        self.last_seen[key] = now
        return True


class JsonLines(logging.Formatter):
    """One JSON object per line, for journald and log shippers; a job's id, when
    the line is about one job, in its own field."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {"time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S"),
                 "level": record.levelname.lower(), "logger": record.name,
                 "message": record.getMessage()}
        if hasattr(record, "job_id"):
            entry["job_id"] = record.job_id
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


def configure(level: int = logging.WARNING, json_lines: Optional[bool] = None) -> None:
    """The command's logging: one stderr handler, repeated warnings folded;
    JSON lines unless stderr is a terminal (or `json_lines` says otherwise)."""
    handler = logging.StreamHandler()
    if json_lines is None:
        json_lines = not sys.stderr.isatty()
    handler.setFormatter(JsonLines() if json_lines else logging.Formatter(FORMAT))
    handler.addFilter(OncePerWindow())
    logging.basicConfig(level=level, handlers=[handler], force=True)


class _Replay(logging.Handler):
    """Hands a worker's record to the parent's logger of the same name."""

    def emit(self, record: logging.LogRecord) -> None:
        logging.getLogger(record.name).handle(record)


class _DropWhenFull(logging.handlers.QueueHandler):
    def prepare(self, record: logging.LogRecord) -> logging.LogRecord:
        # Keep the template and its arguments (numbers and text as they are,
        # anything else as text, so they cross the queue): the parent folds
        # repeats by template, which a pre-formatted message would defeat.
        prepared = copy.copy(record)
        prepared.msg = str(record.msg)
        if isinstance(record.args, tuple):
            prepared.args = tuple(arg if isinstance(arg, (int, float, str)) else str(arg)
                                  for arg in record.args)
        prepared.exc_info = prepared.exc_text = prepared.stack_info = None
        return prepared

    def enqueue(self, record: logging.LogRecord) -> None:
        # A flood of warnings is not worth blocking a worker for.
        with contextlib.suppress(queue.Full):
            self.queue.put_nowait(record)


def forward_from(log_queue: Any) -> logging.handlers.QueueListener:
    """Start replaying records that workers put on `log_queue` (parent side)."""
    listener = logging.handlers.QueueListener(log_queue, _Replay())
    listener.start()
    return listener


def send_to(log_queue: Any, level: int = logging.WARNING) -> None:
    """Route this (worker) process's logging to the parent's queue."""
    root = logging.getLogger()
    root.handlers = [_DropWhenFull(log_queue)]
    root.setLevel(level)
