"""ONNX Runtime backend: the model exported once to ONNX, normalisation inside the graph.

The exported graph takes the uint8 NCHW batch as it comes from preprocessing
(``pixels``, batch dimension dynamic, C x H x W fixed) and computes
``x.float() * scale + shift`` before the model, so the host only stacks bytes.
Export happens through an `ArtifactStore`: the first start exports and keeps
the file; later starts, in any process, load it (a session takes ~50 ms).

Exporters: ``torch.export``-based (``dynamo=True``, the default since PyTorch
2.9) for ordinary modules; TorchScript models cannot be traced by it, so they
go through the TorchScript-based exporter on a scripted wrapper instead.
"""

from __future__ import annotations

import logging
import os
import re
import time
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.backends.artifacts import ArtifactKey, ArtifactStore, library_versions
from pipeline.errors import ModelLoadError
from pipeline.models import LoadedModel

log = logging.getLogger("imgpipe.backends.onnx")

OPSET = 18
RECIPE_VERSION = 1  # bump when the export changes in a way the versions do not capture
INPUT_NAME = "pixels"
OUTPUT_NAME = "logits"
EXAMPLE_BATCH = 2  # torch.export specialises a dimension whose example size is 0 or 1
DYNAMO, TORCHSCRIPT = "dynamo", "torchscript"
ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;]*m")
# The exporters log every graph pass at INFO; imgpipe's own INFO lines should stay readable.
EXPORTER_LOGGERS = ("onnx_ir", "onnxscript", "torch.onnx", "torch.export")


class Normalised(torch.nn.Module):
    """uint8 NCHW in, logits out: ``model(x.float() * scale + shift)``."""

    def __init__(self, module: torch.nn.Module, mean: Sequence[float],
                 std: Sequence[float]) -> None:
        super().__init__()
        self.module = module
        scale = 1.0 / torch.tensor(std, dtype=torch.float32)
        # Frozen parameters rather than buffers: typed attributes that both exporters
        # (and TorchScript, which cannot read postponed annotations) accept.
        self.scale = torch.nn.Parameter(scale.reshape(1, 3, 1, 1), requires_grad=False)
        self.shift = torch.nn.Parameter((-torch.tensor(mean) * scale).reshape(1, 3, 1, 1),
                                        requires_grad=False)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.module(pixels.float() * self.scale + self.shift)


def exporter_for(module: torch.nn.Module) -> str:
    """torch.export cannot trace TorchScript; those take the TorchScript exporter."""
    return TORCHSCRIPT if isinstance(module, torch.jit.ScriptModule) else DYNAMO


def export_onnx(model: LoadedModel, sample_shape: tuple[int, int, int], path: Path) -> str:
    """Write `model`, wrapped in `Normalised`, to `path` as one ONNX file (weights
    inside, so under 2 GB). Returns the exporter used; ModelLoadError on failure."""
    exporter = exporter_for(model.module)
    parameter = next(model.module.parameters(), None)
    device = parameter.device if parameter is not None else torch.device("cpu")
    wrapper = Normalised(model.module, model.mean, model.std).to(device).eval()
    example = torch.zeros((EXAMPLE_BATCH, *sample_shape), dtype=torch.uint8, device=device)
    try:
        with warnings.catch_warnings(), _quiet(EXPORTER_LOGGERS), torch.no_grad():
            warnings.simplefilter("ignore")  # deprecation chatter from both exporters
            if exporter == DYNAMO:
                _export_dynamo(wrapper, example, path)
            else:
                _export_torchscript(wrapper, example, path)
    except Exception as exc:  # exporters raise many types; this is the one place to translate
        raise ModelLoadError(f"cannot export model {model.name!r} to ONNX with the {exporter} "
                             f"exporter: {root_cause(exc)}") from exc
    return exporter


