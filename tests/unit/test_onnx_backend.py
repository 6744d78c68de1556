"""The ONNX Runtime backend, its artifact store and the agreement check (real models)."""

from __future__ import annotations

import json
import multiprocessing
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.backends import TorchBackend
from pipeline.backends import onnx as onnx_module
from pipeline.backends.artifacts import ArtifactKey, ArtifactStore
from pipeline.backends.onnx import OnnxBackend
from pipeline.backends.validation import Agreement, agreement, check
from pipeline.errors import ModelLoadError
from pipeline.models import LoadedModel, load_model
from tests.builders import MeanColour, random_mobilenet

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

CPU = torch.device("cpu")
SHAPE = (3, 224, 224)
MAX_BATCH = 8


def torch_backend(model: LoadedModel):
    backend = TorchBackend(model, CPU, max_batch_size=MAX_BATCH, sample_shape=SHAPE)
    backend.setup()
    return backend


def onnx_backend(model: LoadedModel, store: ArtifactStore) -> OnnxBackend:
    backend = OnnxBackend(model, CPU, max_batch_size=MAX_BATCH, sample_shape=SHAPE,
                          store=store)
    backend.setup()
    return backend


@pytest.fixture(scope="module")
def lite0() -> LoadedModel:
    return load_model()


@pytest.fixture(scope="module")
def lite0_store(tmp_path_factory) -> ArtifactStore:
    return ArtifactStore(tmp_path_factory.mktemp("lite0-artifacts"))


@pytest.fixture(scope="module")
def lite0_torch(lite0):
    backend = torch_backend(lite0)
    yield backend
    backend.close()


@pytest.fixture(scope="module")
def lite0_onnx(lite0, lite0_store):
    backend = onnx_backend(lite0, lite0_store)
    yield backend
    backend.close()


@pytest.fixture(scope="module")
def mobilenets(tmp_path_factory) -> tuple[LoadedModel, LoadedModel]:
    """Two mobilenet_v3_small models with different random weights, loaded from files."""
    folder = tmp_path_factory.mktemp("weights")
    models = []
    for seed in (0, 1):
        path = folder / f"mobilenet_{seed}.pth"
        torch.save(random_mobilenet(seed), path)
        models.append(load_model("mobilenet_v3_small", path))
    return models[0], models[1]


@pytest.fixture(scope="module")
def mobilenet_store(tmp_path_factory) -> ArtifactStore:
    return ArtifactStore(tmp_path_factory.mktemp("mobilenet-artifacts"))


@pytest.fixture(scope="module")
def mobilenet_onnx(mobilenets, mobilenet_store):
    backends = [onnx_backend(model, mobilenet_store) for model in mobilenets]
    yield backends
    for backend in backends:
        backend.close()


# --- the default model ------------------------------------------------------


def test_onnx_gives_the_torch_top1_on_every_sample(lite0_torch, lite0_onnx, photos):
    # when both backends score every sample photograph
    result = agreement(lite0_torch, lite0_onnx, photos)

    # then every top-1 agrees and the probabilities barely move
    print(f"\nEfficientNet-Lite0 ONNX vs torch: {result}")
    assert result.images == len(photos) >= 6
    assert result.top1 == 1.0
    assert result.max_score_drift < 1e-3
    check(result, threshold=1.0)


def test_export_is_onnx_with_a_dynamic_uint8_batch(lite0_onnx):
    import onnx

    graph = onnx.load(str(lite0_onnx.artifact))
    (pixels,) = graph.graph.input
    dims = pixels.type.tensor_type.shape.dim
    assert pixels.type.tensor_type.elem_type == onnx.TensorProto.UINT8
    assert dims[0].dim_param and [d.dim_value for d in dims[1:]] == list(SHAPE)
    assert max(o.version for o in graph.opset_import if o.domain in ("", "ai.onnx")) >= 17


@pytest.mark.parametrize("size", [1, 3, MAX_BATCH])
def test_batches_of_any_size_match_one_at_a_time(lite0_onnx, photos, size):
    # given `size` samples (photos repeated to fill the batch)
    batch = [photos[i % len(photos)] for i in range(size)]

    # when scored together and one at a time
    together = lite0_onnx.predict(batch)
    alone = np.concatenate([lite0_onnx.predict([sample]) for sample in batch])

    # then one row per sample (NumPy logits: no torch needed to read them), the same
    # rows either way
    assert together.shape == (size, 1000) and together.dtype == np.float32
    np.testing.assert_allclose(together, alone, atol=1e-4, rtol=1e-4)


def test_a_batch_over_the_maximum_is_refused(lite0_onnx, photos):
    with pytest.raises(ValueError, match="does not fit"):
        lite0_onnx.predict([photos[0]] * (MAX_BATCH + 1))


