"""Each model's own preprocessing recipe, known without loading the model.

A recipe is what a classifier was trained and evaluated with: the shorter
side's size, the centre crop (height x width), the resampling filter and the
mean/std of the input normalisation. The engine needs it before the model
loads (the preprocessing workers start first, and the spec is part of the
cache's keys), so it comes from the model's name alone:

- `efficientnet_lite0`: its reference evaluation, resize 256, crop 224,
  bilinear, (x - 127) / 128.
- torchvision architectures: the metadata of their DEFAULT weights
  (`torchvision.models.get_model_weights(name).DEFAULT.transforms()`). That
  metadata is static, but reading it imports torch and torchvision (seconds),
  which a run the cache answers, or one on a stored ONNX export, never does:
  `TORCHVISION` holds it for the torchvision this was written against, and a
  test checks it against the installed torchvision. Names it lacks are read
  from torchvision itself.
- TorchScript files (and names no model has): the settings' defaults, resize
  256, crop 224, bilinear, ImageNet mean/std; a TorchScript file carries no
  recipe.

The settings (`preprocess.resize_shorter`, `crop`, `interpolation`) override
any part of it; "auto" keeps the model's. Nothing here imports torch unless
a name is missing from `TORCHVISION`.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from pipeline.spec import INTERPOLATIONS

DEFAULT_MODEL = "efficientnet_lite0"
# On the 0..255 scale of uint8 input.
IMAGENET_MEAN = (0.485 * 255, 0.456 * 255, 0.406 * 255)
IMAGENET_STD = (0.229 * 255, 0.224 * 255, 0.225 * 255)
# EfficientNet-Lite was trained on (x - 127) / 128, per its reference builder.
LITE_MEAN = (127.0, 127.0, 127.0)
LITE_STD = (128.0, 128.0, 128.0)
HALF = "half"  # mean 0.5, std 0.5 (on the 0..1 scale)
HALF_MEAN = (0.5 * 255,) * 3
HALF_STD = (0.5 * 255,) * 3

Triple = tuple[float, float, float]


@dataclass(frozen=True)
class Recipe:
    """A model's preprocessing: sizes, filter, normalisation, and where it comes from."""

    resize_shorter: int
    crop: tuple[int, int]  # (height, width)
    interpolation: str
    mean: Triple  # on the 0..255 scale
    std: Triple
    source: str  # in words, for the summary: "torchvision ResNet50_Weights.IMAGENET1K_V2"


GENERIC = Recipe(256, (224, 224), "bilinear", IMAGENET_MEAN, IMAGENET_STD, "imgpipe's default")
LITE0 = Recipe(256, (224, 224), "bilinear", LITE_MEAN, LITE_STD,
               "EfficientNet-Lite0's reference evaluation")

