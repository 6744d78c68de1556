"""The Redis wire contract: jobs parsed (never raising), results encoded and decoded."""

from __future__ import annotations

import base64
import dataclasses
import json
import os
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from pipeline.errors import InputError
from pipeline.sources.files import resolve_allowed
from pipeline.sources.urls import Prefix
from pipeline.transport import contract
from pipeline.transport.contract import JobRules

NOW_MS = 1_800_000_000_000


@pytest.fixture
def root(tmp_path: Path) -> Path:
    images = tmp_path / "images"
    images.mkdir()
    (images / "cat.jpg").write_bytes(b"jpeg")
    (tmp_path / "secret.jpg").write_bytes(b"secret")
    (images / "escape.jpg").symlink_to(tmp_path / "secret.jpg")
    (images / "inside.jpg").symlink_to(images / "cat.jpg")
    return images


@pytest.fixture
def rules(root: Path) -> JobRules:
    return JobRules("efficientnet_lite0", max_topk=20, max_inline_bytes=1000,
                    allowed_roots=[str(root)], default_reply_to="p:results",
                    forbidden_reply_to=contract.Keys("p").own_streams,
                    forbidden_reply_prefixes=("p:cache:",))


def parse(rules: JobRules, **fields: str | bytes) -> contract.JobRequest:
    raw = {k.encode(): v if isinstance(v, bytes) else v.encode() for k, v in fields.items()}
    return contract.parse_job("1-0", raw, rules, NOW_MS)


def test_a_full_path_job_is_parsed(rules: JobRules, root: Path) -> None:
    job = parse(rules, v="1", image="cat.jpg", id="job-7", topk="3", reply_to="mine:results",
                deadline_ms=str(NOW_MS + 1000), model="efficientnet_lite0")
    assert job.error is None
    assert (job.image, job.job_id, job.topk, job.reply_to, job.deadline_ms) == (
        str(root / "cat.jpg"), "job-7", 3, "mine:results", NOW_MS + 1000)


def test_defaults_id_is_the_entry_id_and_results_go_to_the_default_stream(
        rules: JobRules) -> None:
    job = parse(rules, data=b"\x00\xff")
    assert job.error is None
    assert (job.job_id, job.reply_to, job.data, job.topk) == ("1-0", "p:results", b"\x00\xff",
                                                               None)


@pytest.mark.parametrize(("fields", "code", "named"), [
    ({}, "missing_field", "image"),
    ({"image": "cat.jpg", "data": "x"}, "conflicting_fields", "data"),
    ({"image": "cat.jpg", "size": "9"}, "unknown_field", "size"),
    ({"image": "cat.jpg", "topk": "0"}, "invalid_field", "topk"),
    ({"image": "cat.jpg", "topk": "21"}, "invalid_field", "topk"),
    ({"image": "cat.jpg", "topk": "2.5"}, "invalid_field", "topk"),
    ({"image": "cat.jpg", "deadline_ms": "-5"}, "invalid_field", "deadline_ms"),
    ({"image": "cat.jpg", "id": ""}, "invalid_field", "id"),
    ({"image": "cat.jpg", "id": "x" * 257}, "invalid_field", "id"),
    ({"image": "cat.jpg", "reply_to": "a b"}, "invalid_field", "reply_to"),
    ({"image": "cat.jpg", "reply_to": "p:jobs"}, "invalid_field", "reply_to"),
    ({"image": "cat.jpg", "reply_to": "p:dead"}, "invalid_field", "reply_to"),
    ({"image": "cat.jpg", "reply_to": "p:cache:r:0123:abcd"}, "invalid_field", "reply_to"),
    ({"image": "cat.jpg", "model": "resnet50"}, "unknown_model", "resnet50"),
    ({"image": "cat.jpg", "v": "2"}, "unsupported_version", "v"),
    ({"data": "x" * 1001}, "data_too_large", "1,000"),
    ({"image": b"\xff\xfe"}, "invalid_field", "image"),
    ({"image": "cat.jpg", "deadline_ms": str(NOW_MS - 1)}, contract.EXPIRED, "deadline"),
    # a valid value in too many characters: int() never sees an unbounded string
    ({"image": "cat.jpg", "topk": "0" * 32 + "1"}, "invalid_field", "topk"),
    ({"image": "cat.jpg", "tta": "sideways"}, "invalid_field", "tta"),
    ({"image": "x" * 4097}, "invalid_field", "image"),
    ({"image": "cat.jpg", "deadline_ms": str(2**63)}, "invalid_field", "deadline_ms"),
    ({"image": "cat.jpg", "deadline_ms": "0"}, contract.EXPIRED, "deadline"),
    ({"url": "https://elsewhere.example/cat.jpg"}, "url_not_allowed", "url"),
])
def test_malformed_jobs_carry_an_error_naming_the_field(
        rules: JobRules, fields: dict[str, str | bytes], code: str, named: str) -> None:
    job = parse(rules, **fields)
    assert job.error is not None
    assert job.error.code == code
    assert named in job.error.message


