"""The cache, side by side in one run: cold vs warm tensor cache vs warm result
cache on the mixed-size directory, plus Redis-tier hit throughput on loopback.

    .venv/bin/python benchmarks/bench_cache.py [--images N] [--model NAME]

Writes the table into benchmarks/README.md between the cache markers and the
raw numbers to benchmarks/results/.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

# What the imgpipe command sets for itself before torch loads (workers/cli.py).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402

from benchmarks.bench_score import (  # noqa: E402
    machine,
    measure_imgpipe,
    measure_model_only,
    warm_page_cache,
)
from benchmarks.datasets import ensure_dataset, ensure_subset  # noqa: E402

README = REPO / "benchmarks" / "README.md"
RESULTS = REPO / "benchmarks" / "results"
BEGIN, END = "<!-- cache:begin -->", "<!-- cache:end -->"


def score_once(directory: Path, model: str, cache_dir: Path, results: bool) -> float:
    """images/s of one Engine.run over `directory` with the cache on (setup excluded)."""
    cache = {"cache.enabled": True, "cache.dir": str(cache_dir), "cache.results": results}
    return measure_imgpipe(model, directory, cache)[0]


def redis_hits_per_s(entries: int) -> dict[str, float]:
    """GET throughput of the Redis tier on loopback, raw and decoded into tensors."""
    from pipeline.cache.codec import encode_tensor
    from pipeline.cache.redis_tier import RedisTier
    from pipeline.cache.tiered import TieredCache
    from pipeline.spec import PreprocessSpec
    from tests.redis_server import RedisServer

    spec = PreprocessSpec().digest()
    blob = encode_tensor(np.random.default_rng(0).integers(0, 255, (3, 224, 224), np.uint8), spec)
    with tempfile.TemporaryDirectory() as folder, RedisServer(Path(folder)) as server:
        tier = RedisTier(server.url, "bench", 3600, 1 << 20)
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--model", default="mobilenet_v3_small")
    parser.add_argument("--redis-entries", type=int, default=2000)
    args = parser.parse_args()
    directory = ensure_subset(ensure_dataset(max(args.images, 1000)), args.images)
    warm_page_cache(directory)
    with tempfile.TemporaryDirectory() as cache_dir:
        cold = score_once(directory, args.model, Path(cache_dir), results=True)
        tensor = score_once(directory, args.model, Path(cache_dir), results=False)
        result = score_once(directory, args.model, Path(cache_dir), results=True)
    numbers: dict[str, Any] = {
        "date": dt.date.today().isoformat(), "machine": machine(), "model": args.model,
        "images": args.images, "cold": cold, "warm_tensor": tensor, "warm_result": result,
        "model_only": measure_model_only(args.model, seconds=5.0),
        **redis_hits_per_s(args.redis_entries)}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"cache-{time.strftime('%Y%m%d-%H%M%S')}.json").write_text(
        json.dumps(numbers, indent=2))
    write_readme(numbers)
    print(table(numbers))


def table(n: dict[str, Any]) -> str:
    m = n["machine"]
    return "\n".join([
        f"Measured {n['date']} on {m['cores']} cores ({m['cpu']}), torch {m['torch']}, "
        f"{m['pillow']}; {n['images']} mixed-size JPEGs, model `{n['model']}`, "
        "Engine.run (setup excluded), one run each, in this order.",
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


def write_readme(numbers: dict[str, Any]) -> None:
    text = README.read_text() if README.exists() else "# Benchmarks\n"
    block = f"{BEGIN}\n{table(numbers)}\n{END}"
    if BEGIN in text:
        head, rest = text.split(BEGIN, 1)
        text = head + block + rest.split(END, 1)[1]
    else:
        text = text.rstrip() + "\n\n## Cache (`bench_cache.py`)\n\n" + block + "\n"
    README.write_text(text)


if __name__ == "__main__":
    main()
