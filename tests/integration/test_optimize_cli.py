"""`imgpipe optimize`: variants judged on real photographs, the fastest accepted one
written down; score then uses it.

The photographs are ../shared/data/imagenet-val-100 (100 ImageNet validation images,
one class in ten); the tests skip where that folder is absent.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from pipeline import plans
from pipeline.cores import usable_cores

ROOT = Path(__file__).resolve().parents[2]
IMAGENET_VAL_100 = ROOT.parent / "shared" / "data" / "imagenet-val-100"


@pytest.fixture(scope="module")
def photos() -> Path:
    if not (IMAGENET_VAL_100 / "labels.csv").is_file():
        pytest.skip(f"{IMAGENET_VAL_100} is absent")
    return IMAGENET_VAL_100


@pytest.fixture(scope="module")
def one_rocket(samples_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Calibration images that break int8: one photograph of a rocket. Its activation
    ranges do not fit ImageNet photographs (agreement with fp32 ~82%, top-1 ~80%
    against fp32's 89% on imagenet-val-100). One directory for the module: one int8 build."""
    folder = tmp_path_factory.mktemp("one_rocket")
    shutil.copy(samples_dir / "rocket.jpg", folder)
    return folder


def rows(stdout: str) -> dict[str, str]:
    """The table's rows by variant (the lines after the header)."""
    lines = stdout.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("variant "))
    return {line.split()[0]: line for line in lines[header + 1:]
            if line and not line.startswith(("chosen:", "the validation set"))}


def columns(row: str) -> list[str]:
    """variant, images, top-1, top-5, agree, drift, images/s, p50, 'ms', cos mean,
    cos min, verdict..."""
    return row.split()


def test_labelled_photos_accept_by_accuracy_and_refuse_a_variant_that_loses_it(
        run, photos: Path, one_rocket: Path, samples_dir: Path, tmp_path: Path) -> None:
    # given a labelled set (labels.csv) and int8 calibrated on a photograph unlike them
    cache = tmp_path / "cache"

    # when optimize judges ONNX fp32 and that int8 against eager fp32
    result = run("optimize", "--images", str(photos), "--backends", "onnxruntime",
                 "onnxruntime:int8", "--calibration-images", str(one_rocket),
                 "--seconds", "0.2", "--cache-dir", str(cache), "--plan-images", "40")

    # then both are judged on the 100 labelled photos, with accuracy, top-5, agreement ...
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert f"validation: 100 images of {photos}, labelled by labels.csv (column index)" in out
    reference, reference_top5 = (out.split("eager fp32 (the reference): top-1 ")[1]
                                 .split("\n")[0].split(", top-5 "))
    assert "rule: top-1 accuracy at least 99% of eager fp32's on the same images" in out
    table = rows(out)
    fp32 = columns(table["onnxruntime"])
    assert fp32[1:5] == ["100", reference, reference_top5, "100.00%"], fp32
    assert fp32[-1] == "ok"
    # ... the int8 that loses accuracy is refused by the 99% rule, saying by how much ...
    int8 = columns(table["onnxruntime:int8"])
    top1 = float(int8[2].rstrip("%"))
    assert int8[1] == "100" and top1 < 0.99 * float(reference.rstrip("%")), int8
    assert (f"refused: top-1 accuracy {int8[2]} is " in table["onnxruntime:int8"]
            and f"of eager fp32's {reference} on the same images, under 99%"
            in table["onnxruntime:int8"])
    assert float(int8[4].rstrip("%")) < 100  # and its agreement is shown

    # ... the accepted one is chosen and written down, with what it was judged on ...
    assert "chosen: onnxruntime (used by score" in out
    (profile_file,) = (cache / "profiles").glob("*.json")
    profile = json.loads(profile_file.read_text())
    assert (profile["backend"], profile["precision"]) == ("onnxruntime", "fp32")
    assert profile["validation"]["judged"] == 100
    assert profile["validation"]["min_accuracy_ratio"] == 0.99
    assert profile["measured"]["top1"] == profile["measured"]["reference_top1"]

    # ... with the batch and thread plan measured fastest with it, end to end ...
    measured = out.split("plans, end to end with onnxruntime over 40 images:\n")[1]
    listed = [line for line in measured.splitlines() if line.startswith("  batch ")]
    assert len(listed) == len(plans.candidates(usable_cores()))
    plan = plans.Plan.from_json(profile["plan"])
    assert plan is not None and f"plan: {plan.describe()} (used by score" in out
    assert round(plan.images_per_s, 1) == max(float(line.split()[-2]) for line in listed)

    # ... and score (model.backend = auto) runs both, without importing torch
    scored = run("score", str(samples_dir), "--cache-dir", str(cache),
                 env={"PYTHONPROFILEIMPORTTIME": "1"})
    assert scored.returncode == 0, scored.stderr
    assert f"(onnxruntime: chosen by imgpipe optimize; {plan.describe()})" in scored.stderr
    imported = {line.rsplit("|", 1)[-1].strip() for line in scored.stderr.splitlines()
                if line.startswith("import time:")}
    assert "onnxruntime" in imported and "torch" not in imported

    # and once the profile names another variant, that one runs instead
    profile_file.write_text(json.dumps({**profile, "backend": "torch"}))
    # (with the plan's threads unless the settings name theirs)
    rescored = run("score", str(samples_dir), "--cache-dir", str(cache), "--no-cache",
                   env={"IMGPIPE_MODEL__THREADS": "3"})
    assert rescored.returncode == 0, rescored.stderr
    mine = plans.Plan(plan.workers, 3, plan.max_batch_size)
    assert f"(torch: chosen by imgpipe optimize; {mine.describe()})" in rescored.stderr