def test_artifact_is_built_once_and_reused_by_the_next_setup(lite0, lite0_onnx, lite0_store,
                                                            photos):
    # given the fixture's backend built the artifact
    assert lite0_store.built == 1 and lite0_onnx.export_s > 0
    written = lite0_store.path_for(lite0_onnx.artifact_key()).stat().st_mtime_ns

    # when a second backend sets up on the same store
    second = onnx_backend(lite0, lite0_store)

    # then it loads the same file without exporting, and scores the same
    assert (lite0_store.built, lite0_store.reused) == (1, 1)
    assert second.export_s == 0.0 and second.artifact == lite0_onnx.artifact
    assert lite0_store.path_for(second.artifact_key()).stat().st_mtime_ns == written
    torch.testing.assert_close(second.predict(photos[:2]), lite0_onnx.predict(photos[:2]))
    second.close()


def test_sidecar_describes_the_artifact(lite0, lite0_onnx, lite0_store):
    (entry,) = list(lite0_store.entries())
    assert entry["file"] == lite0_onnx.artifact.name
    assert entry["model"] == "efficientnet_lite0"
    assert entry["weights_digest"] == lite0.weights_digest
    assert entry["backend"] == "onnxruntime" and entry["precision"] == "fp32"
    assert entry["input_policy"] == "dynamic-batch:3x224x224"
    assert set(entry["versions"]) >= {"torch", "onnx", "onnxruntime"}


# --- weights changes and the agreement check ---------------------------------


def test_changed_weights_build_a_new_artifact(mobilenets, mobilenet_onnx, mobilenet_store):
    # given two weights files for one architecture, each set up once
    first, second = mobilenet_onnx

    # then each got its own artifact
    assert mobilenets[0].weights_digest != mobilenets[1].weights_digest
    assert mobilenet_store.built == 2 and mobilenet_store.reused == 0
    assert first.artifact != second.artifact
    assert first.artifact.is_file() and second.artifact.is_file()


def test_onnx_of_the_same_random_weights_passes_the_check(mobilenets, mobilenet_onnx, photos):
    reference = torch_backend(mobilenets[0])
    result = agreement(reference, mobilenet_onnx[0], photos)
    check(result)
    assert result.top1 == 1.0 and result.max_score_drift < 1e-3


def test_check_refuses_a_candidate_that_disagrees(mobilenets, mobilenet_onnx, photos):
    # given a reference over one set of weights and a candidate over other weights
    reference = torch_backend(mobilenets[0])
    candidate = mobilenet_onnx[1]

    # when their agreement is measured
    result = agreement(reference, candidate, photos)

    # then it is under the threshold, and check says so in one line
    assert result.top1 < 0.99
    with pytest.raises(ModelLoadError, match=r"top-1 agreement [\d.]+% is under the 99% "
                                             r"threshold") as caught:
        check(result)
    assert "\n" not in str(caught.value)


def test_check_message_formats_the_fractions():
    with pytest.raises(ModelLoadError, match=r"agreement 97\.5% is under the 99% threshold"):
        check(Agreement(top1=0.975, max_score_drift=0.2, images=200))
    check(Agreement(top1=0.99, max_score_drift=0.0, images=100))


# --- TorchScript models, corrupt artifacts, export failures --------------------


@pytest.fixture
def scripted_model(tmp_path) -> LoadedModel:
    path = tmp_path / "tiny.pt"
    torch.jit.trace(MeanColour(10).eval(), torch.zeros(2, 3, 32, 32)).save(str(path))
    return load_model(str(path))


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_torchscript_model_exports_and_agrees(scripted_model, tmp_path, photos):
    store = ArtifactStore(tmp_path / "artifacts")
    backend = onnx_backend(scripted_model, store)
    assert backend.exporter == "torchscript"
    result = agreement(torch_backend(scripted_model), backend, photos)
    assert result.top1 == 1.0 and result.max_score_drift < 1e-4


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_a_corrupt_artifact_is_discarded_and_rebuilt(scripted_model, tmp_path, photos):
    # given a stored artifact that was damaged on disk
    store = ArtifactStore(tmp_path / "artifacts")
    expected = onnx_backend(scripted_model, store).predict(photos[:1])
    store.path_for(OnnxBackend(scripted_model, CPU, 1, SHAPE, store=store).artifact_key()
                   ).write_bytes(b"not an onnx file")

    # when a backend sets up again
    backend = onnx_backend(scripted_model, store)

    # then it rebuilt the artifact and works
    assert (store.built, store.reused) == (2, 1)
    torch.testing.assert_close(backend.predict(photos[:1]), expected)


