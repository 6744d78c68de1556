"""Result files that survive interruption and resume where they stopped.

Each batch of records is written as whole lines in one write and flushed, so
an interrupted run leaves a valid file; a torn last line (power loss, kill -9)
is cut off when the file is reopened. Re-opening collects the paths already
present so a re-run skips them.

A file also records the settings that shape its records (model, weights,
top-k, labels, preprocessing): JSONL in a first header line that readers skip,
CSV in a sidecar `FILE.settings.json`. Resuming with other settings is
refused, so one file never mixes records made two ways.
"""

from __future__ import annotations

import csv
import io
import itertools
import json
import os
import shutil
import stat
import sys
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, Optional, Protocol

from pipeline.embeddings import wants_embedding
from pipeline.errors import ConfigError
from pipeline.sinks.embeddings import EmbeddingFile, EmbeddingRows, embeddings_path

if TYPE_CHECKING:
    from pipeline.predictions import Record  # torch: not needed to write records

CSV_COLUMNS = ["path", "status", "label", "index", "score", "predictions",
               "error_code", "error_message"]
# With embeddings (model.output): each record's row in FILE.embeddings.npy.
EMBEDDING_COLUMNS = [*CSV_COLUMNS, "embedding_row"]
# What a setting was before a results file recorded it: a file without it made it so.
RECORDED_DEFAULTS = {"output": "logits"}
FORMATS = {".jsonl": "jsonl", ".csv": "csv"}
HEADER_KEY = "imgpipe_results"
FORMAT_VERSION = 1
SIDECAR_SUFFIX = ".settings.json"
RECORD_STATUSES = ("ok", "error")
REPLACE_HINT = "choose another --out, or --overwrite to start it afresh"


class ResultSink(Protocol):
    def write(self, records: list[Record]) -> None: ...

    def close(self) -> None: ...


def open_result_file(path: Path, settings: Optional[Mapping[str, Any]] = None,
                     overwrite: bool = False) -> tuple[ResultSink, set[str]]:
    """A sink appending to `path` (.jsonl or .csv) and the paths already in it."""
    found = inspect_result_file(path, overwrite)
    return found.open(settings), found.done


def inspect_result_file(path: Path, overwrite: bool = False) -> ResultFile:
    """What `path` holds; ConfigError for a type or a file imgpipe does not write.

    Needs no model, so a wrong --out fails before one loads; the settings are
    checked later, by ResultFile.open, once the model says what they are.
    """
    if _is_stream(path):
        return ResultFile(path, "stream")
    fmt = FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise ConfigError(f"results file {path}: unsupported type "
                          f"{path.suffix or '(no extension)'}; use .jsonl, .csv, or - "
                          "for JSONL on stdout")
    if overwrite or not path.exists():
        if not path.parent.is_dir():
            raise ConfigError(f"cannot use results file {path}: no directory {path.parent}")
        return ResultFile(path, fmt)
    try:
        _truncate_partial_line(path)
        return _read_csv(path) if fmt == "csv" else _read_jsonl(path)
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise _unusable(path, exc) from exc


