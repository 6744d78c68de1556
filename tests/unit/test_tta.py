"""Test-time augmentation: the views and their order, one decode per image,
averaging the views' probabilities, views counted in batches, and the cache
and the wire contract keeping TTA and plain results apart."""

from __future__ import annotations

import queue
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms

from pipeline.backends import TorchBackend
from pipeline.batching import END, Batcher
from pipeline.cache.keys import tensor_key
from pipeline.cache.lookup import CacheLookup, ResultScope
from pipeline.config import CacheSettings
from pipeline.errors import InputError
from pipeline.inference import InferenceLoop
from pipeline.items import Job, Prepared
from pipeline.models import LoadedModel
from pipeline.predictions import mean_over_views
from pipeline.preprocess import pillow
from pipeline.preprocess.pillow import PillowBackend, preprocess
from pipeline.recipes import IMAGENET_MEAN, IMAGENET_STD
from pipeline.spec import TTA_VIEWS, InputLimits, PreprocessSpec, View, tta_views, views_digest
from pipeline.transport import contract
from tests.tta_model import (
    HFLIP_PROBS,
    LABELS,
    MIRRORED_PROBS,
    NONE_PROBS,
    halves_module,
    halves_photo,
    ranked,
)

LIMITS = InputLimits()


def mean_abs_diff(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.int16) - b.astype(np.int16)).mean())


# --- the views ----------------------------------------------------------------


def test_the_views_of_each_mode_in_order() -> None:
    corners = ("top_left", "top_right", "bottom_left", "bottom_right", "centre")
    assert tta_views("none") == (View("centre"),)
    assert tta_views("hflip") == (View("centre"), View("centre", mirrored=True))
    assert tta_views("five_crop") == tuple(View(region) for region in corners)
    assert tta_views("ten_crop") == (tuple(View(region) for region in corners)
                                     + tuple(View(region, True) for region in corners))
    assert {mode: len(tta_views(mode)) for mode in TTA_VIEWS} == TTA_VIEWS
    with pytest.raises(ValueError, match="tta"):
        tta_views("twenty_crop")


@pytest.mark.parametrize("spec", [PreprocessSpec(), PreprocessSpec(256, 224, crop_width=160),
                                  PreprocessSpec(232, 200, "bicubic", crop_width=224)],
                         ids=["224", "224x160", "200x224-bicubic"])
def test_pillow_views_are_torchvisions_ten_crop(samples_dir: Path, encode,
                                                spec: PreprocessSpec) -> None:
    # given a lossless photograph (no JPEG draft decoding) and torchvision's reference
    with Image.open(samples_dir / "chelsea.jpg") as source:
        photo = source.convert("RGB")
    data = encode(photo, "PNG")
    resized = transforms.Resize(spec.resize_shorter, transforms.InterpolationMode(
        spec.interpolation))(photo)
    tv_five = [np.asarray(view).transpose(2, 0, 1)
               for view in transforms.FiveCrop(spec.crop_size)(resized)]

    # when the pillow backend cuts ten views
    views = preprocess(data, spec, LIMITS, "ten_crop")

    # then the first five are FiveCrop's (corners, then the centre), the last five
    # their mirror images in the same order
    assert views.shape == (10, *spec.output_shape)
    for index, reference in enumerate(tv_five):
        assert mean_abs_diff(views[index], reference) <= 2, index
        assert mean_abs_diff(views[5 + index], reference[:, :, ::-1]) <= 2, index


def test_mirrored_views_are_exact_mirror_images(samples_dir: Path) -> None:
    data = (samples_dir / "coffee.jpg").read_bytes()
    plain = preprocess(data, PreprocessSpec(), LIMITS)
    hflip = preprocess(data, PreprocessSpec(), LIMITS, "hflip")
    assert np.array_equal(hflip[0], plain)
    assert np.array_equal(hflip[1], plain[:, :, ::-1])
    ten = preprocess(data, PreprocessSpec(), LIMITS, "ten_crop")
    assert np.array_equal(ten[4], plain)  # the centre is the plain crop
    assert np.array_equal(ten[5:], ten[:5, :, :, ::-1])


def test_an_image_is_decoded_once_whatever_the_views(samples_dir: Path, monkeypatch) -> None:
    calls = []
    real = pillow.load_pixels
    monkeypatch.setattr(pillow, "load_pixels", lambda *a: calls.append(1) or real(*a))
    outcomes = PillowBackend(PreprocessSpec(), LIMITS).run(
        [(samples_dir / "coffee.jpg").read_bytes()], "ten_crop")
    assert outcomes[0].shape == (10, 3, 224, 224)
    assert len(calls) == 1


def test_a_bad_image_is_one_error_whatever_the_views() -> None:
    (outcome,) = PillowBackend(PreprocessSpec(), LIMITS).run([b"not an image"], "ten_crop")
    assert isinstance(outcome, InputError) and outcome.code == "not_an_image"


