"""The Redis wire contract: jobs parsed (never raising), results encoded and decoded."""

from __future__ import annotations

import base64
import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from pipeline.errors import InputError
from pipeline.sources.files import resolve_allowed
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
])
def test_malformed_jobs_carry_an_error_naming_the_field(
        rules: JobRules, fields: dict[str, str | bytes], code: str, named: str) -> None:
    job = parse(rules, **fields)
    assert job.error is not None
    assert job.error.code == code
    assert named in job.error.message


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
        rules: JobRules, monkeypatch: pytest.MonkeyPatch) -> None:
    def explode(*args: object) -> None:
        raise RuntimeError("a bug")

    monkeypatch.setattr(contract, "_parse_image", explode)
    job = parse(rules, id="mine", image="cat.jpg")
    assert job.error is not None and job.error.code == "internal_error"
    assert job.job_id == "mine" and "RuntimeError" in job.error.message


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
    with pytest.raises(ValueError):
        contract.job_fields(image="a", data=b"b")


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
