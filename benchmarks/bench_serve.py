"""Latency of `imgpipe serve` at low load: one job at a time (submit, wait for its
result on a private reply stream, next), path jobs and inline data jobs, against
the model's own batch-of-1 latency and the preprocessing time of one image,
measured in the same run; plus the per-stage timings the results carry. Its
throughput against other serving is bench_command's.

    .venv/bin/python -m benchmarks.bench_serve [--images N] [--model NAME] [--quick]

Starts its own redis-server on a free port; never touches another Redis.
"""

from __future__ import annotations

import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

import numpy as np

from benchmarks import datasets, harness
from benchmarks.harness import log
from benchmarks.services import redis_server, running_daemon, submit_and_wait, tail

if TYPE_CHECKING:
    from pipeline.transport.client import Client

# The daemon and the model-only latency run with the command's thread policy.
# Nothing imported above loads torch.
os.environ.update(harness.IMGPIPE_ENV)
PREFIX = "bench-serve"
WARMUP_BURST = 64  # jobs sent at once before measuring: full batches, both workers
WARMUP_SINGLES = 10  # then one at a time: batches of one
# Idle time before each low-load job (not timed), uniform in [0, MAX_GAP_S): jobs
# arrive at random moments, as independent clients' jobs would, not in step
# with any timer (Redis's, the daemon's polling).
MAX_GAP_S = 0.1
RESULT_TIMEOUT_S = 120.0
STAGES = ("queue_wait", "preprocess", "inference")


def parse_args(argv: Optional[list[str]]) -> Any:
    parser = harness.parser(__doc__, "100 images, 50 latency jobs")
    parser.add_argument("--images", type=int, default=datasets.FULL_SIZE,
                        help="the dataset the jobs are spread over (default 1000)")
    parser.add_argument("--model", default="mobilenet_v3_small",
                        help="model for every measurement (default mobilenet_v3_small)")
    parser.add_argument("--latency-jobs", type=int, default=200,
                        help="jobs per low-load latency run (default 200)")
    parser.add_argument("--no-delay-variant", dest="no_delay", action="store_false",
                        help="skip the diagnostic latency run with batching.max_delay_ms=0")
    args = parser.parse_args(argv)
    if args.quick:
        args.images, args.latency_jobs = 100, 50
    return args


def daemon_env(model: str, redis_url: str, root: Path,
               extra: Optional[dict[str, str]] = None) -> dict[str, str]:
    """The daemon's IMGPIPE_* settings: harness.settings (the model on the CPU,
    cache off), plus Redis and allowed_roots."""
    weights = datasets.weights_for(model)
    env = {"IMGPIPE_MODEL__NAME": model, "IMGPIPE_MODEL__DEVICE": "cpu",
           "IMGPIPE_REDIS_URL": redis_url, "IMGPIPE_REDIS__PREFIX": PREFIX,
           "IMGPIPE_SERVE__ALLOWED_ROOTS": str(root), "IMGPIPE_CACHE__ENABLED": "false"}
    if weights is not None:
        env["IMGPIPE_MODEL__WEIGHTS"] = str(weights)
    return {**env, **(extra or {})}


def warm_up(client: Client, files: list[Path]) -> None:
    """A burst (full batches on every worker), then single jobs (batches of one)."""
    submit_and_wait(client, [{"image": str(files[i % len(files)])}
                             for i in range(WARMUP_BURST)], RESULT_TIMEOUT_S)
    for path in files[:WARMUP_SINGLES]:
        ask(client, path, data=False)


def ask(client: Client, path: Path, data: bool) -> tuple[float, dict[str, Any]]:
    """One job, submitted and waited for: (end-to-end s as the client sees it, result)."""
    payload = path.read_bytes() if data else None
    reply = client.reply_stream()
    started = time.perf_counter()
    job_id = client.submit(image=None if data else str(path), data=payload, reply_to=reply)
    found = client.wait([job_id], stream=reply, timeout_s=RESULT_TIMEOUT_S)
    elapsed_s = time.perf_counter() - started
    client.delete_stream(reply)
    result = found.get(job_id)
    if result is None or result.get("status") != "ok":
        raise RuntimeError(f"{path.name}: {result or 'no result'}")
    return elapsed_s, result


