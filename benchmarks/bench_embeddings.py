"""Embeddings from each inference variant against eager fp32, on real photographs.

Each variant's backend, built for embeddings as `score --output embedding`
builds it, gives the pooled penultimate features of every photograph under
`--images` (default ../shared/data/imagenet-val-100, preprocessed as in
production); the table is each variant's cosine similarity to eager fp32's
features (mean and minimum over the photographs) and its verdict under the
accuracy guard (pipeline/feature_guard.py: both at least 0.99). int8
calibrates on `samples/` (6 other photographs), so it is judged on every
photograph here. Prints a Markdown table.

    .venv/bin/python -m benchmarks.bench_embeddings [--variants torch:bf16 onnxruntime ...]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Optional

import torch

from benchmarks import datasets
from pipeline.backends import TorchBackend, Variant, create_inference_backend
from pipeline.backends.calibration import CalibrationSet, first_files, preprocessed
from pipeline.config import load_settings
from pipeline.feature_guard import feature_agreement, features_of, refusal
from pipeline.models import load_model

SETTING = "benchmarks/bench_embeddings"
SAMPLES = Path(__file__).resolve().parents[1] / "samples"
VARIANTS = ("torch:bf16", "torchscript", "torch-compile", "onnxruntime", "onnxruntime:int8")
BATCH = 16


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--images", type=Path, default=datasets.SHARED_PHOTOS)
    parser.add_argument("--model", default="efficientnet_lite0")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS))
    args = parser.parse_args(argv)
    model = load_model(args.model)
    pre = load_settings(overrides={"model.name": args.model}).preprocess
    spec, limits = pre.spec(), pre.limits()
    photos = list(preprocessed(first_files(args.images, 10_000), spec, limits).values())
    cpu = torch.device("cpu")
    reference = TorchBackend(model, cpu, BATCH, spec.output_shape, embeddings=SETTING)
    reference.setup()
    expected = features_of(reference, photos)
    reference.close()
    calibration = CalibrationSet.from_directory(SAMPLES, spec, limits)
    print(f"{args.model}, {len(photos)} photographs of {args.images}, features "
          f"{expected.shape[1]}-d, against eager fp32 (torch)\n")
    print("| variant | cosine mean | cosine minimum | verdict | setup s |")
    print("|---|---:|---:|---|---:|")
    with tempfile.TemporaryDirectory() as artifacts:
        for name in args.variants:
            started = time.perf_counter()
            backend = create_inference_backend(
                Variant.parse(name), model, cpu, BATCH, spec.output_shape, 0,
                Path(artifacts), calibration, embeddings=SETTING)
            backend.setup()
            setup_s = time.perf_counter() - started
            agreement = feature_agreement(expected, features_of(backend, photos))
            backend.close()
            why = refusal(agreement)
            print(f"| {name} | {agreement.mean_cosine:.6f} | {agreement.min_cosine:.6f} | "
                  f"{'accepted' if why is None else 'refused'} | {setup_s:.1f} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
