"""ONNX Runtime backend: the model exported once to ONNX, normalisation inside the graph.

The exported graph takes the uint8 NCHW batch as it comes from preprocessing
(``pixels``, batch dimension dynamic, C x H x W fixed) and computes
``x.float() * scale + shift`` before the model, so the host only stacks bytes.
Export happens through an `ArtifactStore`: the first start exports and keeps
the file; later starts, in any process, load it (a session takes ~50 ms).

Exporters: ``torch.export``-based (``dynamo=True``, the default since PyTorch
2.9) for ordinary modules; TorchScript models cannot be traced by it, so they
go through the TorchScript-based exporter on a scripted wrapper instead.

int8 is a second artifact built from the stored fp32 one by ONNX Runtime's
static quantization, calibrated on real preprocessed images; its key adds
the calibration set's digest.

An export made for embeddings has a second output, ``features`` (the pooled
penultimate features, from `WithFeatures`), and its own key: the recipe says
which outputs the graph has, so a logits-only artifact is never opened where
features are expected (and the runner checks the graph's outputs as well).

On a GPU the session asks for TensorRT first where it is installed (its
engines kept under the artifact directory, ``tensorrt/``), then CUDA
(pipeline/ort_providers.py), and runs with I/O binding on a CUDA stream of its
own (pipeline/backends/binding.py): predict() answers with tensors on the
device, which the inference loop reduces there, as it does the torch backends'.
On the CPU it answers in NumPy.
"""

from __future__ import annotations

import logging
import time
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from pipeline.backends.artifacts import ArtifactKey, ArtifactStore, library_versions
from pipeline.backends.binding import BoundSession
from pipeline.backends.calibration import CalibrationSet
from pipeline.backends.normalised import Normalised, module_device
from pipeline.cpu_features import needs_reduced_int8_range
from pipeline.errors import ModelLoadError, first_line, root_cause
from pipeline.items import Pixels
from pipeline.models import LoadedModel
from pipeline.models.features import FeatureTap, WithFeatures
from pipeline.ort_providers import CPU_WHEEL, CUDA, GPU_WHEEL, OnGpu
from pipeline.prebuilt import FEATURES_NAME, INPUT_NAME, LOGITS_NAME, OnnxRunner
from pipeline.timing import warm_up

log = logging.getLogger("imgpipe.backends.onnx")

OPSET = 18
RECIPE_VERSION = 1  # bump when the export changes in a way the versions do not capture
OUTPUT_NAME = LOGITS_NAME
FEATURE_OUTPUTS = f"outputs:{LOGITS_NAME}+{FEATURES_NAME}"  # in the key of a features export
QUANT_RECIPE = "int8-qdq-minmax-per-channel/v1"  # bump when quantize_int8 changes
CALIBRATION_BATCH = 8
EXAMPLE_BATCH = 2  # torch.export specialises a dimension whose example size is 0 or 1
TENSORRT_SUBDIR = "tensorrt"  # TensorRT's engines, under the artifact directory
DYNAMO, TORCHSCRIPT = "dynamo", "torchscript"
# The exporters log every graph pass at INFO; imgpipe's own INFO lines should stay readable.
EXPORTER_LOGGERS = ("onnx_ir", "onnxscript", "torch.onnx", "torch.export")


def exporter_for(module: torch.nn.Module) -> str:
    """torch.export cannot trace TorchScript; those take the TorchScript exporter."""
    return TORCHSCRIPT if isinstance(module, torch.jit.ScriptModule) else DYNAMO