def test_unlabelled_photos_are_judged_on_agreement_with_fp32(
        run, photos: Path, one_rocket: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    result = run("optimize", "--images", str(photos), "--unlabelled", "--backends",
                 "onnxruntime", "onnxruntime:int8", "--calibration-images", str(one_rocket),
                 "--seconds", "0.2", "--plan-images", "0", "--cache-dir", str(cache))

    assert result.returncode == 0, result.stderr
    assert f"validation: 100 images of {photos}, unlabelled" in result.stdout
    assert "rule: top-1 agreement with eager fp32 at least 93%" in result.stdout
    table = rows(result.stdout)
    fp32, int8 = columns(table["onnxruntime"]), columns(table["onnxruntime:int8"])
    assert fp32[1:5] == ["100", "-", "-", "100.00%"] and fp32[-1] == "ok"
    assert int8[1:4] == ["100", "-", "-"]
    assert f"refused: top-1 agreement {int8[4]} under the 93.00% threshold" \
        in table["onnxruntime:int8"]
    profile = json.loads(next((cache / "profiles").glob("*.json")).read_text())
    assert profile["precision"] == "fp32" and profile["validation"]["threshold"] == 0.93
    # and the features were judged too: ONNX Runtime fp32's are eager's, so it is the
    # variant for embeddings as well
    assert fp32[9:11] == ["1.0000", "1.0000"], fp32
    assert "embeddings: onnxruntime (features' cosine to eager fp32's at least 0.99, mean " \
           "and minimum)" in result.stdout
    assert profile["embeddings"] == {"backend": "onnxruntime", "precision": "fp32"}
    assert profile["embeddings_refused"] == ""


def test_a_set_too_small_to_decide_says_so_and_writes_nothing(
        run, photos: Path, tmp_path: Path) -> None:
    # given 20 labelled photographs
    few = tmp_path / "few"
    header, *rows_ = (photos / "labels.csv").read_text().splitlines()
    for row in rows_[:20]:
        (few / row.split(",")[0]).parent.mkdir(parents=True)
        shutil.copy(photos / row.split(",")[0], few / row.split(",")[0])
    (few / "labels.csv").write_text("\n".join([header, *rows_[:20]]) + "\n")
    cache = tmp_path / "cache"

    result = run("optimize", "--images", str(few), "--backends", "torch", "--seconds", "0.1",
                 "--plan-images", "0", "--cache-dir", str(cache))

    assert result.returncode == 1
    assert "labelled by labels.csv (column index)" in result.stdout
    assert "undecided: judged on 20 images, fewer than the 100 needed; on these it would " \
           "be accepted" in rows(result.stdout)["torch"]
    assert "the validation set is too small to decide: 20 images, at least 100 are " \
           "needed" in result.stdout
    assert "judged on too few images to decide); nothing written" in result.stderr
    assert not (cache / "profiles").exists()


def test_int8_is_never_judged_on_its_calibration_images(
        run, photos: Path, tiny_model: Path, tmp_path: Path) -> None:
    # given only the validation set: int8 would calibrate on its first 128 files, all of it
    cache = tmp_path / "cache"
    result = run("optimize", "--model", str(tiny_model), "--images", str(photos),
                 "--unlabelled", "--backends", "onnxruntime:int8", "--seconds", "0.1",
                 "--plan-images", "0", "--cache-dir", str(cache))

    assert result.returncode == 1
    assert f"int8 calibrates on --images {photos} (its first 128 files in path order: " \
           "101 here) and is never judged on those" in result.stdout
    row = rows(result.stdout)["onnxruntime:int8"]
    assert "undecided: judged on 0 images, fewer than the 100 needed (100 of the " \
           "validation images calibrate it: pass --calibration-images DIR with other " \
           "photographs)" in row, row
    assert not (cache / "profiles").exists()


def test_a_variant_over_the_latency_target_is_refused(run, photos: Path, tiny_model: Path,
                                                      tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    result = run("optimize", "--model", str(tiny_model), "--images", str(photos),
                 "--unlabelled", "--backends", "torch", "--latency-ms", "0.0001",
                 "--seconds", "0.1", "--plan-images", "0", "--cache-dir", str(cache))
    assert result.returncode == 1
    assert "refused: batch-of-one p50" in result.stdout
    assert not (cache / "profiles").exists()


def test_a_folder_without_images_is_a_one_line_error(run, tiny_model: Path,
                                                     tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "readme.txt").write_text("no photographs here\n")
    for folder, why in (("empty", "holds no images"),
                        ("notes", "holds no images: its one file does not decode as an "
                                  "image")):
        result = run("optimize", "--model", str(tiny_model), "--images",
                     str(tmp_path / folder), "--cache-dir", str(tmp_path / "cache"))
        assert result.returncode == 2, result.stderr
        assert result.stderr == f"imgpipe: error: --images {tmp_path / folder} {why}\n"


def test_labels_unknown_to_the_model_are_a_one_line_error(run, photos: Path,
                                                          tiny_model: Path,
                                                          tmp_path: Path) -> None:
    # given photographs in subdirectories that name no ImageNet class, and a CSV of indices
    a_photo = next(photos.glob("n*/*"))
    (tmp_path / "by_folder" / "holidays").mkdir(parents=True)
    shutil.copy(a_photo, tmp_path / "by_folder" / "holidays" / "a.jpg")
    (tmp_path / "by_csv").mkdir()
    shutil.copy(a_photo, tmp_path / "by_csv" / "a.jpg")
    (tmp_path / "by_csv" / "labels.csv").write_text("file,index\na.jpg,1000\n")

    for folder, why in (
            ("by_folder", "(subdirectory names): 1 label unknown to {model}: 'holidays'"),
            ("by_csv", "labels.csv (column index): 1 label unknown to {model}: '1000'")):
        result = run("optimize", "--model", str(tiny_model), "--images",
                     str(tmp_path / folder), "--cache-dir", str(tmp_path / "cache"))
        assert result.returncode == 2, result.stderr
        assert result.stderr.count("\n") == 1, result.stderr
        assert why.format(model=tiny_model) in result.stderr, result.stderr


def test_wordnet_id_folders_need_a_wordnet_id_list(run, photos: Path, tiny_model: Path,
                                                   tmp_path: Path) -> None:
    # given the ImageNet validation layout without its labels.csv
    layout = tmp_path / "val"
    folder = next(p for p in photos.iterdir() if p.is_dir())
    shutil.copytree(folder, layout / folder.name)

    result = run("optimize", "--model", str(tiny_model), "--images", str(layout),
                 "--plan-images", "0", "--cache-dir", str(tmp_path / "cache"))

    assert result.returncode == 2
    assert f"are WordNet ids, and {tiny_model} comes with no WordNet id list: pass " \
           "--wnids FILE" in result.stderr
    wnids = photos.parent / "imagenet-wnids.txt"
    if wnids.is_file():  # with the list, they label the photographs (too few to decide)
        result = run("optimize", "--model", str(tiny_model), "--images", str(layout),
                     "--wnids", str(wnids), "--backends", "torch", "--seconds", "0.1",
                     "--plan-images", "0", "--cache-dir", str(tmp_path / "cache"))
        assert result.returncode == 1, result.stderr
        assert "validation: 1 image of" in result.stdout
        assert "labelled by subdirectory names" in result.stdout
