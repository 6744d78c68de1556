"""TorchScript backend: the model traced with its normalisation, frozen, kept on disk.

The artifact is the frozen module (weights folded in as constants), saved with
``torch.jit.save``. Loading runs ``torch.jit.optimize_for_inference`` (conv-bn
folding, oneDNN layouts on the CPU); its output cannot be saved and reloaded,
so that pass runs on every load, in well under a second.

Traced for embeddings, the module returns (logits, features) (`WithFeatures`
traced with it); the recipe in its key says so, so a logits-only artifact is
never loaded where features are expected.
"""

from __future__ import annotations

import logging
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional

import torch

from pipeline.backends.artifacts import ArtifactKey, ArtifactStore, library_versions
from pipeline.backends.devices import on_device
from pipeline.backends.normalised import Normalised
from pipeline.backends.staging import StagingRing
from pipeline.cores import usable_cores
from pipeline.errors import ModelLoadError, root_cause
from pipeline.items import Pixels
from pipeline.models import LoadedModel
from pipeline.models.features import FeatureTap, WithFeatures
from pipeline.timing import warm_up

log = logging.getLogger("imgpipe.backends.torchscript")
RECIPE = "uint8-nchw-normalised/trace-freeze/v1"  # bump when trace() changes
FEATURES_RECIPE = "outputs:logits+features"  # in the key of a trace made for embeddings
TRACE_BATCH = 2


def trace(model: LoadedModel, sample_shape: tuple[int, int, int], device: torch.device,
          path: Path, embeddings: Optional[str] = None) -> None:
    """Trace `model` wrapped in `Normalised` on `device`, freeze it, save it to `path`;
    with `embeddings` (the setting asking for them), returning (logits, features)."""
    inner = model.module if embeddings is None else WithFeatures(model, embeddings)
    wrapper = Normalised(inner, model.mean, model.std).to(device).eval()
    example = torch.zeros((TRACE_BATCH, *sample_shape), dtype=torch.uint8, device=device)
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")  # tracer warnings about Python values
            frozen = torch.jit.freeze(torch.jit.trace(wrapper, example))
            torch.jit.save(frozen, str(path))
    except Exception as exc:  # tracing raises many types; this is the one place to translate
        raise ModelLoadError(f"cannot trace model {model.name!r} to TorchScript: "
                             f"{root_cause(exc)}") from exc
    finally:
        if isinstance(inner, WithFeatures):
            inner.close()


class TorchScriptBackend:
    """Runs the frozen TorchScript artifact of a LoadedModel (fp32)."""

    name = "torchscript"

    def __init__(self, model: LoadedModel, device: torch.device, max_batch_size: int,
                 sample_shape: tuple[int, int, int], threads: int = 0, *,
                 store: ArtifactStore, embeddings: Optional[str] = None) -> None:
        if embeddings is not None:  # a model without a head to tap fails here, at once
            FeatureTap(model, embeddings).close()
        self.embeddings = embeddings
        self.model = model
        self.device = device
        self.max_batch_size = max_batch_size
        self.sample_shape = sample_shape
        self.threads = threads
        self.store = store
        self.warmup_s = 0.0
        self.export_s = 0.0  # time spent tracing in setup(); 0 when the artifact was reused
        self.last_staging_s = 0.0
        self.artifact: Path | None = None

    def artifact_key(self) -> ArtifactKey:
        c, h, w = self.sample_shape
        # A frozen graph holds device-specific constants: the device type is part of the key.
        recipe = f"{RECIPE}/{self.device.type}"
        if self.embeddings is not None:
            recipe += f"/{FEATURES_RECIPE}"
        return ArtifactKey(
            model=self.model.name, weights_digest=self.model.weights_digest,
            input_policy=f"dynamic-batch:{c}x{h}x{w}", recipe=recipe,
            versions=library_versions({"torch": torch.__version__}),
            backend=self.name, precision="fp32")

    def setup(self) -> None:
        if self.device.type == "cpu":
            torch.set_num_threads(self.threads or usable_cores())
        # Under the model's device, as TorchBackend: its pinned buffers and events too.
        with on_device(self.device):
            self.artifact, self.module = self.store.open(self.artifact_key(), self._trace,
                                                         self._load)
            self.ring = StagingRing(3, self.max_batch_size, self.sample_shape, self.device)
        self.warmup_s = warm_up(self.predict, self.sample_shape, (1, self.max_batch_size))

    def _trace(self, path: Path) -> None:
        started = time.perf_counter()
        trace(self.model, self.sample_shape, self.device, path, self.embeddings)
        self.export_s += time.perf_counter() - started
        log.info("traced %s to TorchScript in %.1f s", self.model.name, self.export_s)

    def _load(self, path: Path) -> Any:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # TorchScript's deprecation notices
            module = torch.jit.load(str(path), map_location=self.device)
            return torch.jit.optimize_for_inference(module)

    @torch.inference_mode()
    def predict(self, samples: Sequence[Pixels]) -> torch.Tensor:
        """uint8 CHW samples -> float logits on the device, one row per sample."""
        return self._outputs(samples)[0]

    @torch.inference_mode()
    def predict_features(self, samples: Sequence[Pixels]
                         ) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits, pooled penultimate features) on the device, one row per sample each."""
        if self.embeddings is None:
            raise RuntimeError("this backend was built without embeddings")
        logits, features = self._outputs(samples)
        return logits, features

    def _outputs(self, samples: Sequence[Pixels]) -> tuple[torch.Tensor, ...]:
        with on_device(self.device):  # predict() may be called from any thread
            return self._run(samples)

    def _run(self, samples: Sequence[Pixels]) -> tuple[torch.Tensor, ...]:
        started = time.perf_counter()
        batch = self.ring.stage(samples)
        self.last_staging_s = time.perf_counter() - started
        result = self.module(batch)
        outputs = tuple(result) if isinstance(result, (tuple, list)) else (result,)
        if len(outputs) != (1 if self.embeddings is None else 2):
            raise ModelLoadError(f"the TorchScript artifact {self.artifact} gives "
                                 f"{len(outputs)} outputs, not what it was built for")
        for output in outputs:
            if output.shape[0] != len(samples):
                raise RuntimeError(f"model returned {output.shape[0]} rows for "
                                   f"{len(samples)} inputs")
        return outputs

    def close(self) -> None:
        self.__dict__.pop("module", None)
        self.__dict__.pop("ring", None)
