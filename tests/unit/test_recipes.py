"""Each model's own preprocessing recipe: from torchvision's weight metadata
(offline, no weights downloaded), EfficientNet-Lite0's, or the settings; and
the settings that override it, with the one-line errors for those that cannot work."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torchvision

from pipeline import recipes
from pipeline.config import PreprocessSettings, Settings, load_settings
from pipeline.errors import ConfigError
from pipeline.preprocess.select import resolve_backend
from pipeline.spec import PreprocessSpec

NO_ENV: dict[str, str] = {}
ROOT = Path(__file__).resolve().parents[2]


def settings_for(**flat: object) -> Settings:
    return load_settings(environ=NO_ENV, overrides=flat)


def metadata(name: str) -> tuple[int, tuple[int, int], str, list[float], list[float]]:
    """What torchvision's DEFAULT weights of `name` say, read offline."""
    preset = torchvision.models.get_model_weights(name).DEFAULT.transforms()
    (resize,), crop = preset.resize_size, preset.crop_size
    return (resize, (crop[0], crop[-1]), preset.interpolation.value,
            [m * 255 for m in preset.mean], [s * 255 for s in preset.std])


# --- where the recipe comes from -------------------------------------------


@pytest.mark.parametrize("name", ["resnet50", "resnet18", "efficientnet_b3", "inception_v3",
                                  "swin_t", "vit_h_14", "efficientnet_v2_l", "convnext_tiny"])
def test_a_torchvision_architecture_gets_its_default_weights_recipe(name: str) -> None:
    # given a torchvision architecture named with every preprocessing key on "auto"
    settings = settings_for(**{"model.name": name})

    # when the run's spec is made
    spec = settings.preprocess.spec()

    # then it is what the DEFAULT weights' transforms say (resnet50: 232, 224, bilinear;
    # efficientnet_b3: 320, 300, bicubic; inception_v3: 342, 299; ...), mean/std too
    resize, crop, interpolation, mean, std = metadata(name)
    assert (spec.resize_shorter, spec.crop_size, spec.interpolation) == \
        (resize, crop, interpolation)
    recipe = recipes.model_recipe(name)
    assert list(recipe.mean) == pytest.approx(mean) and list(recipe.std) == pytest.approx(std)
    assert str(torchvision.models.get_model_weights(name).DEFAULT) in recipe.source


def test_the_recipes_differ_between_architectures() -> None:
    specs = {name: settings_for(**{"model.name": name}).preprocess.spec()
             for name in ("resnet18", "resnet50", "efficientnet_b3", "inception_v3")}
    assert specs["resnet18"] == PreprocessSpec(256, 224, "bilinear")
    assert specs["resnet50"] == PreprocessSpec(232, 224, "bilinear")
    assert specs["efficientnet_b3"] == PreprocessSpec(320, 300, "bicubic")
    assert specs["inception_v3"] == PreprocessSpec(342, 299, "bilinear")


def test_the_stored_table_is_torchvisions_metadata_for_every_architecture() -> None:
    # The table spares a start-up importing torch; it must say what torchvision says.
    names = torchvision.models.list_models(module=torchvision.models)
    assert set(recipes.TORCHVISION) == set(names)
    for name in names:
        recipe = recipes.model_recipe(name)
        resize, crop, interpolation, mean, std = metadata(name)
        assert (recipe.resize_shorter, recipe.crop, recipe.interpolation) == \
            (resize, crop, interpolation), name
        assert list(recipe.mean) == pytest.approx(mean), name
        assert list(recipe.std) == pytest.approx(std), name


def test_an_architecture_missing_from_the_table_is_read_from_torchvision(monkeypatch) -> None:
    # given a torchvision newer than the table (resnet50 missing from it)
    monkeypatch.delitem(recipes.TORCHVISION, "resnet50")
    recipes._from_torchvision.cache_clear()

    # when its recipe is asked for, then it comes from torchvision's metadata
    recipe = recipes.model_recipe("resnet50")
    assert (recipe.resize_shorter, recipe.crop) == (232, (224, 224))
    assert recipe.source == "torchvision ResNet50_Weights.IMAGENET1K_V2"


def test_efficientnet_lite0_keeps_its_own_recipe() -> None:
    settings = settings_for()
    assert settings.preprocess.spec() == PreprocessSpec(256, 224, "bilinear")
    assert settings.preprocess.recipe.mean == (127.0, 127.0, 127.0)
    assert settings.preprocess.recipe.std == (128.0, 128.0, 128.0)
    assert settings.preprocess.describe() == \
        "resize 256, crop 224, bilinear (EfficientNet-Lite0's reference evaluation)"


def test_a_torchscript_file_takes_the_settings(tmp_path: Path) -> None:
    model = tmp_path / "model.pt"
    model.write_bytes(b"")
    settings = settings_for(**{"model.name": str(model), "preprocess.crop": "200x160",
                               "preprocess.interpolation": "bicubic"})
    assert settings.preprocess.spec() == PreprocessSpec(256, 200, "bicubic", crop_width=160)
    assert "TorchScript file carries no recipe" in settings.preprocess.recipe.source


def test_an_unknown_name_gets_the_default_recipe_until_loading_refuses_it() -> None:
    assert settings_for(**{"model.name": "resnet_typo"}).preprocess.spec() == PreprocessSpec()


