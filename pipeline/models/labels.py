"""Class names: ImageNet's from torchvision, or a user's labels file."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from pipeline.errors import ModelLoadError


def imagenet_labels() -> list[str]:
    """The 1,000 ImageNet-1k class names, in the standard index order."""
    from torchvision.models import ResNet50_Weights

    return list(ResNet50_Weights.IMAGENET1K_V1.meta["categories"])


def read_labels(path: Path) -> list[str]:
    """One class name per line; blank trailing lines are ignored."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise ModelLoadError(f"cannot read labels file {path}: {exc.strerror}") from exc
    labels = [line.strip() for line in lines]
    while labels and not labels[-1]:
        labels.pop()
    if not labels:
        raise ModelLoadError(f"labels file {path} is empty")
    return labels


def resolve_labels(path: Optional[Path], num_classes: int) -> list[str]:
    """The labels for a model with `num_classes` outputs; sizes must agree."""
    if path is not None:
        labels = read_labels(path)
    elif num_classes == 1000:
        labels = imagenet_labels()
    else:
        return [f"class_{index}" for index in range(num_classes)]
    if len(labels) != num_classes:
        raise ModelLoadError(
            f"labels file {path} has {len(labels)} names but the model has "
            f"{num_classes} outputs")
    return labels
