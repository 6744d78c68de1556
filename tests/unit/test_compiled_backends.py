"""TorchScript, torch.compile, int8 and bf16 variants against eager fp32, on real photos."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.backends import TorchBackend, Variant, create_inference_backend
from pipeline.backends.artifacts import ArtifactStore
from pipeline.backends.calibration import CalibrationSet
from pipeline.backends.onnx import int8_recipe
from pipeline.backends.torchscript import TorchScriptBackend
from pipeline.backends.validation import agreement, check
from pipeline.config import load_settings
from pipeline.cpu_features import native_bf16
from pipeline.errors import ModelLoadError
from pipeline.models import LoadedModel, load_model
from pipeline.spec import InputLimits, PreprocessSpec
from tests.builders import near_tie_mobilenet, random_mobilenet, small_cnn

CPU = torch.device("cpu")
SHAPE = (3, 224, 224)
MAX_BATCH = 8


@pytest.fixture(scope="module")
def lite0() -> LoadedModel:
    return load_model()


@pytest.fixture(scope="module")
def reference(lite0):
    backend = TorchBackend(lite0, CPU, MAX_BATCH, SHAPE)
    backend.setup()
    yield backend
    backend.close()


@pytest.fixture(scope="module")
def mobilenets(tmp_path_factory) -> list[LoadedModel]:
    folder = tmp_path_factory.mktemp("weights")
    models = []
    for seed in (0, 1):
        torch.save(random_mobilenet(seed), folder / f"mobilenet_{seed}.pth")
        models.append(load_model("mobilenet_v3_small", folder / f"mobilenet_{seed}.pth"))
    return models


def variant(name: str, model: LoadedModel, cache_dir: Path, calibration=None):
    backend = create_inference_backend(Variant.parse(name), model, CPU, MAX_BATCH, SHAPE, 0,
                                       cache_dir / "artifacts", calibration)
    backend.setup()
    return backend


# --- TorchScript ---------------------------------------------------------------


def test_torchscript_gives_the_eager_top1_on_every_photo(lite0, reference, photos, tmp_path):
    backend = variant("torchscript", lite0, tmp_path)

    result = agreement(reference, backend, photos)

    print(f"\nEfficientNet-Lite0 TorchScript vs eager: {result}")
    assert result.top1 == 1.0 and result.max_score_drift < 1e-4
    check(result, threshold=1.0)
    # traced at batch 2, it runs any batch size the same
    one_by_one = torch.cat([backend.predict([p]) for p in photos[:3]])
    torch.testing.assert_close(backend.predict(photos[:3]), one_by_one, rtol=1e-4, atol=1e-4)


def test_torchscript_artifact_is_reused_and_rebuilt_for_new_weights(mobilenets, photos,
                                                                     tmp_path):
    # given the first model traced once
    store = ArtifactStore.in_cache(tmp_path)
    first = variant("torchscript", mobilenets[0], tmp_path)
    assert isinstance(first, TorchScriptBackend) and first.export_s > 0
    written = first.artifact.stat().st_mtime_ns

    # when the same model sets up again, then the other weights
    again = variant("torchscript", mobilenets[0], tmp_path)
    other = variant("torchscript", mobilenets[1], tmp_path)

    # then the first file is loaded as it is, and the new weights get their own
    assert again.export_s == 0 and again.artifact == first.artifact
    assert first.artifact.stat().st_mtime_ns == written
    assert other.export_s > 0 and other.artifact != first.artifact
    assert len(list(store.entries())) == 2
    torch.testing.assert_close(again.predict(photos[:2]), first.predict(photos[:2]))


def test_a_corrupt_torchscript_artifact_is_rebuilt(mobilenets, photos, tmp_path):
    expected = variant("torchscript", mobilenets[0], tmp_path).predict(photos[:1])
    (artifact,) = (tmp_path / "artifacts").glob("*.pt")
    artifact.write_bytes(b"truncated")

    rebuilt = variant("torchscript", mobilenets[0], tmp_path)

    assert rebuilt.export_s > 0
    torch.testing.assert_close(rebuilt.predict(photos[:1]), expected)


# --- torch.compile -------------------------------------------------------------


def test_torch_compile_gives_the_eager_top1_and_keeps_its_kernels(photos, tmp_path,
                                                                  monkeypatch):
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    model = small_cnn()
    eager = TorchBackend(model, CPU, MAX_BATCH, SHAPE)
    eager.setup()

    compiled = variant("torch-compile", model, tmp_path)

    result = agreement(eager, compiled, photos)
    assert compiled.name == "torch-compile"
    assert result.top1 == 1.0 and result.max_score_drift < 1e-4
    kernels = tmp_path / "artifacts" / "inductor"
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(kernels)
    assert any(path.is_file() for path in kernels.rglob("*"))


def test_cuda_graphs_compile_in_reduce_overhead_mode(photos, tmp_path, monkeypatch):
    # given torch.compile watched, and a CUDA-graph backend built on the CPU (where
    # the variant is refused: inductor compiles without capturing graphs)
    modes = []
    compile_ = torch.compile
    monkeypatch.setattr(torch, "compile", lambda module, **kw: modes.append(kw.get("mode"))
                        or compile_(module, **kw))
    model = small_cnn()
    eager = TorchBackend(model, CPU, MAX_BATCH, SHAPE)
    eager.setup()
    graphs = TorchBackend(model, CPU, MAX_BATCH, SHAPE, compile_cache=tmp_path / "inductor",
                          graphs=True)

    # when it is set up and scores the photographs
    graphs.setup()

    # then it compiled for CUDA graphs, and scores like eager
    assert modes == ["reduce-overhead"] and graphs.name == "torch-graphs"
    torch.testing.assert_close(graphs.predict(photos), eager.predict(photos),
                               atol=1e-4, rtol=1e-4)


class StaticOutput(torch.nn.Module):
    """Writes every batch's logits into one buffer, as a replayed CUDA graph does."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("logits", torch.zeros(MAX_BATCH, 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.shape[0]
        self.logits[:rows, 0] = x.mean(dim=(1, 2, 3))
        return self.logits[:rows]