@dataclass
class ResultFile:
    """A results file as found, before any record is added.

    `recorded` holds what is known of the settings its records were made with:
    all of them from a header or sidecar (`stored`), only the model from the
    records of a JSONL file an earlier imgpipe wrote, nothing for a new file.
    `started` is False when the file begins from nothing: new, empty, or
    overwritten.
    """

    path: Path
    fmt: str  # "jsonl", "csv", or "stream" (a device or a pipe: written, never read)
    done: set[str] = field(default_factory=set)
    recorded: dict[str, Any] = field(default_factory=dict)
    stored: bool = False
    started: bool = False

    @property
    def sidecar(self) -> Path:
        return self.path.with_name(self.path.name + SIDECAR_SUFFIX)

    @property
    def embeddings(self) -> Path:
        return embeddings_path(self.path)

    def own_files(self) -> list[Path]:
        """The files this one writes, which a run must not score."""
        files = [self.path, self.sidecar] if self.fmt == "csv" else [self.path]
        return files if self.fmt == "stream" else [*files, self.embeddings]

    def check(self, settings: Mapping[str, Any]) -> None:
        """ConfigError unless `settings` (some or all) match those recorded."""
        if self.started:
            _check_same(self.path, self.recorded, settings)

    def open(self, settings: Optional[Mapping[str, Any]] = None) -> ResultSink:
        """A sink for new records. `settings` (what shaped them) must match those
        recorded (ConfigError naming what differs) and are recorded from now on;
        None checks and records nothing."""
        if settings is not None:
            self.check(settings)
        embedded = settings is not None and wants_embedding(settings.get("output", "logits"))
        if embedded and self.fmt == "stream":
            raise ConfigError(f"{self.path}: embeddings go to a file beside the results "
                              f"file; use --out FILE.jsonl or FILE.csv")
        if embedded and self.started and not self.embeddings.exists():
            raise ConfigError(f"{self.embeddings} is missing: the records of {self.path} "
                              f"name its rows; {REPLACE_HINT}")
        try:
            rows = EmbeddingFile(self.embeddings, fresh=not self.started) if embedded else None
            if self.fmt == "stream":
                sink: ResultSink = JsonlFile(_open_text(self.path, "a"))
            elif self.fmt == "csv":
                sink = self._open_csv(settings, embedded)
            else:
                sink = self._open_jsonl(settings)
        except OSError as exc:
            raise _unusable(self.path, exc) from exc
        return sink if rows is None else EmbeddingRows(sink, rows)

    def _open_jsonl(self, settings: Optional[Mapping[str, Any]]) -> ResultSink:
        if self.started:
            if settings is not None and not self.stored:
                _rewrite(self.path, _header_line(settings).encode(), rest=self.path)
            return JsonlFile(_open_text(self.path, "a"))
        handle = _open_text(self.path, "w")
        if settings is not None:
            handle.write(_header_line(settings))
            handle.flush()
        return JsonlFile(handle)

    def _open_csv(self, settings: Optional[Mapping[str, Any]], embedded: bool) -> ResultSink:
        if settings is not None and not (self.started and self.stored):
            _rewrite(self.sidecar, _header_line(settings).encode())
        elif settings is None and not self.started:
            self.sidecar.unlink(missing_ok=True)  # it would describe records no longer there
        handle = _open_text(self.path, "a" if self.started else "w")
        return CsvFile(handle, write_header=not self.started,
                       columns=EMBEDDING_COLUMNS if embedded else CSV_COLUMNS)


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
    """Top-1 in columns, the whole top-k as JSON in `predictions` (and, with
    embeddings, the record's row of them in `embedding_row`)."""

    def __init__(self, handle: IO[str], write_header: bool,
                 columns: list[str] = CSV_COLUMNS) -> None:
        self.handle = handle
        self.columns = columns
        if write_header:
            self.handle.write(_csv_lines([{c: c for c in columns}], columns))
            self.handle.flush()

    def write(self, records: list[Record]) -> None:
        self.handle.write(_csv_lines([_csv_row(r) for r in records], self.columns))
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
    if "embedding_row" in record:
        row["embedding_row"] = record["embedding_row"]
    if record["status"] == "ok" and record.get("predictions"):
        best = record["predictions"][0]
        row.update(label=best["label"], index=best["index"], score=best["score"],
                   predictions=json.dumps(record["predictions"]))
    elif record["status"] == "error":
        row.update(error_code=record["error"]["code"], error_message=record["error"]["message"])
    return row


def _csv_lines(rows: list[dict[str, object]], columns: list[str]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, columns, lineterminator="\n")
    # Minimal quoting quotes a line end only as the line terminator spells it (\n): a
    # \r in a field (a file name may hold one) would read back as a row break.
    quoted = csv.DictWriter(buffer, columns, lineterminator="\n", quoting=csv.QUOTE_ALL)
    for row in rows:
        carriage = any(isinstance(value, str) and "\r" in value for value in row.values())
        (quoted if carriage else writer).writerow(row)
    return buffer.getvalue()


# -- reading what a file holds ------------------------------------------------

def _read_jsonl(path: Path) -> ResultFile:
    with _open_text(path, "r") as handle:
        first = handle.readline()
        if not first:
            return ResultFile(path, "jsonl")
        header = _header_settings(first, path)
        lines: Iterable[str] = handle if header is not None else itertools.chain([first], handle)
        done, models = _scan_records(lines)
    if header is not None:
        return ResultFile(path, "jsonl", done, header, stored=True, started=True)
    if not done:
        raise ConfigError(f"{path} is not an imgpipe results file (none of its lines is a "
                          f"result record); refusing to append to it: {REPLACE_HINT}")
    # An earlier imgpipe wrote no header: its records still name their model.
    recorded = {"model": models.pop()} if len(models) == 1 else {}
    return ResultFile(path, "jsonl", done, recorded, started=True)


def _scan_records(lines: Iterable[str]) -> tuple[set[str], set[str]]:
    """The paths of the records among `lines`, and the models their ok records name.

    A line that is not a record (damaged) is skipped: its file is scored again.
    """
    done: set[str] = set()
    models: set[str] = set()
    for line in lines:
        record = _record(line)
        if record is None:
            continue
        done.add(record["path"])
        if record["status"] == "ok" and isinstance(record.get("model"), str):
            models.add(record["model"])
    return done, models


