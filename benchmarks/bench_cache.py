"""The cache, side by side in one run: cold vs warm tensor cache vs warm result
cache on the mixed-size directory, plus Redis-tier hit throughput on loopback.

    .venv/bin/python -m benchmarks.bench_cache [--images N] [--model NAME] [--quick]
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

import numpy as np

from benchmarks import datasets, harness
from benchmarks.services import redis_server

# The command's own thread policy; nothing imported above loads torch.
os.environ.update(harness.IMGPIPE_ENV)


def score_once(directory: Path, model: str, cache_dir: Path, results: bool) -> float:
    """images/s of one Engine.run over `directory` with the cache on (setup excluded)."""
    cache = {"cache.enabled": True, "cache.dir": str(cache_dir), "cache.results": results}
    return harness.engine_run(model, directory, cache)[0]


def redis_hits_per_s(entries: int) -> dict[str, float]:
    """GET throughput of the Redis tier on loopback, raw and decoded into tensors."""
    from pipeline.cache.codec import encode_tensor
    from pipeline.cache.redis_tier import RedisTier
    from pipeline.cache.tiered import TieredCache
    from pipeline.spec import PreprocessSpec

    spec = PreprocessSpec().digest()
    blob = encode_tensor(np.random.default_rng(0).integers(0, 255, (3, 224, 224), np.uint8), spec)
    with tempfile.TemporaryDirectory() as folder, redis_server(Path(folder)) as url:
        tier = RedisTier(url, "bench", 3600, 1 << 20)
        tier.setup()
        keys = [f"bench:t:{index}" for index in range(entries)]
        for key in keys:
            tier.set(key, blob)
        started = time.perf_counter()
        for key in keys:
            tier.get(key)
        raw = entries / (time.perf_counter() - started)
        cache = TieredCache([tier])
        started = time.perf_counter()
        for key in keys:
            cache.get_tensor(key, spec)
        decoded = entries / (time.perf_counter() - started)
        cache.close()
    return {"redis_get_per_s": raw, "redis_tensor_hits_per_s": decoded,
            "entry_bytes": len(blob)}


def main(argv: Optional[list[str]] = None) -> int:
    parser = harness.parser(__doc__, "100 images, 200 Redis entries")
    parser.add_argument("--images", type=int, default=datasets.FULL_SIZE)
    parser.add_argument("--model", default="mobilenet_v3_small")
    parser.add_argument("--redis-entries", type=int, default=2000)
    args = parser.parse_args(argv)
    if args.quick:
        args.images, args.redis_entries = 100, 200
    started = time.perf_counter()
    directory = datasets.first_images(args.images)
    n = harness.run_header(directory, args)
    with tempfile.TemporaryDirectory() as cache_dir:
        for key, results in (("cold", True), ("warm_tensor", False), ("warm_result", True)):
            n[key] = score_once(directory, args.model, Path(cache_dir), results)
    n["model_only"] = harness.model_only_rate(args.model, seconds=5.0)
    n.update(redis_hits_per_s(args.redis_entries))
    return harness.finish("cache", args, n, started, table, "cache")


def table(n: dict[str, Any]) -> str:
    return "\n".join([
        f"{harness.measured_on(n)} {n['dataset']['files']} mixed-size JPEGs, model "
        f"`{n['options']['model']}`, Engine.run (setup excluded), one run each, in this order.",
        "",
        "| run | images/s | vs cold | target |",
        "|---|---:|---:|---|",
        f"| cold (empty cache) | {n['cold']:.1f} | 1.0x | |",
        f"| warm tensor cache (results off) | {n['warm_tensor']:.1f} | "
        f"{n['warm_tensor'] / n['cold']:.1f}x | >= 3x |",
        f"| warm result cache | {n['warm_result']:.1f} | "
        f"{n['warm_result'] / n['cold']:.1f}x | >= 20x |",
        f"| (model alone on pre-made batches of 32) | {n['model_only']:.1f} | "
        f"{n['model_only'] / n['cold']:.1f}x | ceiling of a tensor-cache run |",
        "",
        f"Redis tier on loopback, {n['entry_bytes']:,}-byte tensor entries: "
        f"{n['redis_get_per_s']:.0f} GET/s raw, {n['redis_tensor_hits_per_s']:.0f} "
        "decoded tensor hits/s (one client thread).",
    ])


if __name__ == "__main__":
    sys.exit(main())