def test_a_cuda_graph_batch_keeps_its_logits_after_the_next_replay(tmp_path, monkeypatch):
    # given a CUDA-graph backend whose model reuses its output memory, as a graph does
    monkeypatch.setattr(torch, "compile", lambda module, **kw: module)
    model = LoadedModel("static", StaticOutput(), (0.0,) * 3, (1.0,) * 3, ["a", "b"], "2" * 32)
    graphs = TorchBackend(model, CPU, MAX_BATCH, SHAPE, compile_cache=tmp_path / "inductor",
                          graphs=True)
    graphs.setup()

    # when a dark batch is scored, then a bright one
    dark = graphs.predict([np.full(SHAPE, 10, np.uint8)] * 2)
    graphs.predict([np.full(SHAPE, 200, np.uint8)] * 2)

    # then the dark batch's logits are still its own
    assert dark[:, 0].tolist() == [10.0, 10.0]


def test_cuda_graphs_are_refused_off_a_gpu(tmp_path):
    with pytest.raises(ModelLoadError, match="torch-graphs needs a CUDA device"):
        variant("torch-graphs", small_cnn(), tmp_path)


def test_torch_compile_refuses_a_torchscript_model(tmp_path):
    scripted = torch.jit.script(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3, 2)))
    model = LoadedModel("scripted", scripted, (0.5,) * 3, (0.5,) * 3, ["a", "b"], "0" * 32)
    with pytest.raises(ModelLoadError, match="torch.compile cannot trace a TorchScript model"):
        variant("torch-compile", model, tmp_path)


# --- int8 ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def calibration(samples_dir, tmp_path_factory) -> CalibrationSet:
    folder = tmp_path_factory.mktemp("calibration")
    for photo in samples_dir.iterdir():
        (folder / photo.name).write_bytes(photo.read_bytes())
    return CalibrationSet.from_directory(folder, PreprocessSpec(), InputLimits())


