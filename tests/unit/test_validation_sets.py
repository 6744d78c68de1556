"""Validation sets for `imgpipe optimize`: labels found and resolved, variants judged."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pipeline.backends.validation import (
    ClassNames,
    judge,
    read_wnids,
    refusal,
    validation_set,
)
from pipeline.errors import ConfigError

NAMES = ["tench", "goldfish", "great white shark", "Crane", "crane"]
WNIDS = ["n01440764", "n01443537", "n01484850", "n02012849", "n03126707"]


@pytest.fixture
def classes() -> ClassNames:
    return ClassNames("toy", NAMES, WNIDS)


def touch(directory: Path, *names: str) -> None:
    for name in names:
        (directory / name).parent.mkdir(parents=True, exist_ok=True)
        (directory / name).write_bytes(b"not decoded here")


# --- labels resolved to class indices ----------------------------------------------


def test_a_label_is_a_class_index_a_wordnet_id_or_a_class_name(classes: ClassNames) -> None:
    assert classes.index("2", "x") == 2
    assert classes.index("n01443537", "x") == 1
    assert classes.index("great white shark", "x") == 2
    assert classes.index("Great White Shark", "x") == 2  # case ignored when unambiguous
    assert classes.index("Crane", "x") == 3  # exact spelling first
    assert classes.index("5", "x") is None  # out of range
    assert classes.index("n09999999", "x") is None
    assert classes.index("dog", "x") is None


def test_a_name_for_several_classes_must_be_an_index_or_wordnet_id() -> None:
    with pytest.raises(ConfigError, match="label 'crane' names 2 classes of toy"):
        ClassNames("toy", ["crane", "crane"]).index("crane", "x")


def test_wordnet_ids_need_the_models_list() -> None:
    with pytest.raises(ConfigError, match="WordNet ids, and toy comes with no WordNet id "
                                          "list: pass --wnids FILE"):
        ClassNames("toy", NAMES).index("n01440764", "x")


def test_wordnet_ids_read_from_a_list_or_imagenets_synset_mapping(tmp_path: Path) -> None:
    plain, mapping = tmp_path / "wnids.txt", tmp_path / "LOC_synset_mapping.txt"
    plain.write_text("\n".join(WNIDS) + "\n")
    mapping.write_text("".join(f"{w} {n}, more words\n" for w, n in zip(WNIDS, NAMES,
                                                                      strict=True)))
    assert read_wnids(plain, 5) == WNIDS == read_wnids(mapping, 5)
    with pytest.raises(ConfigError, match="lists 5 WordNet ids, but the model has 1000"):
        read_wnids(plain, 1000)
    mapping.write_text("tench\n" * 5)
    with pytest.raises(ConfigError, match="'tench' is not a WordNet id"):
        read_wnids(mapping, 5)


# --- labelled sets: subdirectories or a CSV ----------------------------------------


def test_subdirectories_named_by_class_label_their_images(tmp_path: Path,
                                                          classes: ClassNames) -> None:
    touch(tmp_path, "n01440764/a.JPEG", "2/b.jpg", "goldfish/c.png", "README.md")
    found = validation_set(tmp_path, classes)
    assert found.labelled_by == "subdirectory names"
    assert dict(zip(found.files, found.labels or (), strict=True)) == {
        str(tmp_path / "n01440764/a.JPEG"): 0, str(tmp_path / "2/b.jpg"): 2,
        str(tmp_path / "goldfish/c.png"): 1}


def test_subdirectory_names_unknown_to_the_model_are_one_error(tmp_path: Path,
                                                               classes: ClassNames) -> None:
    touch(tmp_path, "tench/a.jpg", "holidays/b.jpg", "2019/c.jpg")
    with pytest.raises(ConfigError) as caught:
        validation_set(tmp_path, classes)
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith(f"--images {tmp_path} (subdirectory names): 2 labels unknown "
                              f"to toy: '2019', 'holidays'"), message
    assert "--unlabelled" in message


def test_images_beside_the_subdirectories_make_an_unlabelled_set(tmp_path: Path,
                                                                 classes: ClassNames) -> None:
    touch(tmp_path, "holidays/a.jpg", "b.jpg")
    found = validation_set(tmp_path, classes)
    assert found.labels is None and found.labelled_by == ""
    assert len(found.files) == 2


def test_unlabelled_when_asked_whatever_the_layout(tmp_path: Path) -> None:
    touch(tmp_path, "holidays/a.jpg", "labels.csv")
    found = validation_set(tmp_path, None)
    assert found.labels is None and found.files == (str(tmp_path / "holidays/a.jpg"),)


def test_a_labels_csv_beside_the_images_labels_them_by_its_first_label_column(
        tmp_path: Path, classes: ClassNames) -> None:
    touch(tmp_path, "x/a.jpg", "x/b.jpg", "c.jpg")
    (tmp_path / "labels.csv").write_text(
        "file,name,index\nx/a.jpg,tench,1\nx/b.jpg,goldfish,2\n")  # index wins over name
    found = validation_set(tmp_path, classes)
    assert found.labelled_by == "labels.csv (column index)"
    assert found.files == (str(tmp_path / "x/a.jpg"), str(tmp_path / "x/b.jpg"))
    assert found.labels == (1, 2)
    assert found.left_out == 1  # c.jpg: no row


def test_labels_csv_elsewhere_names_files_relative_to_the_images(tmp_path: Path,
                                                                 classes: ClassNames) -> None:
    images = tmp_path / "val"
    touch(images, "ILSVRC_1.JPEG", "ILSVRC_2.JPEG")
    table = tmp_path / "val_labels.csv"
    table.write_text("file,label\nILSVRC_1.JPEG,n01484850\nILSVRC_2.JPEG,Crane\n")
    found = validation_set(images, classes, table)
    assert found.labels == (2, 3) and found.labelled_by == "val_labels.csv (column label)"


def test_labels_in_a_csv_unknown_to_the_model_are_one_error(tmp_path: Path,
                                                            classes: ClassNames) -> None:
    touch(tmp_path, "a.jpg", "b.jpg")
    (tmp_path / "labels.csv").write_text("file,index\na.jpg,1234\nb.jpg,0\n")
    with pytest.raises(ConfigError, match=r"labels CSV .*labels.csv \(column index\): 1 "
                                          r"label unknown to toy: '1234' \(a label is a "
                                          r"class index \(0-4\)"):
        validation_set(tmp_path, classes)


def test_a_csv_without_a_file_or_label_column_is_refused(tmp_path: Path,
                                                         classes: ClassNames) -> None:
    touch(tmp_path, "a.jpg")
    (tmp_path / "labels.csv").write_text("path,class\na.jpg,1\n")
    with pytest.raises(ConfigError, match="needs a header with a 'file' column and one of "
                                          "index, wnid, label, name"):
        validation_set(tmp_path, classes)


def test_a_csv_labelling_none_of_the_files_is_refused(tmp_path: Path,
                                                      classes: ClassNames) -> None:
    touch(tmp_path, "a.jpg")
    (tmp_path / "labels.csv").write_text("file,index\nelsewhere/a.jpg,1\n")
    with pytest.raises(ConfigError, match="none of the 1 files under .* has a label"):
        validation_set(tmp_path, classes)


def test_a_large_set_is_sampled_across_its_classes_not_its_first_files(
        tmp_path: Path, classes: ClassNames) -> None:
    for label in range(5):
        touch(tmp_path, *(f"{label}/{i:03d}.jpg" for i in range(40)))
    found = validation_set(tmp_path, classes, limit=20)
    assert len(found.files) == 20
    assert set(found.labels or ()) == {0, 1, 2, 3, 4}
    assert validation_set(tmp_path, classes, limit=20) == found  # deterministic


# --- judging: accuracy, top-5, agreement; the two rules ---------------------------


def probabilities(*top: list[int], classes: int = 10) -> torch.Tensor:
    """One row per image, ranking the classes in `top` first (in that order), then the
    others by index."""
    rows = -torch.arange(classes, dtype=torch.float32).repeat(len(top), 1) * 0.001
    for row, ranked in enumerate(top):
        for rank, index in enumerate(ranked):
            rows[row, index] = 1.0 - rank * 0.1
    return torch.softmax(rows * 10, dim=1)


def test_judge_reports_accuracy_top5_and_agreement_on_the_same_images() -> None:
    reference = probabilities([1, 2], [3, 4], [5, 6], [7, 8])
    candidate = probabilities([1, 2], [4, 3], [6, 5], [0, 1, 2, 3, 4])
    result = judge(reference, candidate, [1, 4, 9, 4])
    assert result.images == 4
    assert result.top1_agreement == 0.25
    assert result.top1 == 0.5 and result.reference_top1 == 0.25
    assert result.top5 == 0.75 and result.reference_top5 == 0.5
    unlabelled = judge(reference, candidate)
    assert unlabelled.top1 is None and unlabelled.top1_agreement == 0.25


def test_labelled_rule_is_99_percent_of_fp32_accuracy() -> None:
    reference = probabilities(*([[1]] * 100))
    labels = [1] * 100
    ninety_nine = probabilities(*([[1]] * 99 + [[2]]))
    assert refusal(judge(reference, ninety_nine, labels)) is None  # 99% of 100%
    ninety_eight = probabilities(*([[1]] * 98 + [[2]] * 2))
    why = refusal(judge(reference, ninety_eight, labels))
    assert why == ("top-1 accuracy 98.00% is 98.00% of eager fp32's 100.00% on the same "
                   "images, under 99%")
    # agreement does not decide a labelled set: fixing fp32's mistakes is no loss
    better = judge(probabilities(*([[2]] * 50 + [[1]] * 50)), reference, labels)
    assert better.top1_agreement == 0.5 and refusal(better) is None


def test_unlabelled_rule_is_the_agreement_threshold() -> None:
    reference = probabilities(*([[1]] * 100))
    agrees_93 = judge(reference, probabilities(*([[1]] * 93 + [[2]] * 7)))
    assert refusal(agrees_93) is None  # the default threshold, 93%
    assert refusal(agrees_93, threshold=0.95) == ("top-1 agreement 93.00% under the 95.00% "
                                                  "threshold")
    agrees_92 = judge(reference, probabilities(*([[1]] * 92 + [[2]] * 8)))
    assert refusal(agrees_92) == "top-1 agreement 92.00% under the 93.00% threshold"


def test_labels_that_eager_fp32_never_matches_cannot_judge() -> None:
    reference = probabilities(*([[1]] * 100))
    result = judge(reference, reference, [2] * 100)
    assert refusal(result) == ("eager fp32 gets none of these images right: the labels "
                               "cannot judge it")
