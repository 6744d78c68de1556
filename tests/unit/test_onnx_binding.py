"""ONNX Runtime with I/O binding (pipeline/backends/binding.py), run on the CPU as on
a GPU: the bound path gives the plain session's outputs as torch tensors, batch
after batch, and the inference loop reduces them to the host path's records."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.backends.artifacts import ArtifactStore
from pipeline.backends.binding import BoundSession
from pipeline.backends.onnx import OnnxBackend
from pipeline.inference import InferenceLoop
from pipeline.items import Job, Prepared
from pipeline.models import load_model
from pipeline.prebuilt import FEATURES_NAME, LOGITS_NAME

pytest.importorskip("onnxruntime")

ON_CPU = torch.device("cpu")
SHAPE = (3, 224, 224)
MAX_BATCH = 8
BOTH = [LOGITS_NAME, FEATURES_NAME]


@pytest.fixture(scope="module")
def featured(tmp_path_factory) -> OnnxBackend:
    """The default model's export with features, run by ONNX Runtime on the CPU."""
    backend = OnnxBackend(load_model(), ON_CPU, MAX_BATCH, SHAPE,
                          store=ArtifactStore(tmp_path_factory.mktemp("artifacts")),
                          embeddings="model.output = 'both'")
    backend.setup()
    yield backend
    backend.close()


def bound(backend: OnnxBackend) -> BoundSession:
    return BoundSession(backend.runner.session, ON_CPU, MAX_BATCH, SHAPE)


def photos_from(photos: list[np.ndarray], start: int, count: int) -> list[np.ndarray]:
    return [photos[(start + i) % len(photos)] for i in range(count)]


# --- the bound session ----------------------------------------------------------


def test_bound_runs_give_the_plain_sessions_outputs_batch_after_batch(featured, photos):
    # given batches of 5, then 2, then 8 photographs
    batches = [photos_from(photos, 0, 5), photos_from(photos, 3, 2),
               photos_from(photos, 1, MAX_BATCH)]

    # when each runs bound, every batch's outputs held while the next ones run
    session = bound(featured)
    outputs = [session.run(batch, BOTH) for batch in batches]

    # then each batch has tensors on the device, one row per sample, with the
    # values of the plain session.run
    for batch, (logits, features) in zip(batches, outputs, strict=True):
        assert logits.device == features.device == ON_CPU
        assert tuple(logits.shape) == (len(batch), 1000)
        assert tuple(features.shape) == (len(batch), 1280)
        plain_logits, plain_features = featured.runner.run_features(batch)
        np.testing.assert_allclose(logits.numpy(), plain_logits, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(features.numpy(), plain_features, rtol=1e-5, atol=1e-5)


def test_an_output_not_asked_for_is_not_written_into_an_earlier_runs_tensor(featured,
                                                                          photos):
    # given a run that asked for the features too, its features held
    session = bound(featured)
    _, features = session.run(photos_from(photos, 0, 2), BOTH)
    kept = features.clone()

    # when the next batch, of other photographs, asks for the logits alone
    (logits,) = session.run(photos_from(photos, 2, 2), [LOGITS_NAME])

    # then the first batch's features are as ONNX Runtime wrote them
    assert tuple(logits.shape) == (2, 1000)
    assert torch.equal(features, kept)


def test_a_batch_over_the_maximum_is_refused_and_cuda_needs_a_stream(featured, photos):
    with pytest.raises(ValueError, match="does not fit"):
        bound(featured).run([photos[0]] * (MAX_BATCH + 1), [LOGITS_NAME])
    with pytest.raises(ValueError, match="needs the stream"):
        BoundSession(featured.runner.session, torch.device("cuda", 0), MAX_BATCH, SHAPE)


def test_the_loop_reduces_bound_outputs_to_the_host_paths_records(featured, photos):
    # given the backend answering in NumPy (the CPU), then through a bound session
    # (as on a GPU), on every photograph for predictions and embeddings
    def items() -> list[Prepared]:
        return [Prepared(Job(f"{i}.jpg"), pixels=photo, output="both")
                for i, photo in enumerate(photos)]

    host = InferenceLoop(featured, topk=5).score(items())
    featured.bound = bound(featured)
    try:
        assert isinstance(featured.predict(photos[:1]), torch.Tensor)
        device = InferenceLoop(featured, topk=5).score(items())
    finally:
        featured.bound = None

    # then the records are the same: classes in order, scores within 1e-6, and the
    # embeddings within a float16 step
    for on_device, on_host in zip(device, host, strict=True):
        assert [p["index"] for p in on_device["predictions"]] == \
            [p["index"] for p in on_host["predictions"]]
        assert [p["score"] for p in on_device["predictions"]] == pytest.approx(
            [p["score"] for p in on_host["predictions"]], abs=1e-6)
        np.testing.assert_allclose(on_device["embedding"].astype(np.float32),
                                   on_host["embedding"].astype(np.float32), atol=1e-3)
