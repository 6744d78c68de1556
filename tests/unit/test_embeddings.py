"""Embeddings: pooled penultimate features from real models, averaged over TTA
views, normalised, and refused with one line where a model's head gives none."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision

from pipeline.backends import TorchBackend, create_inference_backend
from pipeline.embeddings import pooled
from pipeline.errors import ModelLoadError
from pipeline.inference import InferenceLoop
from pipeline.items import Job, Prepared
from pipeline.models import LoadedModel, load_model
from pipeline.preprocess.pillow import PillowBackend
from pipeline.recipes import IMAGENET_MEAN, IMAGENET_STD
from pipeline.spec import InputLimits, PreprocessSpec
from pipeline.variants import Variant
from tests.builders import Declared

SETTING = "model.output = 'embedding'"
PHOTOS = ("coffee.jpg", "chelsea.jpg", "rocket.jpg")


@pytest.fixture(scope="module")
def lite0_backend() -> TorchBackend:
    model = load_model()
    backend = TorchBackend(model, torch.device("cpu"), 10, (3, 224, 224), embeddings=SETTING)
    backend.setup()
    return backend


@pytest.fixture(scope="module")
def mobilenet(tmp_path_factory: pytest.TempPathFactory) -> LoadedModel:
    """mobilenet_v3_small from a state_dict saved here (randomly initialised, seeded)."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("weights") / "mobilenet_v3_small.pth"
    torch.save(torchvision.models.mobilenet_v3_small(weights=None).state_dict(), path)
    return load_model("mobilenet_v3_small", path)


def prepared(samples_dir: Path, mode: str = "none", output: str = "embedding",
             names: tuple[str, ...] = PHOTOS) -> list[Prepared]:
    backend = PillowBackend(PreprocessSpec(), InputLimits())
    outcomes = backend.run([(samples_dir / name).read_bytes() for name in names], mode)
    return [Prepared(Job(name), pixels=pixels, tta=mode, output=output)
            for name, pixels in zip(names, outcomes, strict=True)]


def norms(vectors: np.ndarray) -> np.ndarray:
    return np.linalg.norm(vectors.astype(np.float32), axis=-1)


def test_lite0_features_are_the_input_of_its_classifier(lite0_backend, samples_dir):
    # given three photographs, preprocessed as the model was evaluated
    pixels = [item.pixels for item in prepared(samples_dir)]

    # when the backend gives logits and features in one pass
    logits, features = lite0_backend.predict_features(pixels)

    # then the features are the 1280 pooled values the final linear layer turns into
    # exactly these logits, which are those predict() gives
    assert features.shape == (3, 1280)
    head = lite0_backend.model.module._fc
    with torch.inference_mode():
        assert torch.allclose(head(features), logits, atol=1e-4)
    assert torch.allclose(lite0_backend.predict(pixels), logits, atol=1e-5)


def test_lite0_embeddings_are_normalised_float16_vectors(lite0_backend, samples_dir):
    # when the photographs are scored for their embeddings
    records = InferenceLoop(lite0_backend, topk=5).score(prepared(samples_dir))

    # then each record holds a float16 vector of unit length, and no predictions
    vectors = np.stack([record["embedding"] for record in records])
    assert vectors.dtype == np.float16 and vectors.shape == (3, 1280)
    assert norms(vectors) == pytest.approx(1, abs=2e-3)
    assert all("predictions" not in record for record in records)
    # and different photographs are different vectors
    assert float(vectors[0].astype(np.float32) @ vectors[1].astype(np.float32)) < 0.9


def test_normalisation_off_keeps_the_raw_mean(lite0_backend, samples_dir):
    items = prepared(samples_dir, output="both")
    logits, features = lite0_backend.predict_features([item.pixels for item in items])

    records = InferenceLoop(lite0_backend, topk=1, normalize_embeddings=False).score(items)

    raw = np.stack([record["embedding"] for record in records]).astype(np.float32)
    assert raw == pytest.approx(features.numpy(), rel=2e-3, abs=2e-3)
    assert not np.allclose(norms(raw), 1, atol=0.05)
    assert [record["predictions"][0]["label"] for record in records][:2] == [
        "espresso", "Egyptian cat"]


def test_tta_views_features_are_averaged_then_normalised(lite0_backend, samples_dir):
    # given a photograph prepared with hflip: two views
    (item,) = prepared(samples_dir, "hflip", names=("chelsea.jpg",))
    _, per_view = lite0_backend.predict_features(list(item.pixels))

    # when it is scored
    (record,) = InferenceLoop(lite0_backend, topk=1).score([item])

    # then its embedding is the normalised mean of its views' features, not either view's
    mean = per_view.numpy().mean(axis=0)
    expected = mean / np.linalg.norm(mean)
    got = record["embedding"].astype(np.float32)
    assert got @ expected == pytest.approx(1, abs=1e-3)
    for view in per_view.numpy():
        assert got @ (view / np.linalg.norm(view)) < 0.999
    assert record["views"] == 2


