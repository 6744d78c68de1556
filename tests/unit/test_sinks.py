"""Result files (JSONL/CSV) that resume, survive torn lines, and keep odd names."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import pytest

from pipeline.errors import ConfigError, InputError
from pipeline.items import Job, Prepared
from pipeline.predictions import Record, error_record, ok_record
from pipeline.sinks.results import TerminalTable, open_result_file

FORMATS = ["results.jsonl", "results.csv"]
ODD_NAME = "photos/caf\udce9.jpg"  # the file name b"caf\xe9.jpg", as os.fsdecode gives it


def ok(path: str, label: str = "espresso", score: float = 0.95) -> Record:
    predictions = [{"label": label, "index": 967, "score": score},
                   {"label": "cup", "index": 968, "score": 0.01}]
    return ok_record(Prepared(Job(path), timings_ms={"preprocess": 3.14159}),
                     "efficientnet_lite0", predictions)


def failed(path: str, code: str = "truncated", message: str = "image data is truncated") -> Record:
    return error_record(Prepared(Job(path), error=InputError(code, message)))


def write_and_close(path: Path, records: list[Record]) -> set[str]:
    sink, done = open_result_file(path)
    try:
        sink.write(records)
    finally:
        sink.close()
    return done


def jsonl_lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def csv_rows(path: Path) -> list[dict]:
    with open(path, encoding="utf-8", errors="surrogateescape", newline="") as handle:
        return list(csv.DictReader(handle))


@pytest.mark.parametrize("name", FORMATS)
def test_new_file_starts_with_nothing_done(tmp_path, name):
    sink, done = open_result_file(tmp_path / name)
    sink.close()
    assert done == set()


@pytest.mark.parametrize("name", FORMATS)
def test_reopen_returns_the_paths_already_written(tmp_path, name):
    # given a result file with an ok and an error record from a first run
    path = tmp_path / name
    write_and_close(path, [ok("a.jpg"), failed("b.jpg")])

    # when it is reopened
    sink, done = open_result_file(path)
    sink.close()

    # then both paths count as done
    assert done == {"a.jpg", "b.jpg"}


@pytest.mark.parametrize("name", FORMATS)
def test_resumed_run_appends_after_the_existing_records(tmp_path, name):
    # given two runs, the second one resuming
    path = tmp_path / name
    write_and_close(path, [ok("a.jpg")])
    write_and_close(path, [ok("b.jpg"), failed("c.jpg")])

    # when the file is reopened again
    sink, done = open_result_file(path)
    sink.close()

    # then all three records are there
    assert done == {"a.jpg", "b.jpg", "c.jpg"}


def test_jsonl_records_are_one_json_object_per_line(tmp_path):
    path = tmp_path / "results.jsonl"
    write_and_close(path, [ok("a.jpg"), failed("b.jpg", "not_an_image", "not an image")])

    lines = jsonl_lines(path)
    assert [line["path"] for line in lines] == ["a.jpg", "b.jpg"]
    assert lines[0]["status"] == "ok"
    assert lines[0]["predictions"][0] == {"label": "espresso", "index": 967, "score": 0.95}
    assert lines[0]["timings_ms"] == {"preprocess": 3.142}
    assert lines[1]["error"] == {"code": "not_an_image", "message": "not an image"}


def test_csv_has_top1_columns_and_the_full_topk_as_json(tmp_path):
    path = tmp_path / "results.csv"
    write_and_close(path, [ok("a.jpg"), failed("b.jpg", "not_an_image", "not, an \"image\"")])

    rows = csv_rows(path)
    assert rows[0]["path"] == "a.jpg" and rows[0]["label"] == "espresso"
    assert rows[0]["index"] == "967" and float(rows[0]["score"]) == 0.95
    assert len(json.loads(rows[0]["predictions"])) == 2
    assert rows[1]["error_code"] == "not_an_image"
    assert rows[1]["error_message"] == "not, an \"image\""


@pytest.mark.parametrize("name", FORMATS)
def test_torn_last_line_is_cut_off_on_reopen(tmp_path, name):
    # given a file whose last record was torn by a hard kill
    path = tmp_path / name
    write_and_close(path, [ok("a.jpg"), ok("b.jpg")])
    intact = path.read_bytes()
    torn = b'{"path": "t.jpg", "status": "o' if name.endswith("jsonl") else b"t.jpg,ok,esp"
    with open(path, "ab") as handle:
        handle.write(torn)

    # when it is reopened and the run goes on
    sink, done = open_result_file(path)
    sink.write([ok("c.jpg")])
    sink.close()

    # then the torn line is gone, the complete records are kept, and the
    # file parses from start to end
    assert done == {"a.jpg", "b.jpg"}
    content = path.read_bytes()
    assert content.startswith(intact)
    assert torn not in content
    assert content.endswith(b"\n")
    if name.endswith("jsonl"):
        assert [line["path"] for line in jsonl_lines(path)] == ["a.jpg", "b.jpg", "c.jpg"]
    else:
        assert [row["path"] for row in csv_rows(path)] == ["a.jpg", "b.jpg", "c.jpg"]


def test_torn_line_longer_than_a_read_block_is_cut_off(tmp_path):
    # given a torn line of 10 kB (longer than the 4 kB blocks scanned backwards)
    path = tmp_path / "results.jsonl"
    write_and_close(path, [ok("a.jpg")])
    with open(path, "ab") as handle:
        handle.write(b'{"path": "' + b"x" * 10_000)

    # when / then
    sink, done = open_result_file(path)
    sink.close()
    assert done == {"a.jpg"}
    assert [line["path"] for line in jsonl_lines(path)] == ["a.jpg"]


def test_a_torn_line_one_byte_short_of_a_block_keeps_the_record_before_it(tmp_path):
    # given a torn line that leaves the last complete record's newline as the
    # first byte of the last 4 kB block scanned
    path = tmp_path / "results.jsonl"
    write_and_close(path, [ok("a.jpg"), ok("b.jpg")])
    with open(path, "ab") as handle:
        handle.write(b'{"path": "' + b"x" * (4096 - 1 - 10))
    # when it is reopened / then both records are still there
    sink, done = open_result_file(path)
    sink.close()
    assert done == {"a.jpg", "b.jpg"}


@pytest.mark.parametrize("torn", [b'{"path": "a.jp', b"{"])
def test_file_that_is_only_a_torn_line_is_emptied(tmp_path, torn):
    path = tmp_path / "results.jsonl"
    path.write_bytes(torn)
    sink, done = open_result_file(path)
    sink.write([ok("b.jpg")])
    sink.close()
    assert done == set()
    assert [line["path"] for line in jsonl_lines(path)] == ["b.jpg"]


def test_csv_header_is_written_once_across_reopens(tmp_path):
    # given three runs appending to the same CSV
    path = tmp_path / "results.csv"
    for name in ["a.jpg", "b.jpg", "c.jpg"]:
        write_and_close(path, [ok(name)])

    # when / then: a single header line, first
    lines = path.read_text(encoding="utf-8").splitlines()
    assert lines[0].startswith("path,status,label")
    assert sum(line.startswith("path,status") for line in lines) == 1
    assert [row["path"] for row in csv_rows(path)] == ["a.jpg", "b.jpg", "c.jpg"]


def test_csv_header_is_not_repeated_when_the_first_run_wrote_no_rows(tmp_path):
    path = tmp_path / "results.csv"
    write_and_close(path, [])
    write_and_close(path, [ok("a.jpg")])
    lines = path.read_text(encoding="utf-8").splitlines()
    assert sum(line.startswith("path,status") for line in lines) == 1


@pytest.mark.parametrize("name", FORMATS)
def test_non_utf8_file_name_round_trips(tmp_path, name):
    # given a record for a file whose name is not valid UTF-8
    path = tmp_path / name
    write_and_close(path, [ok(ODD_NAME), failed("plain.jpg")])

    # when the file is reopened
    sink, done = open_result_file(path)
    sink.close()

    # then the path comes back exactly, and encodes to the bytes on disk
    assert ODD_NAME in done
    (recovered,) = done - {"plain.jpg"}
    assert os.fsencode(recovered) == b"photos/caf\xe9.jpg"


def test_non_utf8_name_is_an_escape_in_valid_utf8_jsonl(tmp_path):
    path = tmp_path / "results.jsonl"
    write_and_close(path, [ok(ODD_NAME)])
    text = path.read_bytes().decode("utf-8")  # the file itself stays valid UTF-8
    assert "\\udce9" in text
    assert jsonl_lines(path)[0]["path"] == ODD_NAME


def test_terminal_table_prints_one_line_per_record():
    # given a table that collects its lines
    lines: list[str] = []
    table = TerminalTable(lines.append)

    # when it gets two ok records and one error
    table.write([ok("samples/coffee.jpg", "espresso", 0.952457),
                 ok("samples/chelsea.jpg", "Egyptian cat", 0.366834),
                 failed("bad/cut.jpg", "truncated", "image data is truncated")])
    table.close()

    # then there is one line each, with the file name and the top-1 or the error
    assert len(lines) == 3
    assert lines[0].startswith("coffee.jpg") and "espresso" in lines[0]
    assert lines[0].rstrip().endswith("0.952")
    assert lines[1].startswith("chelsea.jpg") and "Egyptian cat" in lines[1]
    assert lines[2].startswith("cut.jpg") and "truncated" in lines[2]
    assert "samples/" not in lines[0]
    # the label column lines up
    assert lines[0].index("espresso") == lines[1].index("Egyptian cat")


def test_a_csv_path_holding_a_carriage_return_is_done_on_resume(tmp_path):
    # file names may hold \r; read back without newline="" it would come back as \n
    path = tmp_path / "results.csv"
    write_and_close(path, [ok("photos/a\rb.jpg")])
    written = path.read_bytes()
    assert written.endswith(b"\n") and b"\r\n" not in written  # rows end in \n, quoted or not
    assert write_and_close(path, []) == {"photos/a\rb.jpg"}


def test_terminal_table_shows_a_path_without_a_file_name_whole():
    lines: list[str] = []
    TerminalTable(lines.append).write([ok("https://images.example/")])
    assert lines[0].startswith("https://images.example/ ")


def test_a_line_that_is_not_a_record_is_skipped_on_resume(tmp_path):
    # given a results file with a damaged line in the middle
    path = tmp_path / "results.jsonl"
    path.write_text('{"path": "a.jpg", "status": "ok"}\nnot json at all\n'
                    '["a", "list"]\n{"path": "b.jpg", "status": "ok"}\n')
    # when it is reopened
    sink, done = open_result_file(path)
    sink.close()
    # then the good records count as done and the damaged ones are scored again
    assert done == {"a.jpg", "b.jpg"}


def test_a_results_file_in_a_missing_directory_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="cannot use results file"):
        open_result_file(tmp_path / "missing" / "results.jsonl")
