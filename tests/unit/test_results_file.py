"""Result files record the settings their records were made with, and refuse
what they cannot safely append to: other settings, foreign files, unknown types."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import numpy as np
import pytest

from pipeline.errors import ConfigError
from pipeline.items import Job, Prepared
from pipeline.predictions import Record, ok_record
from pipeline.sinks.results import inspect_result_file, open_result_file

SETTINGS = {"model": "efficientnet_lite0", "weights_digest": "0a19cb5b4a1686334a1c57c03f577f9d",
            "topk": 5, "labels_digest": "c8eba68a442520c052cb3a3fea138f1a",
            "preprocess_digest": "7d405445af02d68ac0a9af6e6a91ed8a"}
FORMATS = ["results.jsonl", "results.csv"]


def ok(path: str, model: str = "efficientnet_lite0") -> Record:
    return ok_record(Prepared(Job(path)), model, [{"label": "cup", "index": 968, "score": 0.5}])


def run(path: Path, records: list[Record], settings: dict | None = SETTINGS,
        overwrite: bool = False) -> set[str]:
    """One scoring run: open, write, close; the paths it found done."""
    sink, done = open_result_file(path, settings, overwrite)
    try:
        sink.write(records)
    finally:
        sink.close()
    return done


def lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def recorded_settings(path: Path) -> dict:
    """The settings a results file records: JSONL header or CSV sidecar."""
    if path.suffix == ".csv":
        return json.loads(Path(f"{path}.settings.json").read_text())["settings"]
    return lines(path)[0]["settings"]


# -- the settings are recorded and checked ------------------------------------


def test_jsonl_starts_with_a_header_holding_the_settings(tmp_path):
    path = tmp_path / "results.jsonl"
    run(path, [ok("a.jpg")])
    header, record = lines(path)
    assert header == {"imgpipe_results": 1, "settings": SETTINGS}
    assert record["path"] == "a.jpg"


def test_csv_keeps_the_settings_in_a_sidecar(tmp_path):
    path = tmp_path / "results.csv"
    run(path, [ok("a.jpg")])
    assert recorded_settings(path) == SETTINGS
    assert path.read_text().splitlines()[0].startswith("path,status,label")


@pytest.mark.parametrize("name", FORMATS)
def test_same_settings_resume_and_the_header_is_not_a_record(tmp_path, name):
    path = tmp_path / name
    run(path, [ok("a.jpg")])
    assert run(path, [ok("b.jpg")]) == {"a.jpg"}
    assert run(path, []) == {"a.jpg", "b.jpg"}
    if name.endswith(".jsonl"):
        assert sum("imgpipe_results" in line for line in lines(path)) == 1


@pytest.mark.parametrize("name", FORMATS)
@pytest.mark.parametrize(("key", "other", "shown"), [
    ("topk", 3, "topk 5 (now 3)"),
    ("model", "resnet50", "model 'efficientnet_lite0' (now 'resnet50')"),
    ("weights_digest", "ffffffffffffffffffffffffffffffff", "weights_digest 0a19cb5b4a16 "
                                                          "(now ffffffffffff)"),
])
def test_other_settings_are_refused_naming_what_differs(tmp_path, name, key, other, shown):
    # given a results file written with SETTINGS
    path = tmp_path / name
    run(path, [ok("a.jpg")])
    before = path.read_bytes()
    # when a run with one setting changed resumes it
    with pytest.raises(ConfigError) as raised:
        open_result_file(path, {**SETTINGS, key: other})
    # then it is refused in one line naming the difference, and the file is untouched
    message = str(raised.value)
    assert shown in message and "--overwrite" in message and "\n" not in message
    assert message.startswith(str(path))
    assert path.read_bytes() == before


@pytest.mark.parametrize("name", FORMATS)
def test_overwrite_starts_afresh_with_the_new_settings(tmp_path, name):
    path = tmp_path / name
    run(path, [ok("a.jpg")])
    assert run(path, [ok("b.jpg")], {**SETTINGS, "topk": 3}, overwrite=True) == set()
    assert run(path, [], {**SETTINGS, "topk": 3}) == {"b.jpg"}
    assert recorded_settings(path)["topk"] == 3


@pytest.mark.parametrize("name", FORMATS)
def test_settings_are_checked_only_when_given(tmp_path, name):
    path = tmp_path / name
    run(path, [ok("a.jpg")])
    assert run(path, [], settings=None) == {"a.jpg"}
    # and the settings recorded are kept for the next run that gives some
    assert recorded_settings(path) == SETTINGS


def test_a_csv_started_afresh_without_settings_loses_its_stale_sidecar(tmp_path):
    path = tmp_path / "results.csv"
    run(path, [ok("a.jpg")])
    run(path, [ok("b.jpg")], settings=None, overwrite=True)
    assert not Path(f"{path}.settings.json").exists()


def test_a_sidecar_that_holds_no_settings_is_refused(tmp_path):
    path = tmp_path / "results.csv"
    run(path, [ok("a.jpg")])
    Path(f"{path}.settings.json").write_text("{}")
    with pytest.raises(ConfigError, match="does not hold imgpipe settings"):
        open_result_file(path, SETTINGS)


# -- files an earlier imgpipe wrote (no settings recorded) ---------------------


def test_jsonl_without_header_resumes_and_gains_one(tmp_path):
    # given a JSONL file of records without a header, as earlier versions wrote
    path = tmp_path / "results.jsonl"
    path.write_text(json.dumps(ok("a.jpg")) + "\n")
    # when it is resumed
    done = run(path, [ok("b.jpg")])
    # then its records count, and the settings are recorded first from now on
    assert done == {"a.jpg"}
    header, *records = lines(path)
    assert header["settings"] == SETTINGS
    assert [r["path"] for r in records] == ["a.jpg", "b.jpg"]


def test_jsonl_without_header_from_another_model_is_refused(tmp_path):
    path = tmp_path / "results.jsonl"
    path.write_text(json.dumps(ok("a.jpg", model="resnet50")) + "\n")
    with pytest.raises(ConfigError, match=r"model 'resnet50' \(now 'efficientnet_lite0'\)"):
        open_result_file(path, SETTINGS)


def test_csv_without_sidecar_resumes_and_gains_one(tmp_path):
    path = tmp_path / "results.csv"
    run(path, [ok("a.jpg")], settings=None)
    assert not Path(f"{path}.settings.json").exists()
    assert run(path, [ok("b.jpg")]) == {"a.jpg"}
    assert recorded_settings(path) == SETTINGS


# -- what cannot be appended to ------------------------------------------------


@pytest.mark.parametrize("name", ["results.txt", "results.json", "results"])
def test_an_unknown_type_is_refused_listing_the_supported_ones(tmp_path, name):
    with pytest.raises(ConfigError, match=r"\.jsonl, \.csv, or -") as raised:
        inspect_result_file(tmp_path / name)
    assert not (tmp_path / name).exists()
    assert "\n" not in str(raised.value)


@pytest.mark.parametrize(("name", "content"), [
    ("results.csv", "id,name\n1,cat\n"),
    ("results.jsonl", '{"id": 1, "text": "a tweet"}\n{"id": 2, "text": "another"}\n'),
    ("results.jsonl", "plain text\n"),
])
def test_a_file_in_a_foreign_format_is_refused_and_kept(tmp_path, name, content):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(ConfigError, match="not an imgpipe results file"):
        open_result_file(path, SETTINGS)
    assert path.read_text() == content


def test_a_foreign_file_is_replaced_with_overwrite(tmp_path):
    path = tmp_path / "results.csv"
    path.write_text("id,name\n1,cat\n")
    assert run(path, [ok("a.jpg")], overwrite=True) == set()
    assert path.read_text().startswith("path,status")


@pytest.mark.parametrize("name", FORMATS)
def test_a_header_of_a_newer_format_is_refused_naming_its_file(tmp_path, name):
    path = tmp_path / name
    header = '{"imgpipe_results": 2, "settings": {}}\n'
    if name.endswith(".csv"):
        run(path, [ok("a.jpg")])
        Path(f"{path}.settings.json").write_text(header)
    else:
        path.write_text(header)
    with pytest.raises(ConfigError, match="another imgpipe version") as raised:
        open_result_file(path, SETTINGS)
    assert str(raised.value).startswith(str(path))


def test_an_empty_csv_file_is_started_as_csv(tmp_path):
    # given a .csv file that exists but holds nothing (touched, or cut to nothing)
    path = tmp_path / "results.csv"
    path.touch()
    # when a run writes to it / then it is a CSV with its header, not JSONL
    assert run(path, [ok("a.jpg")]) == set()
    assert path.read_text().splitlines()[0] == "path,status,label,index,score,predictions," \
                                               "error_code,error_message"


def test_a_blank_line_in_a_csv_file_is_no_record(tmp_path):
    path = tmp_path / "results.csv"
    run(path, [ok("a.jpg")])
    with open(path, "a") as handle:
        handle.write("\n")
    assert run(path, []) == {"a.jpg"}


@pytest.mark.parametrize(("name", "own"), [
    ("results.jsonl", ["results.jsonl", "results.jsonl.embeddings.npy"]),
    ("results.csv", ["results.csv", "results.csv.settings.json", "results.csv.embeddings.npy"])])
def test_a_run_knows_the_files_it_writes(tmp_path, name, own):
    # a run over the directory that holds its results must not score them
    found = inspect_result_file(tmp_path / name)
    assert found.own_files() == [tmp_path / file for file in own]


def test_a_results_path_that_is_a_directory_is_a_config_error(tmp_path):
    path = tmp_path / "results.jsonl"
    path.mkdir()
    with pytest.raises(ConfigError) as raised:
        inspect_result_file(path)
    assert str(raised.value) == f"cannot use results file {path}: Is a directory"


def test_a_directory_removed_before_the_file_is_opened_is_a_config_error(tmp_path):
    # given a results file checked in a directory that is gone when it is opened
    (tmp_path / "out").mkdir()
    path = tmp_path / "out" / "results.jsonl"
    found = inspect_result_file(path)
    (tmp_path / "out").rmdir()
    # when / then: a ConfigError naming the file, not an OSError
    with pytest.raises(ConfigError) as raised:
        found.open(SETTINGS)
    assert str(raised.value) == (f"cannot use results file {path}: "
                                 "No such file or directory")


# -- devices and pipes ------------------------------------------------------


def test_dev_null_takes_records_without_a_type_check_or_fsync(tmp_path):
    # /dev/null has no extension, cannot be read back for resuming, nor fsync'ed
    assert run(Path(os.devnull), [ok("a.jpg")]) == set()


def test_a_pipe_is_written_and_never_read(tmp_path):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)  # so that opening to write won't block
    try:
        run(fifo, [ok("a.jpg")])
        written = os.read(reader, 1 << 16).decode()
    finally:
        os.close(reader)
    assert [json.loads(line)["path"] for line in written.splitlines()] == ["a.jpg"]


def test_a_missing_directory_is_refused_before_anything_is_written(tmp_path):
    with pytest.raises(ConfigError, match=f"no directory {tmp_path / 'missing'}"):
        inspect_result_file(tmp_path / "missing" / "results.jsonl")


# --- embeddings beside the results ---------------------------------------------

EMBEDDING_SETTINGS = {**SETTINGS, "output": "both"}


def embedded(path: str, value: float) -> Record:
    record = ok(path)
    record["embedding"] = np.full(4, value, dtype=np.float16)
    return record


@pytest.mark.parametrize("name", FORMATS)
def test_embeddings_go_to_their_own_file_and_records_name_their_rows(
        tmp_path: Path, name: str) -> None:
    # given two runs asking for embeddings, the second resuming the first
    path = tmp_path / name
    run(path, [embedded("a.jpg", 0.25), embedded("b.jpg", 0.5)], EMBEDDING_SETTINGS)
    run(path, [embedded("c.jpg", 0.75)], EMBEDDING_SETTINGS)
    # then the vectors are rows of FILE.embeddings.npy, in order, and each record
    # names its row beside its prediction, in JSONL as in CSV
    vectors = np.load(inspect_result_file(path).embeddings)
    assert vectors[:, 0].tolist() == [0.25, 0.5, 0.75]
    if name.endswith(".csv"):
        rows = list(csv.DictReader(path.read_text(encoding="utf-8").splitlines()))
        assert [(r["path"], r["embedding_row"], r["label"]) for r in rows] == [
            ("a.jpg", "0", "cup"), ("b.jpg", "1", "cup"), ("c.jpg", "2", "cup")]
    else:
        records = lines(path)[1:]
        assert [(r["path"], r["embedding_row"]) for r in records] == [
            ("a.jpg", 0), ("b.jpg", 1), ("c.jpg", 2)]
        assert all("embedding" not in r for r in records)


def test_a_csv_row_of_an_embedding_alone_has_no_prediction_columns(tmp_path: Path) -> None:
    path = tmp_path / "results.csv"
    record = Record(path="a.jpg", status="ok", embedding=np.zeros(4, dtype=np.float16))
    run(path, [record], {**SETTINGS, "output": "embedding"})
    [row] = list(csv.DictReader(path.read_text(encoding="utf-8").splitlines()))
    assert (row["embedding_row"], row["label"], row["predictions"]) == ("0", "", "")


def test_a_run_without_embeddings_writes_no_embeddings_file(tmp_path: Path) -> None:
    path = tmp_path / "results.csv"
    run(path, [ok("a.jpg")])
    assert not inspect_result_file(path).embeddings.exists()
    assert "embedding_row" not in path.read_text(encoding="utf-8").splitlines()[0]


def test_embeddings_on_stdout_are_refused_naming_what_to_use_instead() -> None:
    with pytest.raises(ConfigError, match="use --out FILE.jsonl or FILE.csv"):
        open_result_file(Path(os.devnull), EMBEDDING_SETTINGS)


def test_a_resumed_run_whose_embeddings_file_is_gone_is_refused_naming_it(
        tmp_path: Path) -> None:
    path = tmp_path / "results.jsonl"
    run(path, [embedded("a.jpg", 0.25)], EMBEDDING_SETTINGS)
    vectors = inspect_result_file(path).embeddings
    vectors.unlink()
    with pytest.raises(ConfigError, match=f"{vectors} is missing"):
        open_result_file(path, EMBEDDING_SETTINGS)


def test_the_embeddings_file_is_among_the_files_a_run_writes(tmp_path: Path) -> None:
    for name in FORMATS:
        found = inspect_result_file(tmp_path / name)
        assert found.embeddings in found.own_files()
    assert inspect_result_file(Path(os.devnull)).own_files() == [Path(os.devnull)]


def test_a_new_results_file_starts_its_embeddings_over(tmp_path: Path) -> None:
    # given an embeddings file left from a run whose results file is gone
    path = tmp_path / "results.jsonl"
    run(path, [embedded("a.jpg", 0.25), embedded("b.jpg", 0.5)], EMBEDDING_SETTINGS)
    path.unlink()
    # when a new run starts the results file afresh
    run(path, [embedded("c.jpg", 0.75)], EMBEDDING_SETTINGS)
    # then the rows start over with it
    assert [r["embedding_row"] for r in lines(path)[1:]] == [0]
    assert np.load(inspect_result_file(path).embeddings)[:, 0].tolist() == [0.75]
