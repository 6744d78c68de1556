"""Inference backends: setup(device), predict(uint8 batch) -> logits, close()."""

from pipeline.backends.torch import TorchBackend, resolve_device

__all__ = ["TorchBackend", "resolve_device"]
