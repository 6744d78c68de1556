"""Repeated warnings are folded into one line per window."""

from __future__ import annotations

import json
import logging

from pipeline.logs import UNFOLDED, JsonLines, OncePerWindow


def _record(message: str, *args: object, name: str = "imgpipe.cache") -> logging.LogRecord:
    return logging.LogRecord(name, logging.WARNING, __file__, 1, message, args, None)


def test_the_same_warning_from_several_processes_prints_once() -> None:
    once = OncePerWindow(window_s=60)
    template = "Redis tier at %s unavailable (%s)"
    assert once.filter(_record(template, "host:6379", "Connection refused"))
    assert not once.filter(_record(template, "host:6379", "Timeout reading from socket"))
    assert once.filter(_record("Redis tier back at %s", "host:6379"))


def test_a_warning_prints_again_after_the_window() -> None:
    once = OncePerWindow(window_s=0)
    assert once.filter(_record("local cache disabled"))
    assert once.filter(_record("local cache disabled"))


def test_other_loggers_are_independent() -> None:
    once = OncePerWindow(window_s=60)
    assert once.filter(_record("same text", name="imgpipe.cache"))
    assert once.filter(_record("same text", name="imgpipe.engine"))


def test_unfolded_lines_always_print() -> None:
    once = OncePerWindow(window_s=60)
    for _ in range(2):
        record = _record("Redis at %s unavailable", "host:6379")
        record.__dict__.update(UNFOLDED)
        assert once.filter(record)


def test_json_lines_carry_the_level_the_message_and_the_job_id() -> None:
    record = _record("job %s dead-lettered", "order-17", name="imgpipe.serve")
    record.job_id = "order-17"
    entry = json.loads(JsonLines().format(record))
    assert entry["level"] == "warning"
    assert entry["logger"] == "imgpipe.serve"
    assert entry["message"] == "job order-17 dead-lettered"
    assert entry["job_id"] == "order-17"
