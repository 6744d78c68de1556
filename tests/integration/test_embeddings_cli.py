"""Embeddings end to end: `imgpipe score --output` writing FILE.embeddings.npy and
row indices, the result cache keeping output kinds apart, and `imgpipe serve`
answering a job's `output` with base64 float16."""

from __future__ import annotations

import base64
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torchvision

from pipeline.config import RedisSettings
from pipeline.transport.client import Client
from tests.integration.conftest import read_jsonl
from tests.redis_server import RedisServer
from tests.serve_daemon import DaemonFactory

pytestmark = pytest.mark.slow
LITE0_DIM = 1280


def score(run: Any, out: Path, *inputs: Path, output: str = "both",
          env: dict[str, str] | None = None, flags: tuple[str, ...] = ("--no-cache",)) -> Any:
    result = run("score", *map(str, inputs), "--output", output, "--out", str(out),
                 "--workers", "1", *flags, env=env)
    assert result.returncode == 0, result.stderr
    return result


def vectors_by_path(out: Path) -> dict[str, np.ndarray]:
    """Each ok record's embedding, read from its row of the .npy beside `out`."""
    table = np.load(Path(f"{out}.embeddings.npy"), mmap_mode="r")
    return {record["path"]: table[record["embedding_row"]].astype(np.float32)
            for record in read_jsonl(out) if record["status"] == "ok"}


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


@pytest.fixture
def photos(samples_dir: Path, tmp_path: Path) -> Path:
    copied = tmp_path / "photos"
    shutil.copytree(samples_dir, copied)
    return copied


def test_score_rows_match_their_records_across_runs_and_resumes(run: Any, photos: Path,
                                                               tmp_path: Path) -> None:
    # given two photographs scored, then the whole directory resumed into the same file
    out = tmp_path / "results.jsonl"
    score(run, out, photos / "coffee.jpg", photos / "chelsea.jpg")
    resumed = score(run, out, photos)
    assert "skipped 2 files already in" in resumed.stderr
    # and, for reference, the directory scored afresh into a CSV file
    reference_csv = tmp_path / "reference.csv"
    score(run, reference_csv, photos, output="embedding")

    # then the .npy holds one float16 unit row per photograph, each named by one record
    table = np.load(Path(f"{out}.embeddings.npy"))
    records = [r for r in read_jsonl(out) if r["status"] == "ok"]
    assert table.dtype == np.float16 and table.shape == (6, LITE0_DIM)
    assert sorted(r["embedding_row"] for r in records) == list(range(6))
    assert np.linalg.norm(table.astype(np.float32), axis=1) == pytest.approx(1, abs=2e-3)
    assert all(r["predictions"] and "embedding" not in r for r in records)
    # and every record's row is its own photograph's vector in the other run (the
    # closest of all six), though the two runs batched them differently
    rows = vectors_by_path(out)
    reference = csv_vectors(reference_csv)
    for path, vector in rows.items():
        name = Path(path).name
        assert cosine(vector, reference[name]) > 0.999, name
        assert max(reference, key=lambda other: cosine(vector, reference[other])) == name