def gaps(count: int) -> list[float]:
    """The same seeded idle times before each of `count` low-load jobs."""
    return [float(g) for g in np.random.default_rng(1).uniform(0, MAX_GAP_S, count)]


def measure_latency(client: Client, files: list[Path], data: bool) -> dict[str, Any]:
    """End-to-end latency of one job at a time, with the stage timings results carry."""
    e2e_s, rows = [], []
    for path, gap_s in zip(files, gaps(len(files)), strict=True):
        time.sleep(gap_s)
        elapsed_s, result = ask(client, path, data)
        e2e_s.append(elapsed_s)
        rows.append(result["timings_ms"])
    unaccounted = [s * 1000 - sum(row.get(stage, 0.0) for stage in STAGES)
                   for s, row in zip(e2e_s, rows, strict=True)]
    return {"jobs": len(files), **harness.latency_ms(e2e_s),
            "stage_medians_ms": {stage: statistics.median(row.get(stage, 0.0) for row in rows)
                                 for stage in STAGES},
            "unaccounted_p50_ms": statistics.median(unaccounted),
            "samples_ms": [s * 1000 for s in e2e_s]}


def model_latency(model: str, calls: int) -> dict[str, float]:
    """The model alone on one image: the daemon's inference backend (the engine's
    CPU default) on a batch of 1, after the same idle times as the jobs."""
    backend = harness.default_backend(model, 1)
    sample = harness.random_images(model, 1)
    for _ in range(10):
        backend.predict(sample)
    samples = []
    for gap_s in gaps(calls):
        time.sleep(gap_s)
        started = time.perf_counter()
        backend.predict(sample)
        samples.append(time.perf_counter() - started)
    backend.close()
    return harness.latency_ms(samples)


def preprocess_latency(model: str, files: list[Path]) -> dict[str, float]:
    """One image at a time, in this process: read the file, then the pillow backend
    with the daemon's spec and limits (what a pool worker does for a chunk of one)."""
    from pipeline.preprocess.select import create_backend
    from pipeline.sources.files import read_file

    pre = harness.settings(model).preprocess
    backend = create_backend("pillow", pre.spec(), pre.limits())
    backend.setup()
    backend.run([files[0].read_bytes()])
    samples = []
    for path in files:
        started = time.perf_counter()
        outcome = backend.run([read_file(str(path), pre.max_file_bytes)])[0]
        samples.append(time.perf_counter() - started)
        if not isinstance(outcome, np.ndarray):
            raise RuntimeError(f"{path.name}: {outcome}")
    backend.close()
    return harness.latency_ms(samples)


def daemon_latency(args: Any, directory: Path, url: str, log_path: Path,
                   kinds: tuple[bool, ...], extra: Optional[dict[str, str]] = None,
                   ) -> dict[str, Any]:
    """A daemon up and warm, then each kind of job (path, data) one at a time."""
    from pipeline.config import RedisSettings
    from pipeline.transport.client import Client

    files = datasets.spread(datasets.list_images(directory), args.latency_jobs)
    out: dict[str, Any] = {}
    with running_daemon(daemon_env(args.model, url, directory, extra), log_path), \
            Client(RedisSettings(url=url, prefix=PREFIX)) as client:
        warm_up(client, files)
        for data in kinds:
            log(f"latency: {len(files)} {'data' if data else 'path'} jobs, one at a time"
                f"{' ' + str(extra) if extra else ''}")
            out["data" if data else "path"] = measure_latency(client, files, data)
        out["warnings"] = [line for line in tail(log_path, 10**9).splitlines()
                           if '"level": "warning"' in line or '"level": "error"' in line]
    return out


def run(args: Any, directory: Path, scratch: Path) -> dict[str, Any]:
    """Model and preprocessing alone, then Redis and the daemon up for the jobs."""
    files = datasets.spread(datasets.list_images(directory), args.latency_jobs)
    log(f"latency: model alone (batch of 1) and preprocessing alone, {len(files)} each")
    out: dict[str, Any] = {"model": model_latency(args.model, len(files)),
                           "preprocess": preprocess_latency(args.model, files)}
    with redis_server(scratch / "redis") as url:
        out["redis"] = redis_info(url)
        measured = daemon_latency(args, directory, url, scratch / "serve.log",
                                  (False, True))
        out["daemon_warnings"] = measured.pop("warnings")
        out.update(measured)
        if args.no_delay:
            out["path_no_delay"] = daemon_latency(
                args, directory, url, scratch / "serve-no-delay.log", (False,),
                {"IMGPIPE_BATCHING__MAX_DELAY_MS": "0"})["path"]
    return out