# name: (DEFAULT weights, resize_size, crop_size, interpolation[, normalisation]),
# from torchvision 0.29's weight metadata (ImageNet mean/std unless HALF).
TORCHVISION: dict[str, tuple[Any, ...]] = {
    "alexnet": ("AlexNet_Weights.IMAGENET1K_V1", 256, 224, "bilinear"),
    "convnext_base": ("ConvNeXt_Base_Weights.IMAGENET1K_V1", 232, 224, "bilinear"),
    "convnext_large": ("ConvNeXt_Large_Weights.IMAGENET1K_V1", 232, 224, "bilinear"),
    "convnext_small": ("ConvNeXt_Small_Weights.IMAGENET1K_V1", 230, 224, "bilinear"),
    "convnext_tiny": ("ConvNeXt_Tiny_Weights.IMAGENET1K_V1", 236, 224, "bilinear"),
    "densenet121": ("DenseNet121_Weights.IMAGENET1K_V1", 256, 224, "bilinear"),
    "densenet161": ("DenseNet161_Weights.IMAGENET1K_V1", 256, 224, "bilinear"),
    "densenet169": ("DenseNet169_Weights.IMAGENET1K_V1", 256, 224, "bilinear"),
    "densenet201": ("DenseNet201_Weights.IMAGENET1K_V1", 256, 224, "bilinear"),
    "efficientnet_b0": ("EfficientNet_B0_Weights.IMAGENET1K_V1", 256, 224, "bicubic"),
    "efficientnet_b1": ("EfficientNet_B1_Weights.IMAGENET1K_V2", 255, 240, "bilinear"),
    "efficientnet_b2": ("EfficientNet_B2_Weights.IMAGENET1K_V1", 288, 288, "bicubic"),
    "efficientnet_b3": ("EfficientNet_B3_Weights.IMAGENET1K_V1", 320, 300, "bicubic"),
    "efficientnet_b4": ("EfficientNet_B4_Weights.IMAGENET1K_V1", 384, 380, "bicubic"),
    "efficientnet_b5": ("EfficientNet_B5_Weights.IMAGENET1K_V1", 456, 456, "bicubic"),
    "efficientnet_b6": ("EfficientNet_B6_Weights.IMAGENET1K_V1", 528, 528, "bicubic"),
    "efficientnet_b7": ("EfficientNet_B7_Weights.IMAGENET1K_V1", 600, 600, "bicubic"),
    "efficientnet_v2_l": ("EfficientNet_V2_L_Weights.IMAGENET1K_V1", 480, 480, "bicubic", HALF),
    "efficientnet_v2_m": ("EfficientNet_V2_M_Weights.IMAGENET1K_V1", 480, 480, "bilinear"),
    "efficientnet_v2_s": ("EfficientNet_V2_S_Weights.IMAGENET1K_V1", 384, 384, "bilinear"),
    "googlenet": ("GoogLeNet_Weights.IMAGENET1K_V1", 256, 224, "bilinear"),
    "inception_v3": ("Inception_V3_Weights.IMAGENET1K_V1", 342, 299, "bilinear"),
    "maxvit_t": ("MaxVit_T_Weights.IMAGENET1K_V1", 224, 224, "bicubic"),
    "mnasnet0_5": ("MNASNet0_5_Weights.IMAGENET1K_V1", 256, 224, "bilinear"),
    "mnasnet0_75": ("MNASNet0_75_Weights.IMAGENET1K_V1", 232, 224, "bilinear"),
    "mnasnet1_0": ("MNASNet1_0_Weights.IMAGENET1K_V1", 256, 224, "bilinear"),
    "mnasnet1_3": ("MNASNet1_3_Weights.IMAGENET1K_V1", 232, 224, "bilinear"),
    "mobilenet_v2": ("MobileNet_V2_Weights.IMAGENET1K_V2", 232, 224, "bilinear"),
    "mobilenet_v3_large": ("MobileNet_V3_Large_Weights.IMAGENET1K_V2", 232, 224, "bilinear"),
    "mobilenet_v3_small": ("MobileNet_V3_Small_Weights.IMAGENET1K_V1", 256, 224, "bilinear"),
    "regnet_x_16gf": ("RegNet_X_16GF_Weights.IMAGENET1K_V2", 232, 224, "bilinear"),
    "regnet_x_1_6gf": ("RegNet_X_1_6GF_Weights.IMAGENET1K_V2", 232, 224, "bilinear"),
    "regnet_x_32gf": ("RegNet_X_32GF_Weights.IMAGENET1K_V2", 232, 224, "bilinear"),
    "regnet_x_3_2gf": ("RegNet_X_3_2GF_Weights.IMAGENET1K_V2", 232, 224, "bilinear"),
    "regnet_x_400mf": ("RegNet_X_400MF_Weights.IMAGENET1K_V2", 232, 224, "bilinear"),
    "regnet_x_800mf": ("RegNet_X_800MF_Weights.IMAGENET1K_V2", 232, 224, "bilinear"),
    "regnet_x_8gf": ("RegNet_X_8GF_Weights.IMAGENET1K_V2", 232, 224, "bilinear"),
    "regnet_y_128gf": ("RegNet_Y_128GF_Weights.IMAGENET1K_SWAG_E2E_V1", 384, 384, "bicubic"),
    "regnet_y_16gf": ("RegNet_Y_16GF_Weights.IMAGENET1K_V2", 232, 224, "bilinear"),
    "regnet_y_1_6gf": ("RegNet_Y_1_6GF_Weights.IMAGENET1K_V2", 232, 224, "bilinear"),
    "regnet_y_32gf": ("RegNet_Y_32GF_Weights.IMAGENET1K_V2", 232, 224, "bilinear"),
    "regnet_y_3_2gf": ("RegNet_Y_3_2GF_Weights.IMAGENET1K_V2", 232, 224, "bilinear"),
    "regnet_y_400mf": ("RegNet_Y_400MF_Weights.IMAGENET1K_V2", 232, 224, "bilinear"),
    "regnet_y_800mf": ("RegNet_Y_800MF_Weights.IMAGENET1K_V2", 232, 224, "bilinear"),
    "regnet_y_8gf": ("RegNet_Y_8GF_Weights.IMAGENET1K_V2", 232, 224, "bilinear"),
    "resnet101": ("ResNet101_Weights.IMAGENET1K_V2", 232, 224, "bilinear"),
    "resnet152": ("ResNet152_Weights.IMAGENET1K_V2", 232, 224, "bilinear"),
    "resnet18": ("ResNet18_Weights.IMAGENET1K_V1", 256, 224, "bilinear"),
    "resnet34": ("ResNet34_Weights.IMAGENET1K_V1", 256, 224, "bilinear"),
    "resnet50": ("ResNet50_Weights.IMAGENET1K_V2", 232, 224, "bilinear"),
    "resnext101_32x8d": ("ResNeXt101_32X8D_Weights.IMAGENET1K_V2", 232, 224, "bilinear"),
    "resnext101_64x4d": ("ResNeXt101_64X4D_Weights.IMAGENET1K_V1", 232, 224, "bilinear"),
    "resnext50_32x4d": ("ResNeXt50_32X4D_Weights.IMAGENET1K_V2", 232, 224, "bilinear"),
    "shufflenet_v2_x0_5": ("ShuffleNet_V2_X0_5_Weights.IMAGENET1K_V1", 256, 224, "bilinear"),
    "shufflenet_v2_x1_0": ("ShuffleNet_V2_X1_0_Weights.IMAGENET1K_V1", 256, 224, "bilinear"),
    "shufflenet_v2_x1_5": ("ShuffleNet_V2_X1_5_Weights.IMAGENET1K_V1", 232, 224, "bilinear"),
    "shufflenet_v2_x2_0": ("ShuffleNet_V2_X2_0_Weights.IMAGENET1K_V1", 232, 224, "bilinear"),
    "squeezenet1_0": ("SqueezeNet1_0_Weights.IMAGENET1K_V1", 256, 224, "bilinear"),
    "squeezenet1_1": ("SqueezeNet1_1_Weights.IMAGENET1K_V1", 256, 224, "bilinear"),
    "swin_b": ("Swin_B_Weights.IMAGENET1K_V1", 238, 224, "bicubic"),
    "swin_s": ("Swin_S_Weights.IMAGENET1K_V1", 246, 224, "bicubic"),
    "swin_t": ("Swin_T_Weights.IMAGENET1K_V1", 232, 224, "bicubic"),
    "swin_v2_b": ("Swin_V2_B_Weights.IMAGENET1K_V1", 272, 256, "bicubic"),
    "swin_v2_s": ("Swin_V2_S_Weights.IMAGENET1K_V1", 260, 256, "bicubic"),
    "swin_v2_t": ("Swin_V2_T_Weights.IMAGENET1K_V1", 260, 256, "bicubic"),
    "vgg11": ("VGG11_Weights.IMAGENET1K_V1", 256, 224, "bilinear"),
    "vgg11_bn": ("VGG11_BN_Weights.IMAGENET1K_V1", 256, 224, "bilinear"),
    "vgg13": ("VGG13_Weights.IMAGENET1K_V1", 256, 224, "bilinear"),
    "vgg13_bn": ("VGG13_BN_Weights.IMAGENET1K_V1", 256, 224, "bilinear"),
    "vgg16": ("VGG16_Weights.IMAGENET1K_V1", 256, 224, "bilinear"),
    "vgg16_bn": ("VGG16_BN_Weights.IMAGENET1K_V1", 256, 224, "bilinear"),
    "vgg19": ("VGG19_Weights.IMAGENET1K_V1", 256, 224, "bilinear"),
    "vgg19_bn": ("VGG19_BN_Weights.IMAGENET1K_V1", 256, 224, "bilinear"),
    "vit_b_16": ("ViT_B_16_Weights.IMAGENET1K_V1", 256, 224, "bilinear"),
    "vit_b_32": ("ViT_B_32_Weights.IMAGENET1K_V1", 256, 224, "bilinear"),
    "vit_h_14": ("ViT_H_14_Weights.IMAGENET1K_SWAG_E2E_V1", 518, 518, "bicubic"),
    "vit_l_16": ("ViT_L_16_Weights.IMAGENET1K_V1", 242, 224, "bilinear"),
    "vit_l_32": ("ViT_L_32_Weights.IMAGENET1K_V1", 256, 224, "bilinear"),
    "wide_resnet101_2": ("Wide_ResNet101_2_Weights.IMAGENET1K_V2", 232, 224, "bilinear"),
    "wide_resnet50_2": ("Wide_ResNet50_2_Weights.IMAGENET1K_V2", 232, 224, "bilinear"),
}