# --- averaging ---------------------------------------------------------------


@pytest.fixture(scope="module")
def halves_loop() -> InferenceLoop:
    """InferenceLoop over the Halves classifier (tests/tta_model.py), up to 12 views."""
    model = LoadedModel("halves", halves_module(), IMAGENET_MEAN, IMAGENET_STD, LABELS, "d")
    backend = TorchBackend(model, torch.device("cpu"), 12, (3, 224, 224))
    backend.setup()
    return InferenceLoop(backend, topk=3)


def prepared(pixels: np.ndarray, tta: str = "none") -> Prepared:
    return Prepared(Job("halves.png"), pixels=pixels, tta=tta)


def scores(record: dict) -> dict[str, float]:
    return {p["label"]: p["score"] for p in record["predictions"]}


def expected(probs: tuple[float, ...]) -> dict[str, float]:
    return dict(ranked(probs))


def test_the_prediction_is_the_mean_of_the_views_probabilities(halves_loop: InferenceLoop,
                                                               tmp_path: Path) -> None:
    # given the half-white photograph, as a plain crop and as its hflip views
    data = halves_photo(tmp_path / "halves.png").read_bytes()
    backend = PillowBackend(PreprocessSpec(), LIMITS)
    (plain,), (views,) = backend.run([data]), backend.run([data], "hflip")

    # when they are scored in one batch
    records = halves_loop.score([prepared(plain), prepared(views, "hflip"),
                                 prepared(views[1])])

    # then the plain crop scores (1/2, 1/4, 1/4), its mirror image (1/6, 2/3, 1/6), and
    # hflip their mean, (1/3, 11/24, 5/24): the winner changes from "left" to "right"
    assert scores(records[0]) == pytest.approx(expected(NONE_PROBS), abs=2e-6)
    assert scores(records[2]) == pytest.approx(expected(MIRRORED_PROBS), abs=2e-6)
    assert scores(records[1]) == pytest.approx(expected(HFLIP_PROBS), abs=2e-6)
    assert [p["label"] for p in records[1]["predictions"]] == ["right", "left", "neither"]
    assert records[0]["predictions"][0]["label"] == "left"
    assert records[1]["views"] == 2 and "views" not in records[0]


def test_views_keep_their_own_rows_in_a_mixed_batch() -> None:
    probs = np.array([[1.0, 0.0], [0.2, 0.8], [0.6, 0.4], [0.0, 1.0], [0.5, 0.5]])
    averaged = mean_over_views(probs, [1, 2, 1, 1])
    assert averaged == pytest.approx(np.array([[1.0, 0.0], [0.4, 0.6], [0.0, 1.0],
                                               [0.5, 0.5]]))
    assert mean_over_views(probs, [1] * 5) is probs  # no TTA: untouched


def test_all_views_of_an_image_go_through_the_model_in_one_batch(
        halves_loop: InferenceLoop, samples_dir: Path) -> None:
    data = (samples_dir / "coffee.jpg").read_bytes()
    (ten,) = PillowBackend(PreprocessSpec(), LIMITS).run([data], "ten_crop")
    seen: list[int] = []
    predict = halves_loop.backend.predict
    halves_loop.backend.predict = lambda samples: seen.append(len(samples)) or predict(samples)
    try:
        (record,) = halves_loop.score([prepared(ten, "ten_crop")])
    finally:
        halves_loop.backend.predict = predict
    assert seen == [10] and record["views"] == 10


# --- batching counts views -----------------------------------------------------


def batches_of(items: list[Prepared], max_batch_size: int) -> list[list[int]]:
    source: queue.Queue[object] = queue.Queue()
    for item in [*items, END]:
        source.put(item)
    batcher = Batcher(source, max_batch_size, 10_000, weight=Prepared.batch_weight)
    batches = []
    while (batch := batcher.next_batch(timeout_s=1)) is not None:
        batches.append([item.batch_weight() for item in batch])
    return batches


def test_batches_count_views_not_images() -> None:
    crop = np.zeros((3, 4, 4), np.uint8)
    ten, two = np.zeros((10, 3, 4, 4), np.uint8), np.zeros((2, 3, 4, 4), np.uint8)
    items = [prepared(ten, "ten_crop"), prepared(ten, "ten_crop"), prepared(two, "hflip"),
             prepared(crop), prepared(ten, "ten_crop"), prepared(crop)]
    # 32 views at most: 10 + 10 + 2 + 1 = 23; another ten would make 33, so it opens
    # the next batch (an image's views are never split)
    assert batches_of(items, 32) == [[10, 10, 2, 1], [10, 1]]
    assert batches_of(items, 10) == [[10], [10], [2, 1], [10], [1]]
    # errors and cached answers go past the model: they count one, as before
    error = Prepared(Job("bad"), error=InputError("truncated", "cut"), tta="ten_crop")
    assert error.batch_weight() == 1 and error.views == 10


