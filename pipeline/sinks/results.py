"""Result files that survive interruption and resume where they stopped.

Each batch of records is written as whole lines in one write and flushed, so
an interrupted run leaves a valid file; a torn last line (power loss, kill -9)
is cut off when the file is reopened. Re-opening collects the paths already
present so a re-run skips them.
"""

from __future__ import annotations

import csv
import io
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import IO, Protocol

from pipeline.errors import ConfigError
from pipeline.predictions import Record

CSV_COLUMNS = ["path", "status", "label", "index", "score", "predictions",
               "error_code", "error_message"]


class ResultSink(Protocol):
    def write(self, records: list[Record]) -> None: ...

    def close(self) -> None: ...


def open_result_file(path: Path) -> tuple[ResultSink, set[str]]:
    """A sink appending to `path` (.csv or JSONL) and the paths already in it."""
    fmt = "csv" if path.suffix.lower() == ".csv" else "jsonl"
    try:
        done = _recover(path, fmt) if path.exists() else set()
        # The sink owns the handle and closes it.
        handle = open(path, "a", encoding="utf-8", errors="surrogateescape",  # noqa: SIM115
                      newline="")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot use results file {path}: "
                          f"{getattr(exc, 'strerror', None) or exc}") from exc
    if fmt == "csv":
        return CsvFile(handle, write_header=not done and handle.tell() == 0), done
    return JsonlFile(handle), done


class JsonlFile:
    """One JSON object per line (non-UTF-8 file names kept as \\udcXX escapes)."""

    def __init__(self, handle: IO[str]) -> None:
        self.handle = handle

    def write(self, records: list[Record]) -> None:
        self.handle.write("".join(json.dumps(r) + "\n" for r in records))
        self.handle.flush()

    def close(self) -> None:
        _close(self.handle)


class CsvFile:
    """Top-1 in columns, the whole top-k as JSON in `predictions`."""

    def __init__(self, handle: IO[str], write_header: bool) -> None:
        self.handle = handle
        if write_header:
            self.handle.write(_csv_lines([{c: c for c in CSV_COLUMNS}]))

    def write(self, records: list[Record]) -> None:
        self.handle.write(_csv_lines([_csv_row(r) for r in records]))
        self.handle.flush()

    def close(self) -> None:
        _close(self.handle)


class TerminalTable:
    """Aligned top-1 lines for people (used when no --out is given)."""

    def __init__(self, print_line: Callable[[str], None]) -> None:
        self.print_line = print_line

    def write(self, records: list[Record]) -> None:
        for record in records:
            name = os.path.basename(record["path"]) or record["path"]
            if record["status"] == "ok":
                best = record["predictions"][0]
                self.print_line(f"{name:<32} {best['label']:<28} {best['score']:.3f}")
            else:
                error = record["error"]
                self.print_line(f"{name:<32} error: {error['code']}: {error['message']}")

    def close(self) -> None:
        pass


class JsonlStream(JsonlFile):
    """JSONL on standard output, for pipes."""

    def __init__(self) -> None:
        super().__init__(sys.stdout)

    def close(self) -> None:
        self.handle.flush()


def _csv_row(record: Record) -> dict[str, object]:
    row: dict[str, object] = {"path": record["path"], "status": record["status"]}
    if record["status"] == "ok":
        best = record["predictions"][0]
        row.update(label=best["label"], index=best["index"], score=best["score"],
                   predictions=json.dumps(record["predictions"]))
    else:
        row.update(error_code=record["error"]["code"], error_message=record["error"]["message"])
    return row


def _csv_lines(rows: list[dict[str, object]]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, CSV_COLUMNS, lineterminator="\n")
    writer.writerows(rows)
    return buffer.getvalue()


def _recover(path: Path, fmt: str) -> set[str]:
    """Cut a torn last line, then return the paths already recorded."""
    _truncate_partial_line(path)
    with open(path, encoding="utf-8", errors="surrogateescape", newline="") as handle:
        if fmt == "csv":
            return {row["path"] for row in csv.DictReader(handle) if row.get("path")}
        return {done for line in handle if (done := _recorded_path(line)) is not None}


def _recorded_path(line: str) -> str | None:
    """The path of one JSONL record; None for a line that is not one (re-scored)."""
    try:
        record = json.loads(line)
    except ValueError:
        return None
    path = record.get("path") if isinstance(record, dict) else None
    return path if isinstance(path, str) else None


def _truncate_partial_line(path: Path) -> None:
    with open(path, "rb+") as handle:
        size = handle.seek(0, os.SEEK_END)
        if size == 0:
            return
        position = size
        while position > 0:
            step = min(4096, position)
            handle.seek(position - step)
            block = handle.read(step)
            newline = block.rfind(b"\n")
            if newline >= 0:
                handle.truncate(position - step + newline + 1)
                return
            position -= step
        handle.truncate(0)


def _close(handle: IO[str]) -> None:
    handle.flush()
    os.fsync(handle.fileno())
    handle.close()
