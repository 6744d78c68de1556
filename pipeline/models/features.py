"""A classifier's pooled penultimate features, taken in the same forward pass
as its logits.

torchvision classifiers and EfficientNet-Lite0 end in a linear layer applied
to the pooled features (after dropout, a no-op in eval mode): the input of
that last layer is the embedding, so a forward pre-hook on it captures the
features without running the model twice or knowing each architecture's
layer names. A TorchScript model cannot be hooked: it declares the features
itself, as an exported method `embed(x)` returning one row per image.

`WithFeatures` makes the pair a module's own output, so that what is traced,
exported or compiled from it (TorchScript, ONNX, `torch.compile`) returns
(logits, features) from one graph, as eager PyTorch does.
"""

from __future__ import annotations

from typing import Any, Optional

import torch

from pipeline.errors import ModelLoadError
from pipeline.models.registry import LoadedModel

EMBED_METHOD = "embed"


class FeatureTap:
    """Runs a model's module and returns (logits, features) for one input batch.

    ModelLoadError, naming the model and `setting`, when it has no head to tap.
    """

    def __init__(self, model: LoadedModel, setting: str) -> None:
        self.module: Any = model.module
        self._captured: Optional[torch.Tensor] = None
        self._hook: Any = None
        if isinstance(self.module, torch.jit.ScriptModule):
            if not hasattr(self.module, EMBED_METHOD):
                raise ModelLoadError(
                    f"model {model.name} cannot give embeddings ({setting}): a TorchScript "
                    f"model needs an exported {EMBED_METHOD}(x) method returning pooled "
                    f"features; use model.output = 'logits'")
            return
        head = _classifier_head(model.module, len(model.labels))
        if head is None:
            raise ModelLoadError(f"model {model.name} cannot give embeddings ({setting}): "
                                 f"its classifier is not a final linear layer; use "
                                 f"model.output = 'logits'")
        self._hook = head.register_forward_pre_hook(self._capture)

    def __call__(self, module: Any, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`module` (the tapped one, moved or compiled) run on `x`."""
        if self._hook is None:  # TorchScript: its own method, a second pass
            return module(x), getattr(module, EMBED_METHOD)(x)
        self._captured = None
        logits = module(x)
        features, self._captured = self._captured, None
        if features is None:
            raise RuntimeError("the classifier head did not run")
        return logits, features

    def close(self) -> None:
        if self._hook is not None:
            self._hook.remove()
            self._hook = None

    def _capture(self, _layer: Any, inputs: tuple[Any, ...]) -> None:
        self._captured = torch.flatten(inputs[0], 1)


class WithFeatures(torch.nn.Module):
    """A model whose forward returns (logits, features): the tap's hook is traced,
    exported or compiled with it. `close()` removes the hook from the model."""

    def __init__(self, model: LoadedModel, setting: str) -> None:
        super().__init__()
        self.module = model.module
        self.tap = FeatureTap(model, setting)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.tap(self.module, x)

    def close(self) -> None:
        self.tap.close()


def _classifier_head(module: torch.nn.Module, classes: int) -> Optional[torch.nn.Linear]:
    """The last linear layer, when it is the one that gives the class logits."""
    linears = [layer for layer in module.modules() if isinstance(layer, torch.nn.Linear)]
    if linears and linears[-1].out_features == classes:
        return linears[-1]
    return None
