"""Top-k on the device (pipeline/backends/reduce.py) gives the NumPy path's answers:
the same classes in the same order, probabilities within 1e-6, ties broken
towards the lower class index, embeddings pooled alike; and only k columns
per image come back to the host."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.backends import TorchBackend
from pipeline.backends.calibration import preprocessed
from pipeline.backends.reduce import reduce_on_device
from pipeline.embeddings import pooled
from pipeline.inference import InferenceLoop
from pipeline.items import Job, Prepared
from pipeline.models import LoadedModel, load_model
from pipeline.predictions import mean_over_views, softmax, top_k_of_probabilities
from pipeline.spec import InputLimits, PreprocessSpec
from tests.builders import MeanColour

IMAGENET = Path(__file__).resolve().parents[3] / "shared" / "data" / "imagenet-val-100"
SETTING = "model.output = 'both'"
LABELS = [f"class {i}" for i in range(1000)]


def numpy_path(logits: torch.Tensor, features: torch.Tensor | None, views: list[int],
               k: int, normalize: bool = True) -> tuple[list, np.ndarray | None]:
    """What the loop computed on the host before: softmax, view mean, top-k, pooled."""
    host = logits.double().numpy()
    top = top_k_of_probabilities(mean_over_views(softmax(host), views), k, LABELS)
    return top, None if features is None else pooled(features.numpy(), views, normalize)


def assert_same(device: list, host: list) -> None:
    for on_device, on_host in zip(device, host, strict=True):
        assert [p["index"] for p in on_device] == [p["index"] for p in on_host]
        assert [p["score"] for p in on_device] == pytest.approx(
            [p["score"] for p in on_host], abs=1e-6)


@pytest.fixture(scope="module")
def lite0_outputs() -> tuple[torch.Tensor, torch.Tensor]:
    """EfficientNet-Lite0's logits and features on the 100 ImageNet photographs."""
    if not IMAGENET.is_dir():
        pytest.skip(f"{IMAGENET} is absent")
    paths = sorted(str(path) for path in IMAGENET.glob("*/*.JPEG"))
    photos = list(preprocessed(paths, PreprocessSpec(), InputLimits()).values())
    assert len(photos) == 100
    backend = TorchBackend(load_model(), torch.device("cpu"), 50, (3, 224, 224),
                           embeddings=SETTING)
    backend.setup()
    try:
        halves = [backend.predict_features(photos[i:i + 50]) for i in (0, 50)]
    finally:
        backend.close()
    return (torch.cat([logits for logits, _ in halves]),
            torch.cat([features for _, features in halves]))


@pytest.mark.parametrize("views", [[1] * 100, [2] * 50, [1, 2, 3, 4] * 10],
                         ids=["one view", "two views", "mixed views"])
@pytest.mark.parametrize("k", [5, 1000])
def test_lite0_on_imagenet_photos_matches_the_numpy_path(lite0_outputs, views, k):
    # given Lite0's logits and features for 100 photographs, grouped into images' views
    logits, features = lite0_outputs

    # when they are reduced on the device, and on the host as before
    device = reduce_on_device(logits, features, views, k, LABELS).collect()
    host = numpy_path(logits, features, views, k)

    # then every image has the same classes in the same order, scores within 1e-6
    assert_same(device[0], host[0])
    assert device[1] is not None and host[1] is not None
    assert device[1].dtype == host[1].dtype == np.dtype("<f2")
    # and embeddings within a float16 step of the host's
    np.testing.assert_allclose(device[1].astype(np.float32), host[1].astype(np.float32),
                               atol=1e-3, rtol=0)


def test_ties_keep_the_lower_class_index_first():
    # given logits with exact ties, among the best and among the rest, and two
    # views whose mean makes a tie of their own
    logits = torch.zeros(3, 1000)
    logits[0, [7, 3, 900, 500]] = 2.0
    logits[0, [600, 1, 42]] = 1.0
    logits[1, 10], logits[2, 20] = 1.0, 1.0  # one image's two views: 10 and 20 tie

    # when the top 6 are taken on the device and on the host
    (device, _), (host, _) = (reduce_on_device(logits, None, [1, 2], 6, LABELS).collect(),
                              numpy_path(logits, None, [1, 2], 6))

    # then ties are ordered by class index, as the host orders them
    assert [p["index"] for p in device[0]] == [3, 7, 500, 900, 1, 42]
    assert [p["index"] for p in device[1]] == [10, 20, 0, 1, 2, 3]
    assert_same(device, host)


def test_a_zero_feature_vector_stays_zero_and_raw_means_are_kept_unnormalised():
    # given two images, one of them with all-zero features over both views
    features = torch.tensor([[0.0, 0.0], [0.0, 0.0], [3.0, 4.0], [1.0, 2.0]])
    logits = torch.zeros(4, 10)

    # when pooled on the device, normalised and not
    _, normalised = reduce_on_device(logits, features, [2, 2], 1, LABELS).collect()
    _, raw = reduce_on_device(logits, features, [2, 2], 1, LABELS, normalize=False).collect()

    # then the zero vector stays zero, and each is the host's pooled vector
    assert normalised is not None and raw is not None
    np.testing.assert_array_equal(normalised, pooled(features.numpy(), [2, 2], True))
    np.testing.assert_array_equal(raw, pooled(features.numpy(), [2, 2], False))
    assert not normalised[0].any()


def test_only_k_columns_per_image_come_back_to_the_host():
    # given a loop over a torch model with 1000 classes, asked for its top 3
    model = LoadedModel("colours", MeanColour(), (0.0, 0.0, 0.0), (1.0, 1.0, 1.0),
                        LABELS, "digest")
    backend = TorchBackend(model, torch.device("cpu"), 8, (3, 8, 8))
    backend.setup()
    loop = InferenceLoop(backend, topk=3)
    batch = [Prepared(Job(f"{i}.png"), pixels=np.full((3, 8, 8), i, dtype=np.uint8))
             for i in range(5)]

    # when a batch is launched
    flight = loop.launch(batch)

    # then what is copied to the host is 3 indices and 3 probabilities per image
    pending = flight.pending
    assert pending is not None
    assert tuple(pending.indices.shape) == (5, 3) and pending.indices.device.type == "cpu"
    assert tuple(pending.scores.shape) == (5, 3) and pending.embeddings is None
    assert [len(r["predictions"]) for r in loop.collect(flight)] == [3] * 5