def test_int8_is_calibrated_on_real_photos_and_its_agreement_measured(
        lite0, reference, photos, calibration, tmp_path):
    backend = variant("onnxruntime:int8", lite0, tmp_path, calibration)

    result = agreement(reference, backend, photos)

    print(f"\nEfficientNet-Lite0 int8 vs eager fp32: {result}")
    assert result.images == len(photos)
    assert 0 < result.max_score_drift < 0.5  # quantized, yet still the same model
    sidecar = json.loads(backend.artifact.with_suffix(".json").read_text())
    assert sidecar["precision"] == "int8"
    assert f"calibration:{calibration.digest()}" in sidecar["recipe"]
    assert int8_recipe() in sidecar["recipe"]  # 7-bit weights on this CPU or not
    import onnx

    ops = {node.op_type for node in onnx.load(str(backend.artifact)).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops


def test_int8_is_reused_and_rebuilt_when_its_calibration_images_change(lite0, calibration,
                                                                        tmp_path):
    store = ArtifactStore.in_cache(tmp_path)
    first = variant("onnxruntime:int8", lite0, tmp_path, calibration)
    assert len(list(store.entries())) == 2  # the fp32 export and the int8 graph

    again = variant("onnxruntime:int8", lite0, tmp_path, calibration)
    assert again.export_s == 0 and again.artifact == first.artifact

    touched = Path(calibration.files[0])
    os.utime(touched, ns=(touched.stat().st_atime_ns, touched.stat().st_mtime_ns + 10**9))
    recalibrated = variant("onnxruntime:int8", lite0, tmp_path,
                           CalibrationSet.from_directory(touched.parent, PreprocessSpec(),
                                                         InputLimits()))
    assert recalibrated.artifact != first.artifact
    assert len(list(store.entries())) == 3  # the fp32 export was reused


def test_int8_without_calibration_images_says_how_to_get_them(lite0, tmp_path):
    with pytest.raises(ModelLoadError, match="needs calibration images: set "
                                             "model.calibration_images"):
        variant("onnxruntime:int8", lite0, tmp_path)


# --- reduced precision refused by optimize --------------------------------------


@pytest.mark.skipif(not native_bf16(), reason="bf16 is emulated on this CPU, so never offered "
                    "here (and 100 photographs in emulated bf16 take minutes)")
def test_optimize_refuses_bf16_that_ties_what_fp32_ranks(tmp_path):
    from pipeline import optimize, profiles

    photos = Path(__file__).resolve().parents[3] / "shared" / "data" / "imagenet-val-100"
    if not photos.is_dir():
        pytest.skip(f"{photos} is absent")
    # given a model whose classes differ by less than bf16 can tell apart
    weights = tmp_path / "near_tie.pth"
    torch.save(near_tie_mobilenet(0), weights)
    settings = load_settings(overrides={"model.name": "mobilenet_v3_small",
                                        "model.weights": str(weights),
                                        "cache.dir": str(tmp_path / "cache")})

    # when optimize compares eager fp32 with bf16 on 100 photographs, unlabelled
    outcome = optimize.run(settings, optimize.Options(
        photos, [Variant("torch"), Variant("torch", "bf16")], seconds=0.2, unlabelled=True,
        plan_images=0))  # the batch and thread plans are not what is judged here

    # then bf16 is refused with its agreement, and fp32 is chosen and written down
    fp32, bf16 = outcome.candidates
    assert fp32.accepted and fp32.top1_agreement == 1.0 and fp32.images == 100
    assert not bf16.accepted and bf16.top1_agreement < 0.93
    assert f"top-1 agreement {bf16.top1_agreement:.2%} under the 93.00% threshold" == bf16.why
    assert outcome.chosen == Variant("torch")
    profile = profiles.chosen(settings.cache.directory(), load_model(
        "mobilenet_v3_small", weights))
    assert profile is not None and profile.variant == Variant("torch")
