"""The batch and thread plan: candidates, and a profile's plan applied to settings."""

from __future__ import annotations

from pipeline import plans
from pipeline.config import load_settings
from pipeline.plans import Plan


def test_candidates_split_the_cores_at_each_batch_size():
    two = plans.candidates(2)
    assert {(p.workers, p.threads) for p in two} == {(2, 2), (2, 1), (1, 1)}
    assert {p.max_batch_size for p in two} == {1, 8, 32}
    assert {(p.workers, p.threads) for p in plans.candidates(16)} == {
        (16, 16), (16, 1), (15, 1), (8, 8)}
    assert {(p.workers, p.threads) for p in plans.candidates(1)} == {(1, 1)}


def test_a_plan_fills_the_settings_left_at_their_defaults():
    settings = plans.applied(load_settings(environ={}), Plan(3, 1, 8))
    assert (settings.preprocess.workers, settings.model.threads,
            settings.batching.max_batch_size) == (3, 1, 8)


def test_settings_that_name_their_values_keep_them():
    mine = load_settings(environ={}, overrides={"preprocess.workers": 2, "model.threads": 4,
                                                "batching.max_batch_size": 64})
    settings = plans.applied(mine, Plan(3, 1, 8))
    assert (settings.preprocess.workers, settings.model.threads,
            settings.batching.max_batch_size) == (2, 4, 64)


def test_a_batch_never_holds_fewer_rows_than_one_image_has_views():
    ten_crop = load_settings(environ={}, overrides={"preprocess.tta": "ten_crop"})
    assert plans.applied(ten_crop, Plan(1, 1, 1)).batching.max_batch_size == 10


def test_a_damaged_plan_is_no_plan():
    assert Plan.from_json({"workers": 2, "threads": 1, "max_batch_size": 8}) == Plan(2, 1, 8)
    for damaged in (None, {}, {"workers": "x", "threads": 1, "max_batch_size": 8},
                    {"workers": 0, "threads": 1, "max_batch_size": 8}):
        assert Plan.from_json(damaged) is None
