"""Embeddings from every inference variant: the same features as eager fp32 on real
photographs, an artifact of their own, and the accuracy guard that refuses a
variant whose features drift."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.backends import TorchBackend, Variant, create_inference_backend
from pipeline.backends.artifacts import ArtifactStore
from pipeline.backends.calibration import CalibrationSet
from pipeline.backends.onnx import OnnxBackend
from pipeline.backends.torchscript import TorchScriptBackend
from pipeline.cpu_features import native_bf16
from pipeline.errors import ModelLoadError
from pipeline.feature_guard import MIN_COSINE, feature_agreement, features_of, refusal
from pipeline.inference import InferenceLoop
from pipeline.items import Job, Prepared
from pipeline.models import LoadedModel, load_model
from pipeline.prebuilt import OnnxRunner
from pipeline.spec import InputLimits, PreprocessSpec
from tests.builders import Declared

CPU = torch.device("cpu")
SHAPE = (3, 224, 224)
MAX_BATCH = 8
SETTING = "model.output = 'both'"
LITE0_DIM = 1280


@pytest.fixture(scope="module")
def lite0() -> LoadedModel:
    return load_model()


@pytest.fixture(scope="module")
def eager(lite0: LoadedModel, photos: list[np.ndarray]) -> np.ndarray:
    """Eager fp32's features of the sample photographs: the reference."""
    backend = TorchBackend(lite0, CPU, MAX_BATCH, SHAPE, embeddings=SETTING)
    backend.setup()
    try:
        return features_of(backend, photos)
    finally:
        backend.close()


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("artifacts")


@pytest.fixture(scope="module")
def calibration(samples_dir: Path) -> CalibrationSet:
    return CalibrationSet.from_directory(samples_dir, PreprocessSpec(), InputLimits())


def built(name: str, model: LoadedModel, artifacts: Path,
          calibration: CalibrationSet | None = None, embeddings: str | None = SETTING):
    backend = create_inference_backend(Variant.parse(name), model, CPU, MAX_BATCH, SHAPE, 0,
                                       artifacts, calibration, embeddings)
    backend.setup()
    return backend


