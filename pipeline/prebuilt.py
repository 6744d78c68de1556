"""Models that start without PyTorch: a checked ONNX export, recalled by the model's files.

On the CPU, `model.backend = "auto"` runs ONNX Runtime fp32 (the same top-1 as
eager PyTorch, probabilities within about 1e-6). The first start exports the
model, checks the export against eager PyTorch on real photographs, and
records here what later starts need to run it: the model's name, labels and
weights digest, the artifact's path and size, and the check's numbers, under
the same key as the model's cache scope (`scopes.identity`, which changes
with any of the model's files). A later start that finds the record opens
the artifact with ONNX Runtime alone: no torch import, no model build, no
eager warm-up. When `imgpipe optimize` chooses an ONNX Runtime variant, it is
recorded the same way, beside the default's. Nothing here imports torch.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from math import floor
from pathlib import Path
from typing import Any, Optional

import numpy as np

from pipeline.cache import scopes
from pipeline.config import Settings
from pipeline.cores import usable_cores
from pipeline.errors import ModelLoadError, first_line
from pipeline.items import Pixels, on_host
from pipeline.ort_providers import (
    OnGpu,
    asks_for_tensorrt,
    providers_for,
    runs_on_stream,
    without_tensorrt,
)
from pipeline.profiles import chosen
from pipeline.timing import warm_up

log = logging.getLogger("imgpipe.prebuilt")
RECORDS_SUBDIR = "checked"
INPUT_NAME = "pixels"
LOGITS_NAME = "logits"
# The second output of an export made for embeddings: the pooled penultimate
# features, the input of the final linear layer (pipeline/models/features.py).
FEATURES_NAME = "features"


@dataclass(frozen=True)
class ModelCard:
    """What records need of a model, without the model itself."""

    name: str
    labels: list[str]
    weights_digest: str


@dataclass(frozen=True)
class Checked:
    """An ONNX export that scored like eager PyTorch, and how closely; or, with
    `chosen_by_optimize`, the variant `imgpipe optimize` accepted (its profile)."""

    card: ModelCard
    artifact: str
    size_bytes: int
    images: int  # photographs it was checked on
    max_score_drift: float  # largest probability difference from eager fp32
    variant: str = "onnxruntime"  # "onnxruntime:int8" for a quantized export
    chosen_by_optimize: bool = False
    # An export with the features output, and its features' cosine similarity to
    # eager fp32's on the same photographs (pipeline/feature_guard.py). Records
    # written before exports had features load with the defaults: logits only.
    features: bool = False
    feature_cosine_mean: Optional[float] = None
    feature_cosine_min: Optional[float] = None

    def note(self) -> str:
        if self.chosen_by_optimize:
            return "chosen by imgpipe optimize"
        # Rounded down: a minimum of 0.99996 is "at least 0.9999", never "1.0000".
        features = (f", features' cosine at least {floor(self.feature_cosine_min * 1e4) / 1e4}"
                    if self.features and self.feature_cosine_min is not None else "")
        return (f"checked against eager PyTorch on {self.images} photographs: same top-1, "
                f"probabilities within {self.max_score_drift:.1g}{features}")


def key_for(settings: Settings, *, optimized: bool = False, features: bool = False) -> str:
    """The record's key: the model's files (as for its cache scope) and input shape;
    `optimized` for the export of the variant that `imgpipe optimize` chose;
    `features` for the export with the features output (a record of its own, so a
    logits-only export is never taken for one that gives embeddings)."""
    channels, height, width = settings.preprocess.spec().output_shape
    key = f"{scopes.identity(settings.model)}-{channels}x{height}x{width}"
    key = f"{key}-optimized" if optimized else key
    return f"{key}-features" if features else key


def records_directory(artifacts_dir: Path) -> Path:
    return artifacts_dir / RECORDS_SUBDIR


def remember(artifacts_dir: Path, key: str, checked: Checked) -> None:
    scopes.remember(records_directory(artifacts_dir), key, checked)


@dataclass(frozen=True)
class Refused:
    """Why the export is not used: it failed to build, or its check."""

    refused: str


def refuse(artifacts_dir: Path, key: str, why: str) -> None:
    scopes.remember(records_directory(artifacts_dir), key, Refused(why))


def recall(artifacts_dir: Path, key: str) -> Checked | Refused | None:
    """What was recorded under `key`: a check whose artifact is still there, whole,
    or a refusal; None when nothing (valid) was."""
    try:
        fields = json.loads((records_directory(artifacts_dir) / f"{key}.json").read_text())
        if "refused" in fields:
            return Refused(str(fields["refused"]))
        checked = Checked(**{**fields, "card": ModelCard(**fields["card"])})
        if os.stat(checked.artifact).st_size != checked.size_bytes:
            return None
    except (OSError, ValueError, TypeError, KeyError):
        return None
    return checked


def recall_choice(settings: Settings) -> Optional[Checked]:
    """optimize's recorded ONNX Runtime export, while its profile still names it."""
    choice = recall(settings.model.artifacts_directory(), key_for(settings, optimized=True))
    if not isinstance(choice, Checked):
        return None
    profile = chosen(settings.cache.directory(), choice.card)
    return choice if profile is not None and str(profile.variant) == choice.variant else None


def forget(artifacts_dir: Path, key: str) -> None:
    (records_directory(artifacts_dir) / f"{key}.json").unlink(missing_ok=True)


