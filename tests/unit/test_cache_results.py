"""The result cache serves only what can be a top-k answer."""

from __future__ import annotations

import pytest

from pipeline.cache.codec import CorruptEntry
from pipeline.cache.results import top_k_of

TOP3 = [{"label": "espresso", "index": 967, "score": 0.9},
        {"label": "cup", "index": 968, "score": 0.05},
        {"label": "eggnog", "index": 969, "score": 0.01}]
# Every class of a two-class model, scores rounded as the model's output is.
BOTH_CLASSES = [{"label": "cat", "index": 1, "score": 0.731059},
                {"label": "dog", "index": 0, "score": 0.268941}]


def test_exactly_top_k_predictions_are_served() -> None:
    assert top_k_of(TOP3, 3) == TOP3


@pytest.mark.parametrize("predictions", [TOP3[:1], TOP3[:2], []])
def test_fewer_predictions_than_top_k_are_refused(predictions) -> None:
    with pytest.raises(CorruptEntry, match="top-3"):
        top_k_of(predictions, 3)


def test_more_predictions_than_top_k_are_refused() -> None:
    with pytest.raises(CorruptEntry):
        top_k_of(TOP3, 2)


def test_every_class_of_a_model_with_fewer_classes_than_top_k_is_served() -> None:
    assert top_k_of(BOTH_CLASSES, 5) == BOTH_CLASSES


@pytest.mark.parametrize("predictions", [
    [{**BOTH_CLASSES[0], "score": 0.6}, BOTH_CLASSES[1]],        # scores do not add up to 1
    [BOTH_CLASSES[0], {**BOTH_CLASSES[1], "index": 2}],          # not classes 0 and 1
])
def test_fewer_predictions_that_are_not_every_class_are_refused(predictions) -> None:
    with pytest.raises(CorruptEntry):
        top_k_of(predictions, 5)