def redis_info(url: str) -> dict[str, Any]:
    """The server's version and hz (its timer, Redis's default 10)."""
    import redis

    with redis.Redis.from_url(url) as conn:
        return {"version": conn.info("server")["redis_version"],
                "hz": int(conn.config_get("hz")["hz"])}


# ---------------------------------------------------------------- report


E2E_ROWS = (("path", "end to end, path jobs"), ("data", "end to end, data jobs (bytes inline)"),
            ("path_no_delay", "diagnostic: path jobs, max_delay_ms=0"))


def latency_lines(n: dict[str, Any]) -> list[str]:
    model, pre = n["model"]["p50_ms"], n["preprocess"]["p50_ms"]
    lines = [f"Latency at low load, ms: one job at a time, {n['path']['jobs']} jobs per row "
             "(files spread over the dataset's sizes), each after a random idle time of "
             f"0-{MAX_GAP_S * 1000:g} ms. The stage columns are medians of the `timings_ms` "
             "the results carry; rest is the median of e2e minus those stages.", "",
             "| measurement | p50 | p99 | mean | p50 - model | p50 - model - preprocessing "
             "| queue_wait | preprocess | inference | rest |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for key, name in E2E_ROWS:
        if key in n:
            r, s = n[key], n[key]["stage_medians_ms"]
            lines.append(f"| {name} | {r['p50_ms']:.1f} | {r['p99_ms']:.1f} | {r['mean_ms']:.1f} "
                         f"| {r['p50_ms'] - model:.1f} | {r['p50_ms'] - model - pre:.1f} "
                         f"| {s['queue_wait']:.1f} | {s['preprocess']:.1f} | "
                         f"{s['inference']:.1f} | {r['unaccounted_p50_ms']:.1f} |")
    for key, name in (("model", "model alone, batch of 1 (the engine's CPU default backend)"),
                      ("preprocess", "preprocessing alone, one image (read + pillow)")):
        r = n[key]
        lines.append(f"| {name} | {r['p50_ms']:.1f} | {r['p99_ms']:.1f} | {r['mean_ms']:.1f} "
                     "| | | | | | |")
    return lines


def report(n: dict[str, Any]) -> str:
    """Everything measured, as the Markdown block that goes into the README."""
    redis = f"redis-server {n['redis']['version']} (hz {n['redis']['hz']}, no persistence)"
    overhead = n["path"]["p50_ms"] - n["model"]["p50_ms"]
    limit = n["max_delay_ms"] + 5
    lines = [f"{harness.measured_on(n, redis)} Model `{n['options']['model']}`, cache off, "
             f"default batching (max_batch_size {n['max_batch_size']}, max_delay_ms "
             f"{n['max_delay_ms']:g}), preprocessing workers: one per core; whole benchmark "
             f"{n['total_s'] / 60:.1f} min.", "", *latency_lines(n), "",
             *harness.target_lines([(f"overhead at p50, path jobs (e2e - model) <= "
                                     f"max_delay_ms + 5 = {limit:g} ms: {overhead:.1f} ms",
                                     overhead <= limit)])]
    if n["daemon_warnings"]:
        lines += ["", f"The daemon logged {len(n['daemon_warnings'])} warnings or errors, "
                  f"the first: `{n['daemon_warnings'][0]}`"]
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    directory = datasets.first_images(args.images)
    batching = harness.settings(args.model).batching
    numbers = harness.run_header(directory, args, max_batch_size=batching.max_batch_size,
                                 max_delay_ms=batching.max_delay_ms)
    with tempfile.TemporaryDirectory(prefix="bench-serve-") as scratch:
        numbers.update(run(args, directory, Path(scratch)))
    return harness.finish("serve", args, numbers, started, report, "serve")


if __name__ == "__main__":
    sys.exit(main())
