"""Recipes and test-time augmentation end to end: `imgpipe score --tta` and
`imgpipe serve` with per-job `tta`, on the hand-checkable Halves classifier
(tests/tta_model.py), whose answers are known to the sixth digit."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from pipeline.config import RedisSettings
from pipeline.transport.client import Client
from tests.integration.conftest import read_jsonl
from tests.redis_server import RedisServer
from tests.serve_daemon import ServeProcess
from tests.tta_model import (
    HFLIP_PROBS,
    NONE_PROBS,
    halves_labels,
    halves_model,
    halves_photo,
    ranked,
)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def halves(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("halves")
    photos = root / "photos"
    photos.mkdir()
    return {"model": halves_model(root / "halves.pt"), "labels": halves_labels(root / "l.txt"),
            "photo": halves_photo(photos / "halves.png"), "photos": photos}


def score(run: Any, halves: dict[str, Path], out: Path, *flags: str,
          env: dict[str, str] | None = None) -> Any:
    result = run("score", str(halves["photos"]), "--model", str(halves["model"]), "--labels",
                 str(halves["labels"]), "--model-backend", "torch", "--workers", "1",
                 "--out", str(out), *flags, env=env)
    assert result.returncode == 0, result.stderr
    return result


def scores(record: dict[str, Any]) -> dict[str, float]:
    return {p["label"]: p["score"] for p in record["predictions"]}


def test_score_averages_the_views_and_says_so(run: Any, halves: dict[str, Path],
                                              tmp_path: Path) -> None:
    # when the half-white photograph is scored without and with hflip
    plain = score(run, halves, tmp_path / "plain.jsonl", "--no-cache")
    flipped = score(run, halves, tmp_path / "hflip.jsonl", "--no-cache", "--tta", "hflip")

    # then the plain record scores the crop alone and the hflip one the mean of the crop
    # and its mirror image, worked out by hand (tests/tta_model.py)
    (record,) = read_jsonl(tmp_path / "plain.jsonl")
    assert scores(record) == pytest.approx(dict(ranked(NONE_PROBS)), abs=2e-6)
    assert "views" not in record
    (record,) = read_jsonl(tmp_path / "hflip.jsonl")
    assert scores(record) == pytest.approx(dict(ranked(HFLIP_PROBS)), abs=2e-6)
    assert record["predictions"][0]["label"] == "right" and record["views"] == 2
    # and the summary says which recipe ran, and the views
    assert "resize 256, crop 224, bilinear (imgpipe's default: a TorchScript file carries " \
           "no recipe)" in plain.stderr
    assert "tta hflip (2 views)" in flipped.stderr and "tta" not in plain.stderr


def test_the_cache_never_serves_tta_for_plain_or_plain_for_tta(run: Any, tmp_path: Path,
                                                               halves: dict[str, Path]) -> None:
    env = {"IMGPIPE_CACHE__DIR": str(tmp_path / "cache")}
    runs = [("none", "miss"), ("hflip", "miss"), ("hflip", "result:local"),
            ("none", "result:local"), ("ten_crop", "miss")]
    for number, (mode, answered_by) in enumerate(runs):
        out = tmp_path / f"{number}.jsonl"
        score(run, halves, out, "--tta", mode, env=env)
        (record,) = read_jsonl(out)
        assert record["cache"] == answered_by, (number, mode)
        assert record.get("views", 1) == {"none": 1, "hflip": 2, "ten_crop": 10}[mode]
        probs = NONE_PROBS if mode == "none" else HFLIP_PROBS if mode == "hflip" else None
        if probs is not None:
            assert scores(record) == pytest.approx(dict(ranked(probs)), abs=2e-6)


def test_a_results_file_is_not_resumed_with_other_views(run: Any, halves: dict[str, Path],
                                                        tmp_path: Path) -> None:
    out = tmp_path / "results.jsonl"
    score(run, halves, out, "--no-cache")
    (halves["photos"] / "second.png").write_bytes(halves["photo"].read_bytes())
    try:
        again = run("score", str(halves["photos"]), "--model", str(halves["model"]),
                    "--labels", str(halves["labels"]), "--out", str(out), "--tta", "hflip")
    finally:
        (halves["photos"] / "second.png").unlink()
    assert again.returncode == 2
    assert "tta 'none' (now 'hflip')" in again.stderr


def test_too_many_views_for_the_batch_is_one_line_at_start(run: Any, halves: dict[str, Path],
                                                           tmp_path: Path) -> None:
    result = run("score", str(halves["photos"]), "--tta", "ten_crop", "--batch-size", "8")
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0
    assert "preprocess.tta = 'ten_crop'" in result.stderr and "max_batch_size" in result.stderr


def test_a_non_square_input_runs_and_gets_an_export_of_its_own(
        run: Any, halves: dict[str, Path], tmp_path: Path) -> None:
    # The CPU default (ONNX Runtime) exports once per input shape: a 224x192 crop must not
    # run the 224x224 graph, nor the other way round.
    env = {"IMGPIPE_MODEL__ARTIFACTS_DIR": str(tmp_path / "artifacts")}
    outputs = {}
    for number, crop in enumerate(("224", "224x192", "224")):
        out = tmp_path / f"{number}.jsonl"
        result = run("score", str(halves["photos"]), "--model", str(halves["model"]),
                     "--labels", str(halves["labels"]), "--no-cache", "--workers", "1",
                     "--out", str(out), "--tta", "hflip",
                     env={**env, "IMGPIPE_PREPROCESS__CROP": crop})
        assert result.returncode == 0, result.stderr
        assert "onnxruntime" in result.stderr, result.stderr
        (outputs[number],) = read_jsonl(out)
    # the photograph's halves are halves at any crop width: the same hand-worked answer
    for record in outputs.values():
        assert scores(record) == pytest.approx(dict(ranked(HFLIP_PROBS)), abs=1e-5)
    checked = sorted((tmp_path / "artifacts" / "checked").glob("*.json"))
    assert len(checked) == 2 and any(path.name.endswith("3x224x192.json") for path in checked)
    assert len(list((tmp_path / "artifacts").glob("*.onnx"))) == 2


# --- serve: a job's own tta ---------------------------------------------------------


@pytest.fixture(scope="module")
def halves_daemon(redis_server: RedisServer, halves: dict[str, Path],
                  tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServeProcess]:
    """The Halves classifier served under the prefix "tta-e2e", at most 5 views a job."""
    root = tmp_path_factory.mktemp("serve-tta")
    env = {"IMGPIPE_REDIS_URL": redis_server.url, "IMGPIPE_REDIS__PREFIX": "tta-e2e",
           "IMGPIPE_SERVE__ALLOWED_ROOTS": str(halves["photos"]),
           "IMGPIPE_PREPROCESS__WORKERS": "1", "IMGPIPE_SERVE__MAX_VIEWS": "5",
           "IMGPIPE_MODEL__NAME": str(halves["model"]),
           "IMGPIPE_MODEL__LABELS": str(halves["labels"]),
           "IMGPIPE_MODEL__BACKEND": "torch", "IMGPIPE_CACHE__DIR": str(root / "cache")}
    daemon = ServeProcess(env, root / "serve.log")
    daemon.start()
    yield daemon
    daemon.close()


@pytest.fixture
def client(redis_server: RedisServer) -> Iterator[Client]:
    with Client(RedisSettings(url=redis_server.url, prefix="tta-e2e")) as made:
        yield made


def ask(client: Client, **job: Any) -> dict[str, Any]:
    reply = client.reply_stream()
    job_id = client.submit(reply_to=reply, **job)
    results = client.wait([job_id], stream=reply, timeout_s=60)
    client.delete_stream(reply)
    assert job_id in results, f"no result for {job}"
    return results[job_id]


def test_a_job_asks_for_its_own_views(halves_daemon: ServeProcess, client: Client,
                                      halves: dict[str, Path]) -> None:
    data = halves["photo"].read_bytes() + b"\0" * 7  # bytes of their own: a fresh cache entry
    flipped = ask(client, data=data, tta="hflip")
    assert flipped["status"] == "ok" and flipped["views"] == "2"
    assert scores(flipped) == pytest.approx(dict(ranked(HFLIP_PROBS)), abs=2e-6)
    # the same bytes without tta: the daemon's own mode (none), never the hflip answer
    plain = ask(client, data=data)
    assert plain["status"] == "ok" and "views" not in plain and plain["cache"] == "miss"
    assert scores(plain) == pytest.approx(dict(ranked(NONE_PROBS)), abs=2e-6)
    again = ask(client, data=data, tta="hflip")
    assert again["cache"] == "result:local" and again["views"] == "2"
    five = ask(client, image="halves.png", tta="five_crop")
    assert five["status"] == "ok" and five["views"] == "5"


@pytest.mark.parametrize("tta, words", [
    ("twenty_crop", "not one of none, hflip, five_crop, ten_crop"),
    ("ten_crop", "at most 5 (serve.max_views)"),
])
def test_an_unknown_or_too_large_tta_is_an_error_result(halves_daemon: ServeProcess,
                                                        client: Client, tta: str,
                                                        words: str) -> None:
    result = ask(client, image="halves.png", tta=tta)
    assert result["status"] == "error"
    assert result["error"]["code"] == "invalid_field"
    assert result["error"]["message"].startswith("field tta") and words in \
        result["error"]["message"]


def test_the_daemon_keeps_serving_after_bad_tta_jobs(halves_daemon: ServeProcess,
                                                     client: Client) -> None:
    assert ask(client, image="halves.png", tta="bogus")["status"] == "error"
    assert ask(client, image="halves.png")["status"] == "ok"
    assert os.path.exists(halves_daemon.log_path)


def test_views_count_against_the_batch_size(run: Any, halves: dict[str, Path],
                                            tmp_path: Path) -> None:
    # Four photographs of ten views each, batches of at most ten views: one photograph a
    # batch. Counted in images, four would make a batch of 40 views, which the model's
    # buffers (sized for 10) cannot take.
    photos = tmp_path / "photos"
    photos.mkdir()
    for number in range(4):
        (photos / f"{number}.png").write_bytes(halves["photo"].read_bytes() + bytes(number))
    out = tmp_path / "ten.jsonl"
    result = run("score", str(photos), "--model", str(halves["model"]), "--labels",
                 str(halves["labels"]), "--model-backend", "torch", "--workers", "1",
                 "--no-cache", "--tta", "ten_crop", "--batch-size", "10",
                 "--max-delay-ms", "1000", "--out", str(out))
    assert result.returncode == 0, result.stderr
    records = read_jsonl(out)
    assert [r["status"] for r in records] == ["ok"] * 4, records
    assert all(r["views"] == 10 for r in records)