def scored(backend, photos: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """The records' float16 embeddings (through the inference loop, for both
    outputs) and the backend's raw features of the same photographs."""
    try:
        items = [Prepared(Job(str(i)), pixels=pixels, output="both")
                 for i, pixels in enumerate(photos)]
        records = InferenceLoop(backend, topk=1).score(items)
        assert all(record["predictions"] for record in records)
        return np.stack([record["embedding"] for record in records]), features_of(backend,
                                                                                photos)
    finally:
        backend.close()


def assert_unit_float16_rows(vectors: np.ndarray, count: int) -> np.ndarray:
    assert vectors.dtype == np.float16 and vectors.shape == (count, LITE0_DIM)
    unit = vectors.astype(np.float32)
    assert np.linalg.norm(unit, axis=1) == pytest.approx(1, abs=2e-3)
    return unit


@pytest.mark.parametrize("name", [
    pytest.param("torch:bf16", marks=pytest.mark.skipif(
        not native_bf16(), reason="bf16 is emulated on this CPU, so never offered here")),
    "torchscript", "onnxruntime"])
def test_each_variant_gives_eager_features_on_real_photos(name, lite0, eager, photos,
                                                          artifacts):
    # given the variant built for embeddings, when it scores the photographs
    vectors, features = scored(built(name, lite0, artifacts), photos)

    # then its features follow eager fp32's, on every photograph
    agreement = feature_agreement(eager, features)
    print(f"\n{name}: {agreement}")
    assert features.shape == (len(photos), LITE0_DIM)
    assert agreement.min_cosine >= MIN_COSINE and refusal(agreement) is None
    # and each record's embedding is a float16 unit vector in that photograph's direction
    unit = assert_unit_float16_rows(vectors, len(photos))
    expected = eager / np.linalg.norm(eager, axis=1, keepdims=True)
    assert (unit * expected).sum(axis=1).min() >= MIN_COSINE


def test_int8_gives_features_whose_drift_the_guard_refuses(lite0, eager, photos, artifacts,
                                                           calibration):
    # given int8, calibrated on these very photographs, when it scores them
    vectors, features = scored(built("onnxruntime:int8", lite0, artifacts, calibration),
                               photos)

    # then it gives the model's features, float16 unit vectors once pooled ...
    assert_unit_float16_rows(vectors, len(photos))
    agreement = feature_agreement(eager, features)
    print(f"\nonnxruntime:int8: {agreement}")
    assert agreement.min_cosine > 0.9  # quantized, yet the same model
    # ... which drift from eager's past the guard: refused for embeddings, in one line
    why = refusal(agreement)
    assert why is not None and "\n" not in why
    assert why == (f"features' cosine to eager fp32's: mean {agreement.mean_cosine:.4f}, "
                   f"minimum {agreement.min_cosine:.4f} over {len(photos)} photographs, "
                   f"under {MIN_COSINE}")


def test_torch_compile_compiles_the_features_with_the_logits(photos, artifacts, monkeypatch):
    # given a real torchvision architecture (seeded weights), eager and compiled
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    from tests.builders import random_mobilenet

    torch.save(random_mobilenet(0), artifacts / "mobilenet.pth")
    model = load_model("mobilenet_v3_small", artifacts / "mobilenet.pth")
    reference = TorchBackend(model, CPU, MAX_BATCH, SHAPE, embeddings=SETTING)
    reference.setup()
    compiled = built("torch-compile", model, artifacts)

    # then the compiled graph gives eager's logits and features
    logits, features = compiled.predict_features(photos)
    expected_logits, expected = reference.predict_features(photos)
    assert features.shape == (len(photos), 1024)
    assert refusal(feature_agreement(expected.numpy(), features.numpy())) is None
    torch.testing.assert_close(logits, expected_logits, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(compiled.predict(photos), expected_logits, rtol=1e-4, atol=1e-4)
    compiled.close()
    reference.close()


# --- an artifact of its own -----------------------------------------------------


def test_a_features_export_has_its_own_key_and_output(lite0, artifacts, calibration):
    store = ArtifactStore(artifacts)
    args = (lite0, CPU, MAX_BATCH, SHAPE)
    for precision in ("fp32", "int8"):
        plain = OnnxBackend(*args, store=store, precision=precision, calibration=calibration)
        featured = OnnxBackend(*args, store=store, precision=precision,
                               calibration=calibration, embeddings=SETTING)
        assert plain.artifact_key() != featured.artifact_key()
        assert store.path_for(plain.artifact_key()) != store.path_for(featured.artifact_key())
    traced = TorchScriptBackend(*args, store=store)
    traced_featured = TorchScriptBackend(*args, store=store, embeddings=SETTING)
    assert traced.artifact_key() != traced_featured.artifact_key()


def test_a_logits_only_export_is_never_opened_for_features(lite0, photos, artifacts,
                                                          tmp_path):
    # given a logits-only export, then put where the features export belongs
    plain = built("onnxruntime", lite0, artifacts, embeddings=None)
    assert plain.artifact is not None
    with pytest.raises(ValueError, match="gives no 'features' output"):
        OnnxRunner(plain.artifact, MAX_BATCH, SHAPE, features=True).open()
    store = tmp_path / "store"
    featured = OnnxBackend(lite0, CPU, MAX_BATCH, SHAPE, store=ArtifactStore(store),
                           embeddings=SETTING)
    target = featured.store.path_for(featured.artifact_key())
    target.parent.mkdir(parents=True)
    shutil.copy(plain.artifact, target)

    # when the backend for embeddings sets up
    featured.setup()

    # then it refused the file and exported again, and gives features
    assert featured.export_s > 0
    logits, features = featured.predict_features(photos[:2])
    assert features.shape == (2, LITE0_DIM)
    featured.close()
    plain.close()


def test_a_torchscript_model_is_refused_for_exported_features(tmp_path):
    scripted = torch.jit.script(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3, 2)))
    model = LoadedModel("scripted.pt", scripted, (0.5,) * 3, (0.5,) * 3, ["a", "b"], "0" * 32)
    with pytest.raises(ModelLoadError, match=r"model scripted\.pt cannot give embeddings "
                       r"\(model\.output = 'both'\) from ONNX Runtime: .* use "
                       r"model\.backend 'torch' or 'torchscript'"):
        create_inference_backend(Variant("onnxruntime"), model, CPU, 2, (3, 1, 1), 1,
                                 tmp_path, embeddings=SETTING)


def test_a_torchscript_model_traced_keeps_the_features_it_declares(tmp_path):
    # given a TorchScript file with an embed() method, traced by the torchscript backend
    torch.jit.script(Declared()).save(str(tmp_path / "declared.pt"))
    model = load_model(str(tmp_path / "declared.pt"))
    eager = TorchBackend(model, CPU, 2, (3, 8, 8), embeddings=SETTING)
    eager.setup()
    traced = create_inference_backend(Variant("torchscript"), model, CPU, 2, (3, 8, 8), 1,
                                      tmp_path / "artifacts", embeddings=SETTING)
    traced.setup()
    pixels = [np.random.default_rng(seed).integers(0, 256, (3, 8, 8), dtype=np.uint8)
              for seed in (0, 1)]

    # then the trace gives the features eager gets from that method
    torch.testing.assert_close(traced.predict_features(pixels)[1],
                               eager.predict_features(pixels)[1])