def test_without_a_weight_every_item_counts_one() -> None:
    source: queue.Queue[object] = queue.Queue()
    for item in ("a", "b", "c", END):
        source.put(item)
    batcher = Batcher(source, max_batch_size=2, max_delay_ms=10_000)
    assert batcher.next_batch(1) == ["a", "b"] and batcher.next_batch(1) == ["c"]
    assert batcher.next_batch(1) is None


# --- the cache keeps TTA and plain results apart ---------------------------------


@pytest.fixture
def lookup(tmp_path: Path):
    cache = CacheLookup(CacheSettings(dir=tmp_path / "cache"), PreprocessSpec().digest(),
                        ResultScope("model", "weights", 1, "labels"))
    cache.setup()
    yield cache
    cache.close()


PLAIN = [{"label": "left", "index": 0, "score": 0.5}]
AVERAGED = [{"label": "right", "index": 1, "score": 0.458333}]


def test_tta_and_plain_predictions_never_serve_one_another(lookup: CacheLookup) -> None:
    lookup.store_predictions("ab" * 16, PLAIN)
    lookup.cache.flush()
    assert lookup.find_digest("ab" * 16).predictions == PLAIN
    assert lookup.find_digest("ab" * 16, "hflip").predictions is None
    lookup.store_predictions("cd" * 16, AVERAGED, "hflip")
    lookup.cache.flush()
    assert lookup.find_digest("cd" * 16, "hflip").predictions == AVERAGED
    assert lookup.find_digest("cd" * 16).predictions is None
    assert lookup.find_digest("cd" * 16, "ten_crop").predictions is None


def test_an_images_views_are_one_tensor_entry_under_the_view_set(lookup: CacheLookup) -> None:
    views = np.arange(2 * 3 * 4 * 4, dtype=np.uint8).reshape(2, 3, 4, 4)
    lookup.store_tensor("ef" * 16, views, "hflip")
    lookup.cache.flush()
    found = lookup.find_digest("ef" * 16, "hflip")
    assert found.pixels is not None and np.array_equal(found.pixels, views)
    assert lookup.find_digest("ef" * 16).pixels is None
    assert lookup.find_digest("ef" * 16, "five_crop").pixels is None
    # and the plain crop of the same image is an entry of its own beside them
    lookup.store_tensor("ef" * 16, views[0])
    lookup.cache.flush()
    assert np.array_equal(lookup.find_digest("ef" * 16).pixels, views[0])
    assert np.array_equal(lookup.find_digest("ef" * 16, "hflip").pixels, views)


def test_the_view_set_is_part_of_the_key() -> None:
    spec = PreprocessSpec().digest()
    assert views_digest(spec, "none") == spec  # plain entries keep their keys
    keys = {tensor_key("imgpipe", "ab" * 16, views_digest(spec, mode)) for mode in TTA_VIEWS}
    assert len(keys) == len(TTA_VIEWS)


# --- the wire contract ----------------------------------------------------------


RULES = contract.JobRules("m", 5, 1024, (), "p:results", max_views=5)


def parse(**fields: bytes) -> contract.JobRequest:
    raw = {name.encode(): value for name, value in {"data": b"x", **fields}.items()}
    return contract.parse_job("1-0", raw, RULES, 0)


@pytest.mark.parametrize("mode", ["none", "hflip", "five_crop"])
def test_a_job_may_ask_for_test_time_augmentation(mode: str) -> None:
    job = parse(tta=mode.encode())
    assert job.error is None and job.tta == mode
    assert parse().tta is None  # the daemon's own mode


@pytest.mark.parametrize("value, words", [
    (b"twenty_crop", "not one of none, hflip, five_crop, ten_crop"),
    (b"ten_crop", "10 views; this daemon allows at most 5 (serve.max_views)"),
    (b"", "1 to 32 characters"),
    (b"\xff", "UTF-8"),
])
def test_an_unknown_or_too_large_tta_is_an_invalid_field(value: bytes, words: str) -> None:
    job = parse(tta=value)
    assert job.error is not None and job.error.code == "invalid_field"
    assert job.error.message.startswith("field tta") and words in job.error.message


def test_a_client_sends_tta_and_a_result_says_its_views() -> None:
    assert contract.job_fields(data=b"x", tta="hflip")["tta"] == "hflip"
    request = parse(tta=b"hflip")
    record = {"path": "p", "status": "ok", "model": "m", "predictions": AVERAGED,
              "views": 2}
    fields = contract.result_fields(record, request, "m", 0.0)  # type: ignore[arg-type]
    assert fields["views"] == "2"
    del record["views"]
    assert "views" not in contract.result_fields(record, request, "m", 0.0)  # type: ignore