def csv_vectors(out: Path) -> dict[str, np.ndarray]:
    import csv

    table = np.load(Path(f"{out}.embeddings.npy"))
    with open(out, newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert all(row["predictions"] == "" for row in rows)  # embeddings alone
    return {Path(row["path"]).name: table[int(row["embedding_row"])].astype(np.float32)
            for row in rows}


def test_the_cache_keeps_logits_and_embedding_answers_apart(run: Any, samples_dir: Path,
                                                            tmp_path: Path) -> None:
    env = {"IMGPIPE_CACHE__DIR": str(tmp_path / "cache")}
    photo = samples_dir / "coffee.jpg"
    runs = [("logits", "miss"), ("embedding", "tensor:local"), ("embedding", "result:local"),
            ("logits", "result:local"), ("both", "tensor:local")]
    vectors = []
    for number, (output, answered_by) in enumerate(runs):
        out = tmp_path / f"{number}.jsonl"
        score(run, out, photo, output=output, env=env, flags=())
        (record,) = read_jsonl(out)
        assert record["cache"] == answered_by, (number, output)
        assert ("predictions" in record) == (output != "embedding"), number
        assert ("embedding_row" in record) == (output != "logits"), number
        if output != "logits":
            vectors.append(vectors_by_path(out)[str(photo)])
    # the cached embedding is the computed one, and "both" computes the same vector again
    assert vectors[0].tolist() == vectors[1].tolist()
    assert cosine(vectors[0], vectors[2]) > 0.999


DEFAULT_NOTE = ("(onnxruntime: the CPU default, checked against eager PyTorch on 6 "
                "photographs: same top-1, probabilities within ")


def imported(stderr: str) -> set[str]:
    """The modules a run with PYTHONPROFILEIMPORTTIME=1 imported."""
    return {line.rsplit("|", 1)[-1].strip() for line in stderr.splitlines()
            if line.startswith("import time:")}


def test_score_embeddings_run_on_the_checked_onnx_export_then_without_torch(
        run: Any, photos: Path, tmp_path: Path) -> None:
    # given an empty artifact store
    env = {"IMGPIPE_MODEL__ARTIFACTS_DIR": str(tmp_path / "artifacts")}

    # when embeddings are scored by default, then by eager PyTorch, then by default again
    first = score(run, tmp_path / "first.jsonl", photos, output="embedding", env=env)
    eager = score(run, tmp_path / "eager.jsonl", photos, output="embedding", env=env,
                  flags=("--no-cache", "--model-backend", "torch"))
    later = score(run, tmp_path / "later.jsonl", photos, output="embedding",
                  env={**env, "PYTHONPROFILEIMPORTTIME": "1"})

    # then the default ran the ONNX export with features, checked for them, and said so
    assert DEFAULT_NOTE in first.stderr and "features' cosine at least 0.99" in first.stderr
    assert "(torch: set by model.backend)" in eager.stderr
    # and a later start opens that export without importing torch
    assert DEFAULT_NOTE in later.stderr
    assert "onnxruntime" in imported(later.stderr) and "torch" not in imported(later.stderr)
    # and every photograph's vector is eager's, the same from both default runs
    by_default, by_eager = vectors_by_path(tmp_path / "first.jsonl"), vectors_by_path(
        tmp_path / "eager.jsonl")
    assert by_default.keys() == by_eager.keys() and len(by_default) == 6
    for path, vector in by_default.items():
        assert cosine(vector, by_eager[path]) >= 0.99, path
    assert vectors_by_path(tmp_path / "later.jsonl").keys() == by_default.keys()
    for path, vector in vectors_by_path(tmp_path / "later.jsonl").items():
        assert vector.tolist() == by_default[path].tolist(), path


def drift_the_features_output(artifact: Path) -> None:
    """Rewire the export so its `features` output is the pooled features scaled channel
    by channel at random, while the classifier still reads the true ones: the logits
    (and so the scores' check) are untouched, the features turn."""
    import onnx
    from onnx import helper, numpy_helper

    model = onnx.load(str(artifact))
    graph = model.graph
    for node in graph.node:
        node.output[:] = ["true_features" if name == "features" else name
                          for name in node.output]
        node.input[:] = ["true_features" if name == "features" else name
                         for name in node.input]
    scale = np.random.default_rng(0).uniform(0, 2, LITE0_DIM).astype(np.float32)
    graph.initializer.append(numpy_helper.from_array(scale, "drift_scale"))
    graph.node.append(helper.make_node("Mul", ["true_features", "drift_scale"], ["features"]))
    onnx.save(model, str(artifact))


def test_an_export_whose_features_drift_is_refused_for_embeddings_and_eager_runs(
        run: Any, samples_dir: Path, tmp_path: Path) -> None:
    # given the CPU default's export with features, its features output then drifted
    artifacts = tmp_path / "artifacts"
    env = {"IMGPIPE_MODEL__ARTIFACTS_DIR": str(artifacts)}
    photo = samples_dir / "coffee.jpg"
    score(run, tmp_path / "first.jsonl", photo, output="embedding", env=env)
    (artifact,) = artifacts.glob("*.onnx")
    drift_the_features_output(artifact)
    shutil.rmtree(artifacts / "checked")

    # when embeddings are scored by default again
    result = score(run, tmp_path / "again.jsonl", photo, output="embedding", env=env)

    # then the check refuses the export for embeddings, with its numbers, and eager runs
    warning = ("ONNX Runtime is not used for efficientnet_lite0: the ONNX export is refused "
               "for embeddings: features' cosine to eager fp32's: mean ")
    assert warning in result.stderr and "over 6 photographs, under 0.99" in result.stderr
    assert "(torch: eager: the ONNX export was refused (the ONNX export is refused for " \
           "embeddings: features' cosine" in result.stderr
    again, first = (vectors_by_path(tmp_path / name)[str(photo)]
                    for name in ("again.jsonl", "first.jsonl"))
    assert cosine(again, first) > 0.999
    # and scores alone still run on the default export, which they have their own of
    logits = score(run, tmp_path / "logits.jsonl", photo, output="logits", env=env)
    assert DEFAULT_NOTE in logits.stderr


def test_embeddings_run_on_what_optimize_accepted_for_them(run: Any, samples_dir: Path,
                                                           tmp_path: Path) -> None:
    from pipeline.models import load_model
    from pipeline.profiles import write_profile
    from pipeline.variants import Variant

    # given a profile whose choice (int8) was refused for embeddings, fp32 accepted
    cache, model = tmp_path / "cache", load_model()
    why = "features' cosine to eager fp32's: mean 0.9938, minimum 0.9693 over 100 " \
          "photographs, under 0.99"
    write_profile(cache, model, Variant("onnxruntime", "int8"), samples_dir, {}, {},
                  embeddings=Variant("onnxruntime"), embeddings_refused=why)
    flags = ("--no-cache", "--cache-dir", str(cache))

    # when embeddings are scored, and scores alone
    embeddings = score(run, tmp_path / "e.jsonl", samples_dir / "coffee.jpg",
                       output="embedding", flags=flags)
    logits = score(run, tmp_path / "l.jsonl", samples_dir / "coffee.jpg", output="logits",
                   flags=flags)

    # then embeddings run on the variant accepted for them, saying why; scores on int8
    assert (f"(onnxruntime: chosen by imgpipe optimize for embeddings (onnxruntime:int8 is "
            f"refused for embeddings: {why}))") in embeddings.stderr
    assert "(onnxruntime:int8: chosen by imgpipe optimize" in logits.stderr

    # and where optimize accepted none for embeddings, eager fp32 runs them
    write_profile(cache, model, Variant("onnxruntime", "int8"), samples_dir, {}, {},
                  embeddings=None, embeddings_refused=why)
    fallback = score(run, tmp_path / "f.jsonl", samples_dir / "coffee.jpg",
                     output="embedding", flags=flags)
    assert (f"(torch: eager fp32, for embeddings (onnxruntime:int8 is refused for "
            f"embeddings: {why}))") in fallback.stderr


def test_embeddings_without_a_results_file_stop_before_loading(run: Any,
                                                               samples_dir: Path) -> None:
    result = run("score", str(samples_dir / "coffee.jpg"), "--output", "embedding")
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0
    assert "--output embedding writes the embeddings to a file" in result.stderr


def test_a_model_without_a_linear_head_stops_in_one_line(run: Any, samples_dir: Path,
                                                         tmp_path: Path) -> None:
    weights = tmp_path / "squeezenet1_1.pth"
    torch.save(torchvision.models.squeezenet1_1(weights=None).state_dict(), weights)
    result = run("score", str(samples_dir / "coffee.jpg"), "--model", "squeezenet1_1",
                 "--weights", str(weights), "--output", "both", "--out",
                 str(tmp_path / "r.jsonl"), "--no-cache")
    assert result.returncode == 1
    assert result.stderr.strip().count("\n") == 0, result.stderr
    assert "squeezenet1_1 cannot give embeddings (model.output = 'both')" in result.stderr


# --- serve: a job's own output ----------------------------------------------------


def decoded(result: dict[str, Any]) -> np.ndarray:
    """The result's embedding, decoded by hand as the wire contract describes it."""
    assert result["dtype"] == "float16"
    vector = np.frombuffer(base64.b64decode(result["embedding"]), dtype="<f2")
    assert vector.shape == (int(result["dim"]),)
    return vector.astype(np.float32)


def test_serve_answers_each_jobs_output_like_score(run: Any, redis_server: RedisServer,
                                                   daemon_factory: DaemonFactory,
                                                   samples_dir: Path, tmp_path: Path) -> None:
    # given a daemon set up for embeddings, and the photograph's vector from score
    daemon_factory({"IMGPIPE_REDIS_URL": redis_server.url, "IMGPIPE_REDIS__PREFIX": "emb",
                    "IMGPIPE_PREPROCESS__WORKERS": "1", "IMGPIPE_CACHE__ENABLED": "false",
                    "IMGPIPE_MODEL__OUTPUT": "both"})
    photo = samples_dir / "coffee.jpg"
    score(run, tmp_path / "score.jsonl", photo, output="embedding")
    from_score = vectors_by_path(tmp_path / "score.jsonl")[str(photo)]

    # when jobs ask for each output kind, and for one that does not exist
    with Client(RedisSettings(url=redis_server.url, prefix="emb")) as client:
        reply = client.reply_stream()
        jobs = {output: client.submit(data=photo.read_bytes(), reply_to=reply, output=output)
                for output in ("embedding", "both", "logits")}
        jobs["bad"] = client.submit(data=photo.read_bytes(), reply_to=reply, output="vectors")
        results = client.wait(list(jobs.values()), stream=reply, timeout_s=120)
        client.delete_stream(reply)
    embedding, both, logits, bad = (results[jobs[k]] for k in ("embedding", "both", "logits",
                                                               "bad"))

    # then the embedding is score's vector, base64 float16 with its dim and dtype
    assert embedding["status"] == "ok" and embedding["dim"] == str(LITE0_DIM)
    assert "predictions" not in embedding
    assert cosine(decoded(embedding), from_score) > 0.999
    assert np.linalg.norm(decoded(embedding)) == pytest.approx(1, abs=2e-3)
    # and "both" carries the same vector with the predictions, "logits" no vector
    assert cosine(decoded(both), from_score) > 0.999
    assert both["predictions"][0]["label"] == "espresso"
    assert logits["predictions"][0]["label"] == "espresso" and "embedding" not in logits
    # and an unknown output is an invalid_field naming the field
    assert bad["status"] == "error" and bad["error"]["code"] == "invalid_field"
    assert bad["error"]["message"].startswith("field output:")