class NotExportable(torch.nn.Module):
    """Branches on the data: torch.export cannot capture that as one graph."""

    def __init__(self) -> None:
        super().__init__()
        self.head = torch.nn.Linear(3, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        colour = x.mean(dim=(2, 3))
        if colour.sum() > 0:
            return self.head(colour)
        return self.head(-colour)


def test_export_failure_is_a_one_line_model_load_error(tmp_path):
    model = LoadedModel("not_exportable", NotExportable().eval(), (0.0,) * 3, (1.0,) * 3,
                        [str(i) for i in range(10)], "0" * 32)
    store = ArtifactStore(tmp_path / "artifacts")
    backend = OnnxBackend(model, CPU, 2, SHAPE, store=store)
    with pytest.raises(ModelLoadError, match="cannot export model 'not_exportable'") as caught:
        backend.setup()
    assert "\n" not in str(caught.value) and "data-dependent" in str(caught.value)
    assert store.built == 0 and not any(store.directory.iterdir())


# --- the artifact store -------------------------------------------------------


def key(**changes: str) -> ArtifactKey:
    fields = {"model": "m", "weights_digest": "w", "input_policy": "dynamic-batch:3x8x8",
              "recipe": "r1", **changes}
    return ArtifactKey(**fields, versions=(("onnx", "1"), ("torch", "2")))


def test_key_digest_is_stable_and_covers_every_field():
    assert key().digest() == key().digest() and len(key().digest()) == 32
    changed = [key(model="n"), key(weights_digest="v"), key(input_policy="x"),
               key(recipe="r2"), key(backend="tensorrt"), key(precision="fp16"),
               ArtifactKey("m", "w", "dynamic-batch:3x8x8", "r1", (("onnx", "2"),))]
    assert len({k.digest() for k in changed} | {key().digest()}) == len(changed) + 1


def test_store_builds_once_then_reuses(tmp_path):
    store = ArtifactStore(tmp_path / "store")
    calls = []

    def build(path: Path) -> None:
        calls.append(path)
        path.write_bytes(b"artifact")

    first = store.get_or_build(key(), build)
    second = ArtifactStore(tmp_path / "store").get_or_build(key(), build)  # a restart
    assert first == second and first.read_bytes() == b"artifact"
    assert len(calls) == 1 and calls[0].parent == first.parent  # built beside its target
    assert store.built == 1 and json.loads(store.sidecar_for(key()).read_text())["model"] == "m"


def test_a_failed_build_leaves_nothing_behind(tmp_path):
    store = ArtifactStore(tmp_path)

    def build(path: Path) -> None:
        path.write_bytes(b"half")
        raise RuntimeError("exporter crashed")

    with pytest.raises(RuntimeError, match="exporter crashed"):
        store.get_or_build(key(), build)
    assert list(tmp_path.iterdir()) == [] and store.built == 0


def test_discard_makes_the_next_call_rebuild(tmp_path):
    store = ArtifactStore(tmp_path)
    store.get_or_build(key(), lambda path: path.write_bytes(b"one"))
    store.discard(key())
    assert store.get_or_build(key(), lambda path: path.write_bytes(b"two")).read_bytes() == b"two"
    assert store.built == 2


def _build_concurrently(directory: str, barrier, tag: int) -> None:
    store = ArtifactStore(Path(directory))

    def build(path: Path) -> None:
        barrier.wait(timeout=30)  # every process has missed before any renames
        path.write_bytes(f"builder {tag} ".encode() * 1000)

    store.get_or_build(key(), build)
    os._exit(0 if store.built == 1 else 1)


def test_concurrent_builders_in_several_processes_all_succeed(tmp_path):
    context = multiprocessing.get_context("fork")
    barrier = context.Barrier(3)
    processes = [context.Process(target=_build_concurrently, args=(str(tmp_path), barrier, tag))
                 for tag in range(3)]
    for process in processes:
        process.start()
    for process in processes:
        process.join(timeout=60)

    assert [p.exitcode for p in processes] == [0, 0, 0]
    store = ArtifactStore(tmp_path)
    content = store.path_for(key()).read_bytes()
    assert content in {f"builder {tag} ".encode() * 1000 for tag in range(3)}
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [store.path_for(key()).name, store.sidecar_for(key()).name])  # no temporaries left


def test_the_int8_recipe_says_whether_its_range_was_reduced(monkeypatch):
    monkeypatch.setattr(onnx_module, "needs_reduced_int8_range", lambda: True)
    reduced = onnx_module.int8_recipe()
    monkeypatch.setattr(onnx_module, "needs_reduced_int8_range", lambda: False)
    assert reduced != onnx_module.int8_recipe() and reduced.endswith("/reduce-range")