def _export_dynamo(wrapper: torch.nn.Module, example: torch.Tensor, path: Path) -> None:
    batch = torch.export.Dim("batch", min=1)
    program = torch.onnx.export(
        wrapper, (example,), None, dynamo=True, opset_version=OPSET,
        input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
        dynamic_shapes={"pixels": {0: batch}}, external_data=False, verbose=False)
    if program is None:
        raise RuntimeError("torch.onnx.export returned no program")
    program.save(str(path), external_data=False)


def _export_torchscript(wrapper: torch.nn.Module, example: torch.Tensor, path: Path) -> None:
    torch.onnx.export(
        torch.jit.script(wrapper), (example,), str(path), dynamo=False, opset_version=OPSET,
        input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
        dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}})


@contextmanager
def _quiet(names: Sequence[str]) -> Iterator[None]:
    """Raise these loggers to WARNING for the duration, then restore their levels."""
    loggers = [logging.getLogger(name) for name in names]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(max(logger.getEffectiveLevel(), logging.WARNING))
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


def root_cause(exc: BaseException) -> str:
    """The innermost cause's type and first line: torch.onnx wraps the real reason
    (e.g. a data-dependent branch) in a generic "Failed to export" error."""
    while exc.__cause__ is not None:
        exc = exc.__cause__
    return f"{type(exc).__name__}: {first_line(exc)}"


def first_line(exc: BaseException) -> str:
    """An exception's first non-blank line, without colour codes, for one-line reasons."""
    text = ANSI_ESCAPE.sub("", str(exc)).strip()
    line = text.splitlines()[0] if text else type(exc).__name__
    return line[:300]


def _onnxruntime() -> tuple[Any, dict[str, str]]:
    """The onnxruntime module and the versions of every library the artifact depends on."""
    try:
        import onnx
        import onnxruntime
        import onnxscript
    except ImportError as exc:
        raise ModelLoadError("the onnxruntime backend needs the packages onnxruntime, onnx "
                             "and onnxscript (pip install onnxruntime onnx onnxscript)") from exc
    versions = {"torch": torch.__version__, "onnx": onnx.__version__,
                "onnxscript": onnxscript.__version__, "onnxruntime": onnxruntime.__version__}
    return onnxruntime, versions