def model_recipe(name: str) -> Recipe:
    """The recipe of the model `name` names (see the module doc); never raises."""
    if name == DEFAULT_MODEL:
        return LITE0
    if _looks_like_path(name):
        return replace(GENERIC, source="imgpipe's default: a TorchScript file carries no "
                       "recipe")
    if name in TORCHVISION:
        return _from_table(name, TORCHVISION[name])
    return _from_torchvision(name)


def _from_table(name: str, entry: tuple[Any, ...]) -> Recipe:
    weights, resize, crop, interpolation, *normalisation = entry
    half = normalisation == [HALF]
    return Recipe(resize, (crop, crop), interpolation, HALF_MEAN if half else IMAGENET_MEAN,
                  HALF_STD if half else IMAGENET_STD, f"torchvision {weights}")


@functools.cache
def _from_torchvision(name: str) -> Recipe:
    """The recipe from torchvision's weight metadata; GENERIC for a name that is
    no torchvision model (loading it will say so) or when torchvision is missing."""
    try:
        import torchvision

        if name not in torchvision.models.list_models(module=torchvision.models):
            return GENERIC
        weights = torchvision.models.get_model_weights(name).DEFAULT
        return recipe_from_transforms(weights.transforms(), f"torchvision {weights}")
    except Exception:  # ImportError, or metadata of a shape this does not know
        return GENERIC


def recipe_from_transforms(transforms: Any, source: str) -> Recipe:
    """A Recipe from torchvision's `ImageClassification` preset (its weights' transforms)."""
    resize, crop = list(transforms.resize_size), list(transforms.crop_size)
    interpolation = str(transforms.interpolation.value)
    if len(resize) != 1 or interpolation not in INTERPOLATIONS:
        raise ValueError(f"unsupported torchvision preset: resize {resize}, {interpolation}")
    height, width = (crop[0], crop[0]) if len(crop) == 1 else (crop[0], crop[1])
    mean = [float(m) * 255 for m in transforms.mean]
    std = [float(s) * 255 for s in transforms.std]
    return Recipe(int(resize[0]), (int(height), int(width)), interpolation,
                  (mean[0], mean[1], mean[2]), (std[0], std[1], std[2]), source)


def _looks_like_path(name: str) -> bool:
    """A separator or an extension: model names have neither, file names usually do."""
    return os.sep in name or "/" in name or Path(name).suffix != "" or Path(name).is_file()