@pytest.mark.parametrize(("name", "value"), [
    ("id", "i" * 256),                             # the longest text
    ("deadline_ms", str(NOW_MS)),                  # due this very millisecond
    ("deadline_ms", str(2**63 - 1)),               # the largest a Redis integer holds
    ("image", "./" * 150 + "cat.jpg"),             # a path longer than other text
])
def test_values_at_the_limits_are_accepted(rules: JobRules, name: str, value: str) -> None:
    fields = {"image": "cat.jpg", name: value}
    assert parse(rules, **fields).error is None


def test_a_url_job_under_an_allowed_prefix_is_parsed(rules: JobRules) -> None:
    allowed = dataclasses.replace(rules, url_prefixes=(Prefix.parse("https://img.example/"),))
    job = parse(allowed, url="https://img.example/cat.jpg")
    assert job.error is None and job.url == "https://img.example/cat.jpg"
    # URLs run longer than other text fields
    long_url = "https://img.example/" + "c" * 300 + ".jpg"
    assert parse(allowed, url=long_url).url == long_url
    assert (job.image, job.data) == (None, None)


def test_a_dead_letters_address_is_read_alone_and_never_raises(rules: JobRules) -> None:
    raw = {b"id": b"mine", b"reply_to": b"me:results", b"image": b"\xff"}
    job = contract.parse_address("1-0", raw, rules)
    assert (job.job_id, job.reply_to, job.image, job.error) == ("mine", "me:results", None,
                                                                 None)
    # a reply_to the daemon refuses leaves the default, and the id it could read
    job = contract.parse_address("1-0", {b"id": b"mine", b"reply_to": b"p:jobs"}, rules)
    assert (job.job_id, job.reply_to) == ("mine", "p:results")


@pytest.mark.parametrize("topk", ["1", "20"])
def test_topk_from_one_to_the_limit_is_accepted(rules: JobRules, topk: str) -> None:
    job = parse(rules, image="cat.jpg", topk=topk)
    assert job.error is None and job.topk == int(topk)


def test_tta_may_ask_for_at_most_the_daemons_views(rules: JobRules) -> None:
    five = dataclasses.replace(rules, max_views=5)
    assert parse(five, image="cat.jpg", tta="five_crop").tta == "five_crop"
    refused = parse(five, image="cat.jpg", tta="ten_crop").error
    assert refused is not None and refused.code == "invalid_field"
    assert "at most 5" in refused.message


def test_a_non_utf8_field_name_is_an_error_not_a_crash(rules: JobRules) -> None:
    job = contract.parse_job("1-0", {b"\xff": b"1", b"image": b"cat.jpg"}, rules, NOW_MS)
    assert job.error is not None and job.error.code == "invalid_field"


def test_inline_data_of_exactly_the_limit_is_accepted(rules: JobRules) -> None:
    job = parse(rules, data=b"x" * rules.max_inline_bytes)
    assert job.error is None and job.data is not None
    assert len(job.data) == rules.max_inline_bytes


def test_a_forbidden_reply_to_sends_the_error_to_the_default_stream(rules: JobRules) -> None:
    job = parse(rules, id="mine", reply_to="p:jobs", image="cat.jpg")
    assert (job.job_id, job.reply_to) == ("mine", "p:results")