class OnnxBackend:
    """Runs a LoadedModel with ONNX Runtime. Export and session creation happen in setup()."""

    name = "onnxruntime"

    def __init__(self, model: LoadedModel, device: torch.device, max_batch_size: int,
                 sample_shape: tuple[int, int, int], threads: int = 0, *,
                 store: ArtifactStore) -> None:
        self.model = model
        self.device = device
        self.max_batch_size = max_batch_size
        self.sample_shape = sample_shape
        self.threads = threads
        self.store = store
        self.exporter = exporter_for(model.module)
        self.warmup_s = 0.0
        self.export_s = 0.0  # time spent exporting in setup(); 0 when the artifact was reused
        self.last_staging_s = 0.0  # the last batch's np.stack into the input buffer
        self.artifact: Path | None = None
        self.providers: list[str] = []

    def artifact_key(self) -> ArtifactKey:
        _, versions = _onnxruntime()
        c, h, w = self.sample_shape
        return ArtifactKey(
            model=self.model.name, weights_digest=self.model.weights_digest,
            input_policy=f"dynamic-batch:{c}x{h}x{w}",
            recipe=f"uint8-nchw-normalised/opset{OPSET}/{self.exporter}/v{RECIPE_VERSION}",
            versions=library_versions(versions),
            backend=self.name, precision="fp32")

    def setup(self) -> None:
        """Export (or reuse) the artifact, open a session, warm up with 1 and max."""
        ort, _ = _onnxruntime()
        self.session = self._open(ort)
        self.providers = list(self.session.get_providers())
        if self.device.type == "cuda" and "CUDAExecutionProvider" not in self.providers:
            log.warning("onnxruntime cannot use %s here (providers %s): running on the CPU",
                        self.device, ", ".join(self.providers))
        self.input_name = self.session.get_inputs()[0].name
        self.output_name = self.session.get_outputs()[0].name
        self.buffer = np.empty((self.max_batch_size, *self.sample_shape), dtype=np.uint8)
        started = time.perf_counter()
        blank = np.zeros(self.sample_shape, dtype=np.uint8)
        for size in (1, self.max_batch_size):
            self.predict([blank] * size)
        self.warmup_s = time.perf_counter() - started

    def _open(self, ort: Any) -> Any:
        """A session over the artifact; a stored artifact that will not load is rebuilt once."""
        key = self.artifact_key()
        built_before = self.store.built
        path = self._artifact(key)
        try:
            return self._session(ort, path)
        except Exception as exc:  # onnxruntime's pybind errors share no useful base class
            if self.store.built > built_before:
                raise ModelLoadError(f"onnxruntime cannot load the exported {self.model.name!r} "
                                     f"({path.name}): {first_line(exc)}") from exc
            log.warning("stored artifact %s does not load (%s): rebuilding it",
                        path.name, first_line(exc))
            self.store.discard(key)
        path = self._artifact(key)
        try:
            return self._session(ort, path)
        except Exception as exc:
            raise ModelLoadError(f"onnxruntime cannot load the exported {self.model.name!r} "
                                 f"({path.name}): {first_line(exc)}") from exc

    def _artifact(self, key: ArtifactKey) -> Path:
        try:
            self.artifact = self.store.get_or_build(key, self._export)
        except OSError as exc:
            raise ModelLoadError(f"cannot write the model artifact store {self.store.directory}: "
                                 f"{exc.strerror or exc}") from exc
        return self.artifact

    def _export(self, path: Path) -> None:
        started = time.perf_counter()
        export_onnx(self.model, self.sample_shape, path)
        self.export_s += time.perf_counter() - started
        log.info("exported %s to ONNX in %.1f s", self.model.name, self.export_s)

    def _session(self, ort: Any, path: Path) -> Any:
        options = ort.SessionOptions()
        options.intra_op_num_threads = self.threads or os.cpu_count() or 1
        options.inter_op_num_threads = 1
        # Idle threads sleep rather than spin on cores the preprocessing
        # workers need (as OMP_WAIT_POLICY=PASSIVE does for torch).
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        return ort.InferenceSession(str(path), sess_options=options,
                                    providers=self._providers(ort))

    def _providers(self, ort: Any) -> list[Any]:
        providers: list[Any] = ["CPUExecutionProvider"]
        if self.device.type == "cuda" and "CUDAExecutionProvider" in ort.get_available_providers():
            providers.insert(0, ("CUDAExecutionProvider", {"device_id": self.device.index or 0}))
        return providers

    def predict(self, samples: Sequence[np.ndarray]) -> torch.Tensor:
        """uint8 CHW samples -> float logits on the CPU, one row per sample."""
        if not samples or len(samples) > self.max_batch_size:
            raise ValueError(f"batch of {len(samples)} does not fit max_batch_size "
                             f"{self.max_batch_size}")
        started = time.perf_counter()
        batch = self.buffer[: len(samples)]
        np.stack(samples, out=batch)
        self.last_staging_s = time.perf_counter() - started
        try:
            (logits,) = self.session.run([self.output_name], {self.input_name: batch})
        except Exception as exc:
            if self.device.type == "cuda" and "out of memory" in str(exc).lower():
                # The inference worker halves a batch on this error type.
                raise torch.cuda.OutOfMemoryError(first_line(exc)) from exc
            raise
        if logits.shape[0] != len(samples):
            raise RuntimeError(f"model returned {logits.shape[0]} rows for {len(samples)} inputs")
        return torch.from_numpy(logits)

    def close(self) -> None:
        self.__dict__.pop("session", None)
        self.__dict__.pop("buffer", None)