class OnnxRunner:
    """An ONNX graph from uint8 NCHW `pixels` to `logits`, run by ONNX Runtime; with
    `features`, a graph that gives `features` too (open() refuses one that does not)."""

    def __init__(self, path: Path, max_batch_size: int, sample_shape: tuple[int, int, int],
                 threads: int = 0, gpu: Optional[OnGpu] = None,
                 features: bool = False) -> None:
        self.path = path
        self.features = features
        self.max_batch_size = max_batch_size
        self.sample_shape = sample_shape
        self.threads = threads
        self.gpu = gpu  # None: the CPU provider alone
        self.last_staging_s = 0.0  # the last batch's np.stack into the input buffer

    def open(self) -> None:
        import onnxruntime as ort

        providers = providers_for(ort.get_available_providers(), self.gpu, INPUT_NAME,
                                  self.max_batch_size, self.sample_shape)
        try:
            self.session = self._session(ort, providers)
        except Exception as exc:  # onnxruntime's errors share no useful base class
            if not asks_for_tensorrt(providers):
                raise
            log.warning("TensorRT cannot run %s here (%s): the CUDA provider runs it",
                        self.path.name, first_line(exc))
            self.session = self._session(ort, without_tensorrt(providers))
        self.providers = list(self.session.get_providers())
        self.input_name = self.session.get_inputs()[0].name
        names = [output.name for output in self.session.get_outputs()]
        if self.features and FEATURES_NAME not in names:
            raise ValueError(f"{self.path.name} gives no {FEATURES_NAME!r} output (it gives "
                             f"{', '.join(names)}): a logits-only export")
        self.output_name = names[0]
        self.buffer = np.empty((self.max_batch_size, *self.sample_shape), dtype=np.uint8)

    def _session(self, ort: Any, providers: list[Any]) -> Any:
        options = ort.SessionOptions()
        options.intra_op_num_threads = self.threads or usable_cores()
        options.inter_op_num_threads = 1
        # Idle threads sleep rather than spin on cores the preprocessing
        # workers need (as OMP_WAIT_POLICY=PASSIVE does for torch).
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # A provider that fails to start is an error here, not a silent retry on
        # ONNX Runtime's defaults, which would drop the stream the GPU providers share.
        return ort.InferenceSession(str(self.path), sess_options=options, providers=providers,
                                    enable_fallback=0)

    def runs_on_stream(self) -> bool:
        """Whether the session's GPU providers run on the stream in `gpu`."""
        if self.gpu is None or not self.gpu.stream:
            return False
        return runs_on_stream(self.providers, self.session.get_provider_options(),
                              self.gpu.stream)

    def run(self, samples: Sequence[Pixels]) -> np.ndarray:
        """uint8 CHW samples -> float logits, one row per sample."""
        (logits,) = self._run(samples, [self.output_name])
        return logits

    def run_features(self, samples: Sequence[Pixels]) -> tuple[np.ndarray, np.ndarray]:
        """uint8 CHW samples -> (logits, pooled features), one row per sample each."""
        if not self.features:
            raise RuntimeError(f"{self.path.name} was opened for logits only")
        logits, features = self._run(samples, [self.output_name, FEATURES_NAME])
        return logits, features

    def _run(self, samples: Sequence[Pixels], names: list[str]) -> list[np.ndarray]:
        if not samples or len(samples) > self.max_batch_size:
            raise ValueError(f"batch of {len(samples)} does not fit max_batch_size "
                             f"{self.max_batch_size}")
        started = time.perf_counter()
        batch = self.buffer[: len(samples)]
        # A tensor on a GPU (DALI's hand-off) is copied to the host first.
        np.stack([on_host(sample) for sample in samples], out=batch)
        self.last_staging_s = time.perf_counter() - started
        outputs = self.session.run(names, {self.input_name: batch})
        for output in outputs:
            if output.shape[0] != len(samples):
                raise RuntimeError(f"model returned {output.shape[0]} rows for "
                                   f"{len(samples)} inputs")
        return [np.asarray(output) for output in outputs]

    def close(self) -> None:
        self.__dict__.pop("session", None)
        self.__dict__.pop("buffer", None)


class PrebuiltBackend:
    """A checked ONNX export run on the CPU without torch: an InferenceBackend."""

    name = "onnxruntime"

    def __init__(self, checked: Checked, max_batch_size: int,
                 sample_shape: tuple[int, int, int], threads: int = 0) -> None:
        self.model = checked.card
        self.checked = checked
        self.max_batch_size = max_batch_size
        self.runner = OnnxRunner(Path(checked.artifact), max_batch_size, sample_shape, threads,
                                 features=checked.features)
        self.warmup_s = 0.0

    @property
    def last_staging_s(self) -> float:
        return self.runner.last_staging_s

    def setup(self) -> None:
        try:
            self.runner.open()
        except Exception as exc:  # onnxruntime's errors share no useful base class
            raise ModelLoadError(f"cannot load {self.checked.artifact}: {first_line(exc)}"
                                 ) from exc
        # One small batch: ONNX Runtime on the CPU has nothing to compile or tune,
        # and a full one would only delay the first record.
        self.warmup_s = warm_up(self.predict, self.runner.sample_shape, (1,))

    def predict(self, samples: Sequence[Pixels]) -> np.ndarray:
        return self.runner.run(samples)

    def predict_features(self, samples: Sequence[Pixels]
                         ) -> tuple[np.ndarray, np.ndarray]:
        return self.runner.run_features(samples)

    def close(self) -> None:
        self.runner.close()