def test_a_torchvision_recipe_is_known_without_importing_torch() -> None:
    # A run the cache answers, or one on a stored ONNX export, never imports torch.
    code = ("import sys; from pipeline.config import load_settings; "
            "s = load_settings(environ={}, overrides={'model.name': 'efficientnet_b3'}); "
            "print(s.preprocess.spec().crop, 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.stdout.split() == ["300", "False"]


# --- overrides --------------------------------------------------------------


def test_each_key_overrides_the_model_recipe_alone() -> None:
    settings = settings_for(**{"model.name": "efficientnet_b3", "preprocess.crop": 288})
    assert settings.preprocess.spec() == PreprocessSpec(320, 288, "bicubic")
    assert settings.preprocess.describe() == ("resize 320, crop 288, bicubic (preprocess.crop "
                                              "set; the rest from torchvision "
                                              "EfficientNet_B3_Weights.IMAGENET1K_V1)")
    every = settings_for(**{"model.name": "resnet50", "preprocess.resize_shorter": 300,
                            "preprocess.crop": 256, "preprocess.interpolation": "lanczos"})
    assert every.preprocess.spec() == PreprocessSpec(300, 256, "lanczos")


@pytest.mark.parametrize("value", ["224x192", [224, 192], " 224X192 "])
def test_a_non_square_crop_is_height_by_width(value: object) -> None:
    spec = settings_for(**{"preprocess.crop": value}).preprocess.spec()
    assert spec.crop_size == (224, 192) and spec.output_shape == (3, 224, 192)
    assert spec.describe() == "resize 256, crop 224x192, bilinear"


def test_a_square_crop_written_as_height_by_width_is_the_square_spec() -> None:
    spec = settings_for(**{"preprocess.crop": "200x200"}).preprocess.spec()
    assert spec == PreprocessSpec(256, 200) and spec.digest() == PreprocessSpec(256, 200).digest()


def test_a_non_square_crop_comes_from_the_environment() -> None:
    settings = load_settings(environ={"IMGPIPE_PREPROCESS__CROP": "192x224"})
    assert settings.preprocess.spec().crop_size == (192, 224)


@pytest.mark.parametrize("value", ["22x", "x22", "big", "0x10", "10x9000"])
def test_a_malformed_crop_names_the_key(value: str) -> None:
    with pytest.raises(ConfigError, match="preprocess.crop"):
        settings_for(**{"preprocess.crop": value})


def test_a_crop_larger_than_the_models_resize_names_both_keys_and_the_recipe() -> None:
    with pytest.raises(ConfigError) as caught:
        settings_for(**{"model.name": "resnet50", "preprocess.crop": "240x200"})
    message = str(caught.value)
    assert "\n" not in message
    assert "preprocess.crop (240x200)" in message
    assert "preprocess.resize_shorter (232) from resnet50's recipe" in message


def test_standalone_preprocess_settings_use_the_default_recipe() -> None:
    assert PreprocessSettings().spec() == PreprocessSpec()


def test_a_copied_settings_keeps_its_models_recipe() -> None:
    settings = settings_for(**{"model.name": "inception_v3"})
    copy = settings.model_copy(update={"batching": settings.batching.model_copy()})
    assert copy.preprocess.spec().crop == 299


# --- what a backend cannot reproduce ---------------------------------------


def test_an_interpolation_dali_lacks_is_one_line_naming_the_setting() -> None:
    with pytest.raises(ConfigError) as caught:
        settings_for(**{"preprocess.backend": "dali", "preprocess.interpolation": "box"})
    message = str(caught.value)
    assert "\n" not in message
    assert "preprocess.interpolation = 'box'" in message and "dali" in message


def test_auto_picks_pillow_on_a_gpu_for_a_recipe_dali_lacks() -> None:
    assert resolve_backend("auto", "cuda", PreprocessSpec(interpolation="hamming")) == "pillow"
    assert resolve_backend("auto", "cpu", PreprocessSpec()) == "pillow"


def test_pillow_reproduces_box_and_hamming(samples_dir: Path) -> None:
    from pipeline.preprocess.pillow import preprocess
    from pipeline.spec import InputLimits

    data = (samples_dir / "chelsea.jpg").read_bytes()
    outputs = {name: preprocess(data, PreprocessSpec(interpolation=name), InputLimits())
               for name in ("bilinear", "box", "hamming")}
    assert all(out.shape == (3, 224, 224) for out in outputs.values())
    assert not (outputs["box"] == outputs["hamming"]).all()


# --- the model follows the recipe ------------------------------------------


def test_a_torchvision_model_loads_with_its_recipes_normalisation(tmp_path: Path) -> None:
    from pipeline.models import load_model

    weights = tmp_path / "mobilenet_v3_small.pth"
    torch.save(torchvision.models.mobilenet_v3_small(num_classes=10).state_dict(), weights)
    model = load_model("mobilenet_v3_small", weights, input_size=(224, 192))
    assert model.mean == recipes.model_recipe("mobilenet_v3_small").mean
    assert recipes.model_recipe("efficientnet_v2_l").mean == (127.5, 127.5, 127.5)


def test_a_model_with_a_non_square_input_is_probed_at_its_crop(tmp_path: Path) -> None:
    from pipeline.models import load_model

    class OnlyTall(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if x.shape[2] != 224 or x.shape[3] != 192:
                raise RuntimeError("this model takes 224x192 input")
            return x.mean(dim=(2, 3))

    path = tmp_path / "tall.pt"
    torch.jit.script(OnlyTall()).save(str(path))
    labels = tmp_path / "labels.txt"
    labels.write_text("r\ng\nb\n")
    model = load_model(str(path), labels=labels, input_size=(224, 192))
    assert model.labels == ["r", "g", "b"]