def test_an_unforeseen_failure_while_parsing_is_an_internal_error(
        rules: JobRules, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    def explode(*args: object) -> None:
        raise RuntimeError("a bug")

    monkeypatch.setattr(contract, "_parse_image", explode)
    with caplog.at_level("ERROR", "imgpipe.serve"):
        job = parse(rules, id="mine", image="cat.jpg")
    assert job.error is not None and job.error.code == "internal_error"
    assert job.job_id == "mine" and "RuntimeError" in job.error.message
    # and the log says which entry, for the job's logs too
    [logged] = caplog.records
    assert logged.getMessage() == "job entry 1-0 could not be parsed"
    assert logged.job_id == "mine"  # type: ignore[attr-defined]


def test_a_link_that_cannot_be_read_is_refused_not_raised() -> None:
    try:
        os.path.realpath("/proc/1/exe")
    except OSError:
        pass
    else:
        pytest.skip("process 1's executable link is readable here")
    with pytest.raises(InputError) as refused:
        resolve_allowed("/proc/1/exe", ["/"])
    assert refused.value.code == "permission_denied"
    assert "cannot be resolved" in refused.value.message


def test_a_malformed_job_still_knows_where_its_result_goes(rules: JobRules) -> None:
    job = parse(rules, id="mine", reply_to="me:results", topk="lots", image="cat.jpg")
    assert job.error is not None
    assert (job.job_id, job.reply_to) == ("mine", "me:results")


@pytest.mark.parametrize("path", ["/etc/passwd", "../secret.jpg", "escape.jpg",
                                  "cat.jpg\x00.png", "{root}/../secret.jpg"])
def test_paths_outside_the_roots_are_refused(root: Path, path: str) -> None:
    with pytest.raises(InputError) as refused:
        resolve_allowed(path.format(root=root), [str(root)])
    assert refused.value.code == "path_not_allowed"


def test_paths_inside_the_roots_resolve_to_real_paths(root: Path) -> None:
    assert resolve_allowed("inside.jpg", [str(root)]) == str(root / "cat.jpg")
    assert resolve_allowed(str(root / "sub" / ".." / "cat.jpg"), [str(root)]) == \
        str(root / "cat.jpg")


def test_a_root_is_not_a_prefix_of_its_sibling(tmp_path: Path) -> None:
    (tmp_path / "images-private").mkdir()
    with pytest.raises(InputError):
        resolve_allowed(str(tmp_path / "images-private" / "x.jpg"), [str(tmp_path / "images")])


def test_without_roots_path_jobs_are_refused_with_a_hint() -> None:
    with pytest.raises(InputError, match="allowed_roots"):
        resolve_allowed("/anything.jpg", [])


def test_job_fields_round_trip_through_the_parser(rules: JobRules, root: Path) -> None:
    fields = contract.job_fields(image=str(root / "cat.jpg"), job_id="a", topk=2)
    raw = {k.encode(): v if isinstance(v, bytes) else v.encode() for k, v in fields.items()}
    job = contract.parse_job("5-0", raw, rules, NOW_MS)
    assert job.error is None and (job.job_id, job.topk) == ("a", 2)
    with pytest.raises(ValueError, match="exactly one"):
        contract.job_fields(image="a", data=b"b")


def test_every_field_the_client_writes_is_one_the_daemon_reads(rules: JobRules) -> None:
    # given a job with every optional field, its image inline
    fields = contract.job_fields(data=b"\x00\xff", job_id="a", topk=2, reply_to="me:results",
                                 deadline_ms=NOW_MS + 1, model="efficientnet_lite0",
                                 tta="hflip")
    # then each is under the contract's name, bytes kept as bytes, the rest as text
    assert fields == {"v": "1", "data": b"\x00\xff", "id": "a", "topk": "2",
                      "reply_to": "me:results", "deadline_ms": str(NOW_MS + 1),
                      "model": "efficientnet_lite0", "tta": "hflip"}
    # and the daemon's parser takes every one of them
    raw = {k.encode(): v if isinstance(v, bytes) else v.encode() for k, v in fields.items()}
    job = contract.parse_job("5-0", raw, rules, NOW_MS)
    assert job.error is None
    assert (job.data, job.job_id, job.topk, job.reply_to, job.deadline_ms, job.tta) == (
        b"\x00\xff", "a", 2, "me:results", NOW_MS + 1, "hflip")
    assert contract.job_fields(url="https://images.example/cat.jpg") == {
        "v": "1", "url": "https://images.example/cat.jpg"}
    # and a job asking for its embedding says so under `output`
    fields = contract.job_fields(image="cat.jpg", output="both")
    assert fields == {"v": "1", "image": "cat.jpg", "output": "both"}
    raw = {k.encode(): v.encode() for k, v in fields.items()}
    embedding_rules = replace(rules, outputs=("logits", "embedding", "both"))
    assert contract.parse_job("6-0", raw, embedding_rules, NOW_MS).output == "both"


def test_a_late_job_is_told_how_late_it_is(rules: JobRules) -> None:
    job = contract.parse_job("1-0", {b"image": b"cat.jpg", b"deadline_ms": b"1000"}, rules,
                             now_ms=1250)
    assert job.error is not None and "deadline passed 250 ms" in job.error.message


def test_an_embedding_of_another_dtype_is_refused_naming_it() -> None:
    with pytest.raises(ValueError, match="embedding dtype 'float32'"):
        contract.embedding_of({"embedding": "AAA=", "dim": "1", "dtype": "float32"})


def test_results_encode_to_text_fields_and_decode_back(rules: JobRules) -> None:
    job = parse(rules, image="cat.jpg", id="j")
    ok = {"status": "ok", "model": "m", "predictions": [{"label": "cat", "index": 1,
                                                         "score": 0.9}],
          "timings_ms": {"preprocess": 1.5}, "cache": "tensor:local"}
    fields = contract.result_fields(ok, job, "m", queue_wait_ms=2.25)
    assert all(isinstance(value, str) for value in fields.values())
    decoded = contract.decode_result({k.encode(): v.encode() for k, v in fields.items()})
    assert decoded["predictions"] == ok["predictions"]
    assert decoded["timings_ms"] == {"queue_wait": 2.25, "preprocess": 1.5}
    assert (decoded["job_id"], decoded["entry_id"], decoded["cache"]) == ("j", "1-0",
                                                                          "tensor:local")


def test_a_result_decodes_from_text_as_from_bytes_and_never_raises_on_bad_utf8() -> None:
    # a client may connect with decode_responses=True (text), and a result's text
    # fields echo what a job sent, which need not be UTF-8
    text = {"job_id": "j", "predictions": "[]", "status": "ok"}
    assert contract.decode_result(text) == {"job_id": "j", "predictions": [], "status": "ok"}
    assert contract.decode_result({b"job_id": b"caf\xe9"}) == {"job_id": "caf\ufffd"}


def test_result_fields_are_compact_and_complete(rules: JobRules) -> None:
    # given an ok record with its views but no cache outcome, under another model
    job = parse(rules, image="cat.jpg", id="j")
    record = {"status": "ok", "model": "other", "views": 5, "timings_ms": {},
              "predictions": [{"label": "cat", "index": 1, "score": 0.5}]}
    # when it is encoded
    fields = contract.result_fields(record, job, "m", queue_wait_ms=1.23456)
    # then JSON is compact, the record's model and views stand, and a missing cache
    # outcome is a miss
    assert fields["predictions"] == '[{"label":"cat","index":1,"score":0.5}]'
    assert fields["timings_ms"] == '{"queue_wait":1.235}'
    assert (fields["model"], fields["views"], fields["cache"]) == ("other", "5", "miss")
    assert (fields["v"], fields["status"]) == ("1", "ok")
    error = {"status": "error", "error": {"code": "x", "message": "y"}}
    assert contract.result_fields(error, job, "m", 0.0)["error"] == '{"code":"x","message":"y"}'


def test_reply_text_takes_bytes_text_and_numbers() -> None:
    assert [contract.reply_text(v) for v in (b"1-0", b"caf\xe9", "c", 7)] == [
        "1-0", "caf\ufffd", "c", "7"]


def test_an_expired_job_gets_status_expired(rules: JobRules) -> None:
    job = parse(rules, image="cat.jpg", deadline_ms="1")
    assert job.error is not None
    record = {"status": "error", "error": {"code": job.error.code, "message": "late"}}
    fields = contract.result_fields(record, job, "m", 0.0)
    assert fields["status"] == "expired"
    assert json.loads(fields["error"])["code"] == contract.EXPIRED


def test_keys_share_the_prefix() -> None:
    keys = contract.Keys("fleet-a")
    assert (keys.jobs, keys.results, keys.dead) == ("fleet-a:jobs", "fleet-a:results",
                                                    "fleet-a:dead")


def test_output_is_parsed_where_the_daemon_gives_embeddings(rules: JobRules) -> None:
    embedding_rules = dataclasses.replace(rules, outputs=("logits", "embedding", "both"))
    assert parse(embedding_rules, data=b"x", output="embedding").output == "embedding"
    assert parse(embedding_rules, data=b"x").output is None  # the daemon's own


@pytest.mark.parametrize(("output", "outputs", "says"), [
    ("vectors", ("logits", "embedding", "both"), "'vectors' is not one of"),
    ("embedding", ("logits",), "this daemon answers logits"),
])
def test_an_output_the_daemon_cannot_give_is_an_invalid_field(
        rules: JobRules, output: str, outputs: tuple[str, ...], says: str) -> None:
    job = parse(dataclasses.replace(rules, outputs=outputs), data=b"x", output=output)
    assert job.error is not None and job.error.code == "invalid_field"
    assert job.error.message.startswith("field output:") and says in job.error.message


def test_an_embedding_result_is_base64_float16_with_its_dim_and_dtype(rules: JobRules) -> None:
    # given an ok record carrying an embedding and no predictions
    vector = np.array([0.6, -0.8, 0.0, 1e-3], dtype=np.float16)
    record: Any = {"path": "x", "status": "ok", "model": "m", "embedding": vector,
                   "timings_ms": {}}
    job = parse(rules, data=b"x")

    # when it is encoded as a result entry
    fields = contract.result_fields(record, job, "m", 1.0)

    # then the bytes are the little-endian float16 values, with their count and type
    assert (fields["dim"], fields["dtype"]) == ("4", "float16")
    assert np.frombuffer(base64.b64decode(fields["embedding"]), "<f2").tolist() == \
        vector.tolist()
    assert "predictions" not in fields
    decoded = contract.decode_result({k.encode(): v.encode() for k, v in fields.items()})
    assert contract.embedding_of(decoded).tolist() == vector.tolist()
