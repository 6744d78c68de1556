"""`imgpipe score --backend dali` with DALI in the inference process, against
the pool's DALI, on real photographs and a real model."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.integration.conftest import read_jsonl
from tests.truncated_jpegs import imagenet_photos

pytest.importorskip("nvidia.dali")

IN_PROCESS = {"IMGPIPE_PREPROCESS__DALI_IN_PROCESS": "on"}
POOL = {"IMGPIPE_PREPROCESS__DALI_IN_PROCESS": "off"}


def score(run, directory: Path, out: Path, env: dict[str, str]) -> dict[str, dict]:
    result = run("score", str(directory), "--backend", "dali", "--no-cache", "--out", str(out),
                 env=env)
    assert result.returncode == 0, result.stderr
    return {r["path"]: r for r in read_jsonl(out)}


@pytest.mark.skipif(not imagenet_photos(), reason="needs ../shared/data/imagenet-val-100")
def test_in_process_gives_the_pools_records_with_bad_files_among_them(
        run, samples_dir: Path, tmp_path: Path) -> None:
    # given the 100 ImageNet photographs in one directory, with an empty file,
    # noise, a JPEG cut in half and a CMYK JPEG (which DALI leaves to Pillow)
    photos = tmp_path / "photos"
    photos.mkdir()
    for path in imagenet_photos():
        shutil.copy(path, photos / path.name)
    whole = (samples_dir / "coffee.jpg").read_bytes()
    (photos / "empty.jpg").write_bytes(b"")
    (photos / "noise.jpg").write_bytes(bytes(range(256)) * 16)
    (photos / "cut.jpg").write_bytes(whole[: len(whole) // 2])
    from PIL import Image

    with Image.open(samples_dir / "coffee.jpg") as image:
        image.convert("CMYK").save(photos / "cmyk.jpg")
    # when they are scored by the pool's DALI and by DALI in the inference process
    pool = score(run, photos, tmp_path / "pool.jsonl", POOL)
    in_process = score(run, photos, tmp_path / "in_process.jsonl", IN_PROCESS)
    # then every file has the same record: the same errors, the same top-1 and
    # probabilities within 1e-3 (the same DALI operators made the same pixels)
    assert in_process.keys() == pool.keys() and len(pool) == 104
    errors = {Path(p).name: r["error"]["code"] for p, r in in_process.items()
              if r["status"] == "error"}
    assert errors == {"empty.jpg": "empty_file", "noise.jpg": "not_an_image",
                      "cut.jpg": "truncated"}
    for path, reference in pool.items():
        record = in_process[path]
        assert record["status"] == reference["status"], path
        if reference["status"] == "error":
            assert record["error"]["code"] == reference["error"]["code"], path
            continue
        assert [p["index"] for p in record["predictions"]] == \
            [p["index"] for p in reference["predictions"]], path
        for got, expected in zip(record["predictions"], reference["predictions"], strict=True):
            assert abs(got["score"] - expected["score"]) <= 1e-3, path


def test_device_hand_off_gives_the_host_hand_offs_records(
        run, samples_dir: Path, tmp_path: Path) -> None:
    # given the sample photos, a CMYK JPEG (which DALI leaves to Pillow) and a
    # file cut in half, scored by torch in batches that mix DALI's rows and Pillow's
    photos = tmp_path / "photos"
    shutil.copytree(samples_dir, photos)
    whole = (samples_dir / "coffee.jpg").read_bytes()
    (photos / "cut.jpg").write_bytes(whole[: len(whole) // 2])
    from PIL import Image

    with Image.open(samples_dir / "coffee.jpg") as image:
        image.convert("CMYK").save(photos / "cmyk.jpg")
    torch_in_process = {**IN_PROCESS, "IMGPIPE_MODEL__BACKEND": "torch"}
    # when DALI's batches reach the model as torch tensors, and as NumPy arrays
    device = score(run, photos, tmp_path / "device.jsonl",
                   {**torch_in_process, "IMGPIPE_PREPROCESS__DALI_OUTPUT": "device"})
    host = score(run, photos, tmp_path / "host.jsonl",
                 {**torch_in_process, "IMGPIPE_PREPROCESS__DALI_OUTPUT": "host"})
    # then the records are the same: the same classes, and scores that differ only
    # in the last digits (dynamic batches differ in size from run to run, and the
    # model's arithmetic with them)
    assert device.keys() == host.keys() and len(host) == len(list(photos.iterdir()))
    assert device[str(photos / "cut.jpg")]["error"]["code"] == "truncated"
    for path, reference in host.items():
        assert device[path]["status"] == reference["status"], path
        got, expected = device[path].get("predictions", []), reference.get("predictions", [])
        assert [p["index"] for p in got] == [p["index"] for p in expected], path
        for g, e in zip(got, expected, strict=True):
            assert abs(g["score"] - e["score"]) <= 1e-5, path