def export_onnx(model: LoadedModel, sample_shape: tuple[int, int, int], path: Path,
                embeddings: Optional[str] = None) -> str:
    """Write `model`, wrapped in `Normalised`, to `path` as one ONNX file (weights
    inside, so under 2 GB); with `embeddings` (the setting that asks for them), with
    the `features` output too. Returns the exporter used; ModelLoadError on failure."""
    exporter = exporter_for(model.module)
    if embeddings is not None:
        check_exportable_features(model, embeddings)
    device = module_device(model.module)
    inner = model.module if embeddings is None else WithFeatures(model, embeddings)
    wrapper = Normalised(inner, model.mean, model.std).to(device).eval()
    example = torch.zeros((EXAMPLE_BATCH, *sample_shape), dtype=torch.uint8, device=device)
    names = [OUTPUT_NAME] if embeddings is None else [OUTPUT_NAME, FEATURES_NAME]
    try:
        with warnings.catch_warnings(), _quiet(EXPORTER_LOGGERS), torch.no_grad():
            warnings.simplefilter("ignore")  # deprecation chatter from both exporters
            if exporter == DYNAMO:
                _export_dynamo(wrapper, example, path, names)
            else:
                _export_torchscript(wrapper, example, path)
    except Exception as exc:  # exporters raise many types; this is the one place to translate
        raise ModelLoadError(f"cannot export model {model.name!r} to ONNX with the {exporter} "
                             f"exporter: {root_cause(exc)}") from exc
    finally:
        if isinstance(inner, WithFeatures):
            inner.close()
    return exporter


def check_exportable_features(model: LoadedModel, embeddings: str) -> None:
    """ModelLoadError, naming the model and the setting, when the ONNX export cannot
    carry `model`'s features: a TorchScript model's come from its own embed() method,
    which the TorchScript-based exporter cannot script a wrapper around; or the model
    has no head to take them from."""
    if exporter_for(model.module) == TORCHSCRIPT:
        raise ModelLoadError(f"model {model.name} cannot give embeddings ({embeddings}) "
                             f"from ONNX Runtime: its ONNX export carries no features; use "
                             f"model.backend 'torch' or 'torchscript'")
    FeatureTap(model, embeddings).close()  # the head's check, without keeping the hook