def test_a_torchvision_model_from_a_local_state_dict_gives_embeddings(mobilenet, samples_dir):
    # given mobilenet_v3_small loaded from a saved state_dict, set up for embeddings
    backend = TorchBackend(mobilenet, torch.device("cpu"), 4, (3, 224, 224),
                           embeddings=SETTING)
    backend.setup()
    items = prepared(samples_dir, output="both")
    logits, features = backend.predict_features([item.pixels for item in items])

    records = InferenceLoop(backend, topk=3).score(items)

    # then the vectors are its classifier's 1024 inputs, averaged and normalised
    assert features.shape == (3, 1024)
    with torch.inference_mode():
        assert torch.allclose(mobilenet.module.classifier[-1](features), logits, atol=1e-4)
    vectors = np.stack([record["embedding"] for record in records])
    assert vectors.dtype == np.float16 and vectors.shape == (3, 1024)
    assert norms(vectors) == pytest.approx(1, abs=2e-3)
    assert all(len(record["predictions"]) == 3 for record in records)
    backend.close()


def test_a_model_without_a_linear_head_is_refused_naming_it_and_the_setting(tmp_path):
    # given squeezenet, whose classifier is a convolution
    weights = tmp_path / "squeezenet1_1.pth"
    torch.save(torchvision.models.squeezenet1_1(weights=None).state_dict(), weights)
    model = load_model("squeezenet1_1", weights)

    # when a backend for embeddings is built, then it fails in one line naming both
    with pytest.raises(ModelLoadError) as caught:
        TorchBackend(model, torch.device("cpu"), 2, (3, 224, 224), embeddings=SETTING)
    message = str(caught.value)
    assert "squeezenet1_1" in message and SETTING in message and "\n" not in message


@pytest.mark.parametrize("variant", ["onnxruntime", "torchscript"])
def test_a_model_without_a_linear_head_is_refused_on_exported_variants_at_once(variant,
                                                                            tmp_path):
    # given squeezenet (a convolution for a classifier): nothing is exported for it
    weights = tmp_path / "squeezenet1_1.pth"
    torch.save(torchvision.models.squeezenet1_1(weights=None).state_dict(), weights)
    model = load_model("squeezenet1_1", weights)
    with pytest.raises(ModelLoadError, match=r"squeezenet1_1 cannot give embeddings "
                       r"\(model\.output = 'embedding'\)"):
        create_inference_backend(Variant(variant), model, torch.device("cpu"), 2,
                                 (3, 224, 224), 1, tmp_path / "artifacts", embeddings=SETTING)
    assert not (tmp_path / "artifacts").exists()


def scripted(module: torch.nn.Module, path: Path) -> LoadedModel:
    torch.jit.script(module).save(str(path))
    return load_model(str(path))


def test_a_torchscript_model_gives_the_features_it_declares(tmp_path):
    model = scripted(Declared(), tmp_path / "declared.pt")
    backend = TorchBackend(model, torch.device("cpu"), 2, (3, 8, 8), embeddings=SETTING)
    backend.setup()

    _, features = backend.predict_features([np.full((3, 8, 8), 255, np.uint8)])

    # the normalised white image's mean colour, channel by channel
    expected = [(255 - m) / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD, strict=True)]
    assert features.numpy()[0] == pytest.approx(expected, rel=1e-5)


def test_a_torchscript_model_without_embed_is_refused(tmp_path):
    class Plain(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.zeros(x.shape[0], 1000)

    model = scripted(Plain(), tmp_path / "plain.pt")
    with pytest.raises(ModelLoadError, match=r"plain\.pt cannot give embeddings "
                       r"\(model\.output = 'embedding'\).*embed\(x\)"):
        TorchBackend(model, torch.device("cpu"), 2, (3, 8, 8), embeddings=SETTING)


def test_pooled_averages_views_and_keeps_a_zero_vector_zero():
    features = np.array([[3, 4], [3, 4], [1, 1], [0, 0]], dtype=np.float32)
    rows = pooled(features, [1, 2, 1], normalize=True)
    assert rows.dtype == np.float16
    assert rows[0].tolist() == pytest.approx([0.6, 0.8], abs=1e-3)
    assert rows[1].tolist() == pytest.approx([0.6247, 0.7809], abs=1e-3)  # (2, 2.5), normalised
    assert rows[2].tolist() == [0, 0]
    assert pooled(features, [2, 2], normalize=False).tolist() == [[3, 4], [0.5, 0.5]]
