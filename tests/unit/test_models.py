"""load_model: the bundled EfficientNet-Lite0, torchvision state_dicts, TorchScript."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torchvision

from pipeline.backends import TorchBackend
from pipeline.errors import ModelLoadError
from pipeline.models import LoadedModel, load_model
from pipeline.models.registry import IMAGENET_MEAN, IMAGENET_STD
from pipeline.predictions import top_k
from pipeline.preprocess.pillow import preprocess
from pipeline.spec import InputLimits, PreprocessSpec
from tests.builders import MeanColour

CAT_CLASSES = {"tabby", "tiger cat", "Egyptian cat"}


@pytest.fixture(scope="module")
def default_model() -> LoadedModel:
    return load_model()


@pytest.fixture(scope="module")
def default_backend(default_model):
    backend = TorchBackend(default_model, torch.device("cpu"), max_batch_size=4,
                           sample_shape=(3, 224, 224))
    backend.setup()
    yield backend
    backend.close()


@pytest.fixture(scope="module")
def mobilenet_weights(tmp_path_factory) -> Path:
    """A randomly initialised mobilenet_v3_small state_dict saved to disk."""
    path = tmp_path_factory.mktemp("weights") / "mobilenet_v3_small.pth"
    torch.manual_seed(0)
    torch.save(torchvision.models.mobilenet_v3_small(weights=None).state_dict(), path)
    return path


def write_labels(path: Path, count: int) -> Path:
    path.write_text("".join(f"thing {index}\n" for index in range(count)), encoding="utf-8")
    return path


# --- the default model ------------------------------------------------------


def test_default_model_loads_with_the_imagenet_labels(default_model):
    assert default_model.name == "efficientnet_lite0"
    assert len(default_model.labels) == 1000
    assert default_model.labels[0] == "tench"
    assert default_model.labels[967] == "espresso"
    assert not default_model.module.training
    assert len(default_model.weights_digest) == 32


@pytest.mark.parametrize(("name", "expected"), [
    ("coffee.jpg", {"espresso"}),
    ("chelsea.jpg", CAT_CLASSES),
])
def test_default_model_classifies_the_samples(default_model, default_backend, samples_dir,
                                              name, expected):
    # given a sample preprocessed by the pillow backend
    pixels = preprocess((samples_dir / name).read_bytes(), PreprocessSpec(), InputLimits())

    # when the model scores it (normalisation runs in the torch backend)
    logits = default_backend.predict([pixels])
    (predictions,) = top_k(logits, 5, default_model.labels)

    # then the top-1 is the right class
    assert logits.shape == (1, 1000)
    assert predictions[0]["label"] in expected, predictions
    assert [p["score"] for p in predictions] == sorted((p["score"] for p in predictions),
                                                       reverse=True)


def test_batched_prediction_equals_one_at_a_time(default_backend, samples_dir):
    # given both samples
    spec, limits = PreprocessSpec(), InputLimits()
    coffee = preprocess((samples_dir / "coffee.jpg").read_bytes(), spec, limits)
    cat = preprocess((samples_dir / "chelsea.jpg").read_bytes(), spec, limits)

    # when scored together and separately
    together = default_backend.predict([coffee, cat]).clone()
    alone = torch.cat([default_backend.predict([coffee]).clone(),
                       default_backend.predict([cat]).clone()])

    # then the rows agree (batching does not mix samples up)
    torch.testing.assert_close(together, alone, atol=1e-3, rtol=1e-3)


def test_same_weights_give_the_same_digest(default_model):
    assert load_model().weights_digest == default_model.weights_digest


# --- torchvision architectures ----------------------------------------------


def test_torchvision_architecture_loads_a_local_state_dict(mobilenet_weights):
    # when a torchvision architecture is loaded with a saved state_dict
    model = load_model("mobilenet_v3_small", mobilenet_weights)

    # then it has those weights, ImageNet normalisation and labels
    expected = torch.load(mobilenet_weights, weights_only=True)
    for key, value in model.module.state_dict().items():
        torch.testing.assert_close(value, expected[key])
    assert model.mean == IMAGENET_MEAN and model.std == IMAGENET_STD
    assert len(model.labels) == 1000 and model.labels[967] == "espresso"
    assert not model.module.training


def test_torchvision_state_dict_with_another_head_size_gets_its_labels(tmp_path):
    # given a 7-class mobilenet_v3_small and a 7-line labels file
    weights = tmp_path / "seven.pth"
    torch.save(torchvision.models.mobilenet_v3_small(num_classes=7).state_dict(), weights)
    labels = write_labels(tmp_path / "labels.txt", 7)

    # when / then
    model = load_model("mobilenet_v3_small", weights, labels)
    assert model.labels == [f"thing {index}" for index in range(7)]


def test_state_dict_saved_from_data_parallel_loads(tmp_path, mobilenet_weights):
    # given the same weights with DataParallel's "module." prefix, in a checkpoint dict
    state = torch.load(mobilenet_weights, weights_only=True)
    wrapped = tmp_path / "checkpoint.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}}, wrapped)

    # when / then
    assert len(load_model("mobilenet_v3_small", wrapped).labels) == 1000


def test_missing_weights_file_is_named(tmp_path):
    missing = tmp_path / "resnet50.pth"
    with pytest.raises(ModelLoadError, match=r"resnet50\.pth.*does not exist"):
        load_model("mobilenet_v3_small", missing)


def test_state_dict_of_another_architecture_does_not_match(tmp_path):
    # given shufflenet weights
    weights = tmp_path / "shufflenet.pth"
    torch.save(torchvision.models.shufflenet_v2_x0_5().state_dict(), weights)

    # when they are loaded into mobilenet_v3_small
    with pytest.raises(ModelLoadError) as caught:
        load_model("mobilenet_v3_small", weights)

    # then the error names the file and says it does not match
    message = str(caught.value)
    assert "shufflenet.pth" in message
    assert "does not match" in message and "mobilenet_v3_small" in message
    assert "\n" not in message


def test_file_that_is_not_a_state_dict_is_refused(tmp_path):
    garbage = tmp_path / "weights.pth"
    garbage.write_bytes(b"definitely not a pickle" * 10)
    with pytest.raises(ModelLoadError, match="not a PyTorch state_dict"):
        load_model("mobilenet_v3_small", garbage)


def test_torchvision_model_without_weights_is_refused():
    with pytest.raises(ModelLoadError, match="weights"):
        load_model("mobilenet_v3_small")


def test_unknown_model_name_is_refused():
    with pytest.raises(ModelLoadError, match="unknown model 'resnet9000'"):
        load_model("resnet9000")


# --- TorchScript ------------------------------------------------------------


@pytest.fixture(params=["script", "trace"])
def torchscript_file(request, tmp_path) -> Path:
    module = MeanColour(10).eval()
    if request.param == "script":
        compiled = torch.jit.script(module)
    else:
        compiled = torch.jit.trace(module, torch.zeros(2, 3, 32, 32))
    path = tmp_path / f"tiny_{request.param}.pt"
    compiled.save(str(path))
    return path


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_torchscript_file_loads_with_its_labels(torchscript_file, tmp_path):
    # given a TorchScript classifier with 10 outputs and a 10-line labels file
    labels = write_labels(tmp_path / "labels.txt", 10)

    # when it is loaded by path
    model = load_model(str(torchscript_file), labels=labels)

    # then it has those labels and ImageNet normalisation
    assert model.labels == [f"thing {index}" for index in range(10)]
    assert model.mean == IMAGENET_MEAN
    assert model.module(torch.zeros(3, 3, 224, 224)).shape == (3, 10)


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_torchscript_without_labels_gets_generic_names(torchscript_file):
    model = load_model(str(torchscript_file))
    assert model.labels == [f"class_{index}" for index in range(10)]


@pytest.mark.filterwarnings("ignore::FutureWarning")
@pytest.mark.parametrize("count", [9, 11])
def test_labels_file_of_the_wrong_length_is_refused(torchscript_file, tmp_path, count):
    labels = write_labels(tmp_path / "labels.txt", count)
    with pytest.raises(ModelLoadError, match=rf"{count} names.*10 outputs"):
        load_model(str(torchscript_file), labels=labels)


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_trailing_blank_lines_in_labels_are_ignored(torchscript_file, tmp_path):
    labels = tmp_path / "labels.txt"
    labels.write_text("".join(f"thing {i}\n" for i in range(10)) + "\n\n", encoding="utf-8")
    assert len(load_model(str(torchscript_file), labels=labels).labels) == 10


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_file_that_is_not_torchscript_is_refused(tmp_path):
    # given a plain state_dict passed where a TorchScript file is expected
    path = tmp_path / "weights.pt"
    torch.save(MeanColour(10).state_dict(), path)
    with pytest.raises(ModelLoadError, match="not a loadable TorchScript file"):
        load_model(str(path))


def test_a_bare_cuda_device_means_gpu_0(default_model):
    # torch.cuda.set_device refuses a device without an index; nothing touches CUDA here.
    backend = TorchBackend(default_model, torch.device("cuda"), 4, (3, 224, 224))
    assert backend.device == torch.device("cuda", 0)
    assert TorchBackend(default_model, torch.device("cuda", 1), 4,
                        (3, 224, 224)).device == torch.device("cuda", 1)


def test_a_gpu_pads_batches_to_a_few_sizes_and_the_cpu_does_not(default_model):
    from pipeline.backends.torch import batch_buckets

    assert batch_buckets(32) == (1, 8, 32)
    assert batch_buckets(256) == (1, 8, 32, 128, 256)
    assert batch_buckets(5) == (1, 5)
    assert TorchBackend(default_model, torch.device("cuda", 0), 32, (3, 224, 224)).buckets \
        == (1, 8, 32)
    assert TorchBackend(default_model, torch.device("cpu"), 32, (3, 224, 224)).buckets == ()


def test_a_padded_batch_gives_each_image_its_own_logits(default_model, samples_dir):
    # given the samples, scored as they come
    pixels = [preprocess((samples_dir / name).read_bytes(), PreprocessSpec(), InputLimits())
              for name in ("coffee.jpg", "chelsea.jpg", "rocket.jpg")]
    plain = TorchBackend(default_model, torch.device("cpu"), 8, (3, 224, 224))
    plain.setup()
    expected = plain.predict(pixels).clone()
    # when the same backend pads them to a batch of 8, as a GPU does
    plain.buckets = (8,)
    padded = plain.predict(pixels)
    # then each image's logits are its own and the padding rows are dropped
    assert padded.shape == expected.shape
    assert torch.allclose(padded, expected, atol=1e-4)