def _export_dynamo(wrapper: torch.nn.Module, example: torch.Tensor, path: Path,
                   output_names: list[str]) -> None:
    batch = torch.export.Dim("batch", min=1)
    program = torch.onnx.export(
        wrapper, (example,), None, dynamo=True, opset_version=OPSET,
        input_names=[INPUT_NAME], output_names=output_names,
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


def int8_recipe() -> str:
    """The int8 recipe on this CPU: part of the artifact's key, so an artifact
    quantized for another CPU's kernels is never loaded here."""
    return QUANT_RECIPE + ("/reduce-range" if needs_reduced_int8_range() else "")


def quantize_int8(fp32: Path, path: Path, samples: Sequence[np.ndarray]) -> None:
    """Static int8 quantization of the fp32 graph at `fp32`, written to `path`.

    QDQ format with per-channel int8 weights and uint8 activations (what ORT's
    CPU kernels run fastest with VNNI), ranges from MinMax over `samples`;
    weights keep to 7 bits where the CPU lacks VNNI. The input normalisation
    (Cast, Mul, Add) stays fp32.
    """
    import onnx
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Batches(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = (np.stack(samples[i:i + CALIBRATION_BATCH])
                            for i in range(0, len(samples), CALIBRATION_BATCH))

        def get_next(self) -> Optional[dict[str, np.ndarray]]:
            batch = next(self.batches, None)
            return None if batch is None else {INPUT_NAME: batch}

    prepared = path.with_name(path.name + ".prepared")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            quant_pre_process(str(fp32), str(prepared), skip_symbolic_shape=True)
            graph = onnx.load(str(prepared)).graph
            head = _normalisation_nodes(graph)
            quantize_static(str(prepared), str(path), Batches(),
                            quant_format=QuantFormat.QDQ, per_channel=True,
                            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                            calibrate_method=CalibrationMethod.MinMax, nodes_to_exclude=head,
                            reduce_range=needs_reduced_int8_range())
    except Exception as exc:  # the quantization tool raises many types
        raise ModelLoadError(f"cannot quantize {fp32.name} to int8: {root_cause(exc)}") from exc
    finally:
        prepared.unlink(missing_ok=True)


def _normalisation_nodes(graph: Any) -> list[str]:
    """The nodes between the uint8 input and the model proper (Cast, Mul, Add)."""
    names, frontier = [], {INPUT_NAME}
    for node in graph.node:
        if node.op_type not in ("Cast", "Mul", "Add") or not frontier & set(node.input):
            continue
        names.append(node.name)
        frontier |= set(node.output)
    return names


def _onnxruntime() -> tuple[Any, dict[str, str]]:
    """The onnxruntime module and the versions of every library the artifact depends on."""
    try:
        import onnx
        import onnxruntime
        import onnxscript
    except ImportError as exc:
        raise ModelLoadError(f"the onnxruntime backend needs ONNX Runtime, onnx and onnxscript "
                             f"(pip install '{CPU_WHEEL}' onnx onnxscript; '{GPU_WHEEL}' "
                             f"instead of the first on an NVIDIA GPU host)") from exc
    versions = {"torch": torch.__version__, "onnx": onnx.__version__,
                "onnxscript": onnxscript.__version__, "onnxruntime": onnxruntime.__version__}
    return onnxruntime, versions


class OnnxBackend:
    """Runs a LoadedModel with ONNX Runtime. Export and session creation happen in setup().

    precision "int8" quantizes the fp32 export statically (QDQ, per-channel
    int8 weights, uint8 activations whose ranges come from `calibration`);
    the input normalisation stays fp32, since quantizing it costs the most accuracy.
    """

    name = "onnxruntime"

    def __init__(self, model: LoadedModel, device: torch.device, max_batch_size: int,
                 sample_shape: tuple[int, int, int], threads: int = 0, *,
                 store: ArtifactStore, precision: str = "fp32",
                 calibration: Optional[CalibrationSet] = None,
                 embeddings: Optional[str] = None) -> None:
        if precision not in ("fp32", "int8"):
            raise ModelLoadError(f"onnxruntime runs fp32 or int8, not {precision!r}")
        if precision == "int8" and calibration is None:
            raise ModelLoadError("onnxruntime:int8 needs calibration images: set "
                                 "model.calibration_images or run imgpipe optimize")
        self.model = model
        self.device = device
        self.max_batch_size = max_batch_size
        self.sample_shape = sample_shape
        self.threads = threads
        self.store = store
        self.precision = precision
        self.calibration = calibration
        self.exporter = exporter_for(model.module)
        if embeddings is not None:  # here, not in setup(): a model that cannot fails at once
            check_exportable_features(model, embeddings)
        self.embeddings = embeddings
        self.warmup_s = 0.0
        self.export_s = 0.0  # time spent exporting in setup(); 0 when the artifact was reused
        self.artifact: Path | None = None
        self.providers: list[str] = []
        self.stream: Optional[torch.cuda.Stream] = None  # the session's, on a GPU
        self.bound: Optional[BoundSession] = None  # I/O binding, where the GPU runs it

    def artifact_key(self, precision: Optional[str] = None) -> ArtifactKey:
        _, versions = _onnxruntime()
        c, h, w = self.sample_shape
        precision = precision or self.precision
        recipe = f"uint8-nchw-normalised/opset{OPSET}/{self.exporter}/v{RECIPE_VERSION}"
        if self.embeddings is not None:  # a graph with another output: another artifact
            recipe += f"/{FEATURE_OUTPUTS}"
        if precision == "int8":
            assert self.calibration is not None
            recipe += f"/{int8_recipe()}/calibration:{self.calibration.digest()}"
        return ArtifactKey(
            model=self.model.name, weights_digest=self.model.weights_digest,
            input_policy=f"dynamic-batch:{c}x{h}x{w}", recipe=recipe,
            versions=library_versions(versions), backend=self.name, precision=precision)

    def setup(self) -> None:
        """Export (or reuse) the artifact, open a session, warm up with 1 and max."""
        if self.precision == "int8" and self.device.type != "cpu":
            raise ModelLoadError("onnxruntime:int8 runs on the CPU only")
        build = self._quantize if self.precision == "int8" else self._export
        self.artifact, self.runner = self.store.open(self.artifact_key(), build, self._runner)
        self.providers = self.runner.providers
        self.bound = self._bound() if self.device.type == "cuda" else None
        self.warmup_s = warm_up(self.predict, self.sample_shape, (1, self.max_batch_size))
        if self.bound is not None:
            torch.cuda.synchronize(self.device)

    def _bound(self) -> Optional[BoundSession]:
        """I/O binding on the GPU, where the session's GPU providers run on its stream;
        None (outputs in NumPy, on the host) where they do not."""
        if CUDA not in self.providers:
            log.warning("onnxruntime cannot use %s here (providers %s): running on the CPU",
                        self.device, ", ".join(self.providers))
            return None
        if not self.runner.runs_on_stream():
            log.warning("onnxruntime did not take the CUDA stream it was given (providers "
                        "%s): its outputs come back to the host", ", ".join(self.providers))
            return None
        return BoundSession(self.runner.session, self.device, self.max_batch_size,
                            self.sample_shape, self.stream)

    @property
    def last_staging_s(self) -> float:
        if self.bound is not None:
            return self.bound.last_staging_s
        return self.runner.last_staging_s if hasattr(self, "runner") else 0.0

    def _export(self, path: Path) -> None:
        started = time.perf_counter()
        export_onnx(self.model, self.sample_shape, path, self.embeddings)
        self.export_s += time.perf_counter() - started
        log.info("exported %s to ONNX in %.1f s", self.model.name, self.export_s)

    def _quantize(self, path: Path) -> None:
        """The int8 graph, from the (stored) fp32 export and the calibration images."""
        assert self.calibration is not None
        fp32 = self.store.get_or_build(self.artifact_key("fp32"), self._export)
        started = time.perf_counter()
        samples = self.calibration.samples()
        quantize_int8(fp32, path, samples)
        self.export_s += time.perf_counter() - started
        log.info("quantized %s to int8 on %d calibration images in %.1f s",
                 self.model.name, len(samples), time.perf_counter() - started)

    def _runner(self, path: Path) -> OnnxRunner:
        _onnxruntime()  # a clear error when it is not installed
        runner = OnnxRunner(path, self.max_batch_size, self.sample_shape, self.threads,
                            self._on_gpu(path), features=self.embeddings is not None)
        runner.open()
        return runner

    def _on_gpu(self, artifact: Path) -> Optional[OnGpu]:
        """On a GPU: the device, a stream of the session's own (for I/O binding) and
        TensorRT's engine cache, one directory per artifact."""
        if self.device.type != "cuda":
            return None
        index = self.device.index or 0
        self.stream = torch.cuda.Stream(torch.device("cuda", index))
        engines = self.store.directory / TENSORRT_SUBDIR / artifact.stem
        engines.mkdir(parents=True, exist_ok=True)
        return OnGpu(index, self.stream.cuda_stream, engines)

    def predict(self, samples: Sequence[Pixels]) -> torch.Tensor | np.ndarray:
        """uint8 CHW samples -> float logits, one row per sample: a tensor on the GPU
        where the session is bound there, else NumPy on the host."""
        with self._out_of_memory():
            if self.bound is not None:
                return self.bound.run(samples, [OUTPUT_NAME])[0]
            return self.runner.run(samples)

    def predict_features(self, samples: Sequence[Pixels]
                         ) -> tuple[torch.Tensor, torch.Tensor] | tuple[np.ndarray, np.ndarray]:
        """(logits, pooled features), one row per sample each, where predict() puts them."""
        with self._out_of_memory():
            if self.bound is None:
                return self.runner.run_features(samples)
            if not self.runner.features:
                raise RuntimeError("this backend was built without embeddings")
            logits, features = self.bound.run(samples, [OUTPUT_NAME, FEATURES_NAME])
            return logits, features

    @contextmanager
    def _out_of_memory(self) -> Iterator[None]:
        try:
            yield
        except Exception as exc:
            if self.device.type == "cuda" and "out of memory" in str(exc).lower():
                # The inference loop halves a batch on this error type.
                raise torch.cuda.OutOfMemoryError(first_line(exc)) from exc
            raise

    def close(self) -> None:
        self.bound = self.stream = None
        runner = self.__dict__.pop("runner", None)
        if runner is not None:
            runner.close()