# --- the accuracy guard ---------------------------------------------------------


def test_the_guard_refuses_features_from_a_perturbed_export(lite0, eager, photos, artifacts,
                                                           tmp_path):
    import onnx
    from onnx import numpy_helper

    # given the features export, and a copy whose last convolution's weights carry noise
    exact = built("onnxruntime", lite0, artifacts)
    assert exact.artifact is not None
    graph = onnx.load(str(exact.artifact))
    exact.close()
    convs = [node.input[1] for node in graph.graph.node if node.op_type == "Conv"]
    weights = next(t for t in graph.graph.initializer if t.name == convs[-1])
    values = numpy_helper.to_array(weights)
    noise = np.random.default_rng(0).normal(0, values.std() * 0.5, values.shape)
    weights.CopyFrom(numpy_helper.from_array((values + noise).astype(values.dtype),
                                             weights.name))
    perturbed = tmp_path / "perturbed.onnx"
    onnx.save(graph, str(perturbed))
    runner = OnnxRunner(perturbed, MAX_BATCH, SHAPE, features=True)
    runner.open()
    drifted = runner.run_features(photos)[1]

    # when the guard judges both against eager fp32
    exact_features = OnnxRunner(exact.artifact, MAX_BATCH, SHAPE, features=True)
    exact_features.open()
    accepted = feature_agreement(eager, exact_features.run_features(photos)[1])
    refused = feature_agreement(eager, drifted)

    # then the exact export passes and the perturbed one is refused, with its numbers
    assert refusal(accepted) is None
    why = refusal(refused)
    assert why is not None and "\n" not in why
    assert f"minimum {refused.min_cosine:.4f}" in why and f"under {MIN_COSINE}" in why


def test_the_guard_refuses_one_turned_vector_that_the_mean_hides(eager):
    # given eager's own features, with one photograph's vector swapped for another's
    turned = eager.copy()
    turned[0] = eager[1]
    many = np.concatenate([eager] * 30)  # 180 rows: one bad row barely moves the mean
    bad = np.concatenate([turned] + [eager] * 29)

    agreement = feature_agreement(many, bad)

    # then the mean passes, the minimum does not, and the variant is refused
    assert agreement.mean_cosine >= MIN_COSINE and agreement.min_cosine < MIN_COSINE
    assert refusal(agreement) is not None
    assert refusal(feature_agreement(many, many * 3.0)) is None  # a scale is no drift


def test_two_zero_vectors_agree_and_shapes_must_match():
    zeros = np.zeros((2, 4), np.float32)
    assert feature_agreement(zeros, zeros).min_cosine == 1.0
    with pytest.raises(ValueError, match="shape"):
        feature_agreement(zeros, np.zeros((2, 5), np.float32))


# --- optimize's choice for embeddings, as its profile keeps it --------------------


def test_a_profile_keeps_the_variant_for_embeddings_and_why_the_choice_is_not_it(tmp_path):
    import json

    from pipeline.prebuilt import ModelCard
    from pipeline.profiles import UNCHECKED, chosen, profile_path, write_profile

    card = ModelCard("efficientnet_lite0", ["a"], "0" * 32)
    why = "features' cosine to eager fp32's: mean 0.9938, minimum 0.9693 over 100 photographs"

    # given optimize's choice, int8, refused for embeddings, and fp32 accepted for them
    write_profile(tmp_path, card, Variant("onnxruntime", "int8"), tmp_path, {}, {},
                  embeddings=Variant("onnxruntime"), embeddings_refused=why)
    profile = chosen(tmp_path, card)
    assert profile is not None and profile.variant == Variant("onnxruntime", "int8")
    assert (profile.embeddings, profile.embeddings_refused) == (Variant("onnxruntime"), why)

    # a profile written before features were judged names no variant for them, and says so
    fields = json.loads(profile_path(tmp_path, card).read_text())
    del fields["embeddings"], fields["embeddings_refused"]
    profile_path(tmp_path, card).write_text(json.dumps(fields))
    old = chosen(tmp_path, card)
    assert old is not None and (old.embeddings, old.embeddings_refused) == (None, UNCHECKED)

    # and one whose variant for embeddings is not a variant is no profile at all
    profile_path(tmp_path, card).write_text(json.dumps(
        {**fields, "embeddings": {"backend": "onnxruntime", "precision": "fp16"}}))
    assert chosen(tmp_path, card) is None