def _record(line: str) -> Optional[dict[str, Any]]:
    try:
        record = json.loads(line)
    except ValueError:
        return None
    if (isinstance(record, dict) and isinstance(record.get("path"), str)
            and record.get("status") in RECORD_STATUSES):
        return record
    return None


def _read_csv(path: Path) -> ResultFile:
    with _open_text(path, "r") as handle:
        rows = csv.reader(handle)
        columns = next(rows, None)
        if columns is None:
            return ResultFile(path, "csv")
        if columns not in (CSV_COLUMNS, EMBEDDING_COLUMNS):
            raise ConfigError(f"{path} is not an imgpipe results file (its first line is not "
                              f"{','.join(CSV_COLUMNS)}); refusing to append to it: "
                              f"{REPLACE_HINT}")
        done = {row[0] for row in rows if row and row[0]}
    found = ResultFile(path, "csv", done, started=True)
    stored = _read_sidecar(found.sidecar)
    if stored is not None:
        found.recorded, found.stored = stored, True
    return found


def _read_sidecar(sidecar: Path) -> Optional[dict[str, Any]]:
    try:
        text = sidecar.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None  # an earlier imgpipe wrote the CSV
    settings = _header_settings(text, sidecar)
    if settings is None:
        raise ConfigError(f"{sidecar} does not hold imgpipe settings; remove it, or "
                          "--overwrite to start the results afresh")
    return settings


def _header_settings(text: str, path: Path) -> Optional[dict[str, Any]]:
    """The settings a header (or sidecar) records; None when `text` is not one."""
    try:
        header = json.loads(text)
    except ValueError:
        return None
    if not isinstance(header, dict) or HEADER_KEY not in header:
        return None
    if header[HEADER_KEY] != FORMAT_VERSION or not isinstance(header.get("settings"), dict):
        raise ConfigError(f"{path} was written by another imgpipe version (results format "
                          f"{header[HEADER_KEY]!r}, this one reads {FORMAT_VERSION}): "
                          f"{REPLACE_HINT}")
    return header["settings"]


def _check_same(path: Path, recorded: Mapping[str, Any], settings: Mapping[str, Any]) -> None:
    if recorded:  # recorded before a setting existed: the file was made with its default
        recorded = {**RECORDED_DEFAULTS, **recorded}
    differences = [f"{key} {_shown(key, recorded[key])} (now {_shown(key, settings[key])})"
                   for key in sorted(recorded.keys() & settings.keys())
                   if recorded[key] != settings[key]]
    if differences:
        raise ConfigError(f"{path} holds results made with other settings: "
                          f"{', '.join(differences)}; {REPLACE_HINT}")


def _shown(key: str, value: Any) -> str:
    # A digest's first digits are enough to tell two apart.
    return str(value)[:12] if key.endswith("_digest") else repr(value)


def _header_line(settings: Mapping[str, Any]) -> str:
    return json.dumps({HEADER_KEY: FORMAT_VERSION, "settings": dict(settings)}) + "\n"


# -- files --------------------------------------------------------------------

def _is_stream(path: Path) -> bool:
    """A device, pipe or socket (/dev/null, /dev/stdout on a pipe): only written to."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return False
    return not (stat.S_ISREG(mode) or stat.S_ISDIR(mode))


def _open_text(path: Path, mode: str) -> IO[str]:
    return open(path, mode, encoding="utf-8", errors="surrogateescape", newline="")


def _unusable(path: Path, exc: Exception) -> ConfigError:
    return ConfigError(f"cannot use results file {path}: "
                       f"{getattr(exc, 'strerror', None) or exc}")


def _rewrite(path: Path, first: bytes, rest: Optional[Path] = None) -> None:
    """Replace `path` by `first` followed by the bytes of `rest`, atomically: a
    crash leaves the old file or the new one, never half of it."""
    target = Path(os.path.realpath(path))
    temporary = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    try:
        with open(temporary, "wb") as out:
            out.write(first)
            if rest is not None:
                with open(rest, "rb") as source:
                    shutil.copyfileobj(source, out)
                shutil.copymode(rest, temporary)
            out.flush()
            os.fsync(out.fileno())
        os.replace(temporary, target)
    finally:
        temporary.unlink(missing_ok=True)


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
    if stat.S_ISREG(os.fstat(handle.fileno()).st_mode):  # a device or pipe cannot be synced
        os.fsync(handle.fileno())
    handle.close()
