"""`imgpipe serve` against `imgpipe score`, side by side in one run.

Throughput: the same images and model, (a) scored in-process (bench_score's
(a): Engine.run over the directory in a fresh process, cache off) and (b) sent
as path jobs through Redis to a warm `imgpipe serve` daemon, timed from the
first submit to the last result; interleaved a, b, a, b.

Latency at low load: one job at a time (submit, wait for its result on a
private reply stream, next), path jobs and inline data jobs, against the
model's own batch-of-1 latency and the preprocessing time of one image,
measured in the same run; plus the per-stage timings the results carry.

    .venv/bin/python -m benchmarks.bench_serve [--images N] [--model NAME] [--quick]

Writes the table into benchmarks/README.md between the serve markers and the
raw numbers to benchmarks/results/serve-*.json. Starts its own redis-server on
a free port; never touches another Redis.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

import numpy as np

from benchmarks import datasets, harness
from benchmarks.bench_score import Variant, imgpipe_settings, measure_variant
from benchmarks.harness import CORES, log
from benchmarks.services import ServeDaemon, redis_server, running_daemon

if TYPE_CHECKING:
    from pipeline.transport.client import Client

# What the imgpipe command sets for itself before torch loads (workers/cli.py):
# the daemon, (a) and the model-only latency all run with it. Nothing imported
# above loads torch.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
PREFIX = "bench-serve"
WARMUP_BURST = 64  # jobs sent at once before measuring: full batches, both workers
WARMUP_SINGLES = 10  # then one at a time: batches of one
# Idle time before each low-load job (not timed), uniform in [0, MAX_GAP_S): jobs
# arrive at random moments, as independent clients' jobs would, not in step
# with any timer (Redis's, the daemon's polling).
MAX_GAP_S = 0.1
RESULT_TIMEOUT_S = 120.0
STAGES = ("queue_wait", "preprocess", "inference")


@dataclass
class Options:
    """What to run, from the command line."""

    images: int
    model: str
    repeats: int
    latency_jobs: int
    no_delay: bool
    write_readme: bool
    quick: bool


def parse_args(argv: Optional[list[str]] = None) -> Options:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--images", type=int, default=1000,
                        help="images for the throughput runs (default 1000)")
    parser.add_argument("--model", default="mobilenet_v3_small",
                        help="model for every measurement (default mobilenet_v3_small)")
    parser.add_argument("--repeats", type=int, default=3,
                        help="interleaved (a), (b) pairs (default 3)")
    parser.add_argument("--latency-jobs", type=int, default=200,
                        help="jobs per low-load latency run (default 200)")
    parser.add_argument("--no-delay-variant", dest="no_delay", action="store_false",
                        help="skip the diagnostic latency run with batching.max_delay_ms=0")
    parser.add_argument("--no-readme", dest="write_readme", action="store_false",
                        help="do not update benchmarks/README.md")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: 100 images, 50 latency jobs, one pair, README untouched")
    args = parser.parse_args(argv)
    if args.quick:
        args.images, args.latency_jobs, args.repeats = 100, 50, 1
    return Options(args.images, args.model, max(1, args.repeats), args.latency_jobs,
                   args.no_delay, args.write_readme and not args.quick, args.quick)


# ---------------------------------------------------------------- the daemon


def daemon_env(model: str, redis_url: str, roots: list[Path],
               extra: Optional[dict[str, str]] = None) -> dict[str, str]:
    """The IMGPIPE_* settings of the daemon: (a)'s settings (bench_score's
    imgpipe_settings: model on the CPU, cache off), plus Redis and allowed_roots."""
    weights = datasets.weights_for(model)
    env = {"IMGPIPE_MODEL__NAME": model, "IMGPIPE_MODEL__DEVICE": "cpu",
           "IMGPIPE_REDIS_URL": redis_url, "IMGPIPE_REDIS__PREFIX": PREFIX,
           "IMGPIPE_SERVE__ALLOWED_ROOTS": os.pathsep.join(str(root) for root in roots),
           "IMGPIPE_CACHE__ENABLED": "false"}
    if weights is not None:
        env["IMGPIPE_MODEL__WEIGHTS"] = str(weights)
    return {**env, **(extra or {})}


def warm_up(client: Client, files: list[Path]) -> None:
    """A burst (full batches on every worker), then single jobs (batches of one)."""
    burst = [files[i % len(files)] for i in range(WARMUP_BURST)]
    collect(client, burst, submit_all(client, burst))
    for path in files[:WARMUP_SINGLES]:
        ask(client, path, data=False)


def tree_cpu_s(pids: list[int]) -> float:
    """User + system CPU seconds of these processes so far (gone ones count 0)."""
    import psutil

    total = 0.0
    for pid in pids:
        try:
            times = psutil.Process(pid).cpu_times()
        except psutil.NoSuchProcess:
            continue
        total += times.user + times.system
    return total


@contextmanager
def machine_idle() -> Iterator[dict[str, float]]:
    """Fills in `idle`: the share of all cores' time spent idle during the block.
    Idle cores while a run is under way mean it stalled rather than ran out of CPU."""
    import psutil

    before = psutil.cpu_times()
    out: dict[str, float] = {}
    yield out
    after = psutil.cpu_times()
    # guest time is counted in user time already
    spent = {name: getattr(after, name) - getattr(before, name) for name in after._fields
             if not name.startswith("guest")}
    out["idle"] = (spent["idle"] + spent.get("iowait", 0.0)) / max(sum(spent.values()), 1e-9)


def daemon_pids(daemon: ServeDaemon) -> list[int]:
    import psutil

    pid = daemon.process.pid
    return [pid, *(p.pid for p in psutil.Process(pid).children(recursive=True))]


# ---------------------------------------------------------------- (b) throughput


def submit_all(client: Client, files: list[Path]) -> tuple[str, list[str]]:
    """Every file as a path job to one fresh reply stream: (stream, job ids)."""
    reply = client.reply_stream()
    ids = client.submit_many({"image": str(path), "reply_to": reply} for path in files)
    return reply, ids


def collect(client: Client, files: list[Path],
            submitted: tuple[str, list[str]]) -> list[dict[str, Any]]:
    """Wait for every result of `submitted`; all must be ok. The stream is deleted."""
    reply, ids = submitted
    found = client.wait(ids, stream=reply, timeout_s=max(RESULT_TIMEOUT_S, len(ids) / 5))
    client.delete_stream(reply)
    failed = [r for r in found.values() if r.get("status") != "ok"]
    if len(found) != len(ids) or failed:
        raise RuntimeError(f"{len(found)} of {len(files)} results came back, "
                           f"{len(failed)} not ok: {failed[:3]}")
    return list(found.values())


def measure_serve(client: Client, files: list[Path], daemon: list[int],
                  redis_pid: int) -> dict[str, Any]:
    """(b): jobs/s from the first submit to the last result, and where the CPU went."""
    before = (tree_cpu_s(daemon), tree_cpu_s([redis_pid]), time.process_time())
    started = time.perf_counter()
    with machine_idle() as idle:
        results = collect(client, files, submit_all(client, files))
    elapsed = time.perf_counter() - started
    after = (tree_cpu_s(daemon), tree_cpu_s([redis_pid]), time.process_time())
    daemon_s, redis_s, client_s = (b - a for a, b in zip(before, after, strict=True))
    return {"jobs_per_s": len(files) / elapsed, "elapsed_s": elapsed, "daemon_cpu_s": daemon_s,
            "redis_cpu_s": redis_s, "client_cpu_s": client_s, "machine_idle": idle["idle"],
            "stage_medians_ms": stage_medians(results)}


def stage_medians(results: list[dict[str, Any]]) -> dict[str, float]:
    return {stage: statistics.median(r["timings_ms"].get(stage, 0.0) for r in results)
            for stage in STAGES}


# ---------------------------------------------------------------- latency


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
    e2e_s, results = [], []
    for path, gap_s in zip(files, gaps(len(files)), strict=True):
        time.sleep(gap_s)
        elapsed_s, result = ask(client, path, data)
        e2e_s.append(elapsed_s)
        results.append(result)
    e2e = [s * 1000 for s in e2e_s]
    rows = [r["timings_ms"] for r in results]
    unaccounted = [ms - sum(row.get(stage, 0.0) for stage in STAGES)
                   for ms, row in zip(e2e, rows, strict=True)]
    return {"jobs": len(files), "kind": "data" if data else "path",
            **harness.latency_ms(e2e_s), "stage_medians_ms": stage_medians(results),
            "unaccounted_p50_ms": float(np.percentile(unaccounted, 50)), "samples_ms": e2e}


def model_latency(model: str, calls: int) -> dict[str, float]:
    """The model alone on one image: TorchBackend.predict on a batch of 1, as
    bench_score's (c) does for batches of 32 (same thread count, same policy)."""
    import torch

    from pipeline.backends import TorchBackend
    from pipeline.models import load_model

    shape = imgpipe_settings(model).preprocess.spec().output_shape
    loaded = load_model(model, datasets.weights_for(model))
    backend = TorchBackend(loaded, torch.device("cpu"), 1, shape, threads=CORES)
    backend.setup()
    sample = [np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8)]
    for _ in range(10):
        backend.predict(sample)
    samples = []
    for gap_s in gaps(calls):
        time.sleep(gap_s)  # idle between images, as at low load
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

    pre = imgpipe_settings(model).preprocess
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


# ---------------------------------------------------------------- the run


def throughput(options: Options, directory: Path, client: Client,
               daemon: ServeDaemon, redis_pid: int) -> list[dict[str, Any]]:
    """(a) and (b) interleaved, `repeats` pairs; (a) runs while the daemon idles."""
    files = datasets.list_images(directory)
    pids = daemon_pids(daemon)
    pairs = []
    for attempt in range(options.repeats):
        log(f"(a) imgpipe score over {len(files)} images, run {attempt + 1}/{options.repeats}")
        with machine_idle() as idle:  # setup (model load, workers' start) included
            score, setup_s = measure_variant(options.model, directory, Variant("defaults"))
        log(f"(a) {score:.1f} images/s; (b) imgpipe serve, {len(files)} path jobs")
        serve = measure_serve(client, files, pids, redis_pid)
        log(f"(b) {serve['jobs_per_s']:.1f} jobs/s (b/a {serve['jobs_per_s'] / score:.2f})")
        pairs.append({"score_images_per_s": score, "score_setup_s": setup_s,
                      "score_machine_idle": idle["idle"], **serve})
    return pairs


def latency(options: Options, directory: Path, client: Client) -> dict[str, Any]:
    """Model and preprocessing alone, then path and data jobs one at a time."""
    files = datasets.spread(datasets.list_images(directory), options.latency_jobs)
    log(f"latency: model alone (batch of 1) and preprocessing alone, {len(files)} each")
    out: dict[str, Any] = {"model": model_latency(options.model, len(files)),
                           "preprocess": preprocess_latency(options.model, files)}
    for data in (False, True):
        log(f"latency: {len(files)} {'data' if data else 'path'} jobs, one at a time")
        out["data" if data else "path"] = measure_latency(client, files, data)
    return out


def no_delay_latency(options: Options, directory: Path, url: str,
                     scratch: Path) -> dict[str, Any]:
    """Diagnostic: path-job latency from a daemon with batching.max_delay_ms=0: what
    the batching delay costs a lone job."""
    from pipeline.config import RedisSettings
    from pipeline.transport.client import Client

    files = datasets.spread(datasets.list_images(directory), options.latency_jobs)
    env = daemon_env(options.model, url, [directory], {"IMGPIPE_BATCHING__MAX_DELAY_MS": "0"})
    with running_daemon(env, scratch / "serve-no-delay.log"), \
            Client(RedisSettings(url=url, prefix=PREFIX)) as client:
        log(f"latency: {len(files)} path jobs, max_delay_ms=0")
        for path in files[:WARMUP_SINGLES]:
            ask(client, path, data=False)
        return measure_latency(client, files, data=False)


def run(options: Options, directory: Path, scratch: Path) -> dict[str, Any]:
    """Redis and the daemon up, throughput pairs, latency; everything torn down."""
    from pipeline.config import RedisSettings
    from pipeline.transport.client import Client

    out: dict[str, Any] = {}
    with redis_server(scratch / "redis") as server:
        out["redis"] = configure_redis(server.url)
        env = daemon_env(options.model, server.url, [directory])
        with running_daemon(env, scratch / "serve.log") as daemon, \
                Client(RedisSettings(url=server.url, prefix=PREFIX)) as client:
            log("warming the daemon up")
            warm_up(client, datasets.list_images(directory))
            out["pairs"] = throughput(options, directory, client, daemon, server.process.pid)
            out["latency"] = latency(options, directory, client)
            out["daemon_warnings"] = warnings(daemon.log())
        if options.no_delay:
            out["latency"]["path_no_delay"] = no_delay_latency(
                options, directory, server.url, scratch)
    return out


def configure_redis(url: str) -> dict[str, Any]:
    """AOF off (inline data jobs would otherwise trigger background rewrites, a fork
    and a full copy, part-way through a latency run on the same 2 cores); the
    server's version and hz, which are otherwise its defaults."""
    import redis

    with redis.Redis.from_url(url) as conn:
        conn.config_set("appendonly", "no")
        return {"version": conn.info("server")["redis_version"],
                "hz": int(conn.config_get("hz")["hz"])}


def warnings(daemon_log: str) -> list[str]:
    """The daemon's warning and error lines (JSON lines, its stderr being a file)."""
    return [line for line in daemon_log.splitlines()
            if '"level": "warning"' in line or '"level": "error"' in line]


# ---------------------------------------------------------------- report


def report(n: dict[str, Any]) -> str:
    """Everything measured, as the Markdown block that goes into the README."""
    m, data, settings = n["machine"], n["dataset"], n["settings"]
    lines = [f"{harness.measured_on(n['date'], m)}"
             f"{m['pillow']} {m['pil_version']}, redis-server {n['redis']['version']} "
             f"(hz {n['redis']['hz']}, no persistence); 1-minute load average "
             f"{m['load_average'][0]:.2f} at the start, {n['load_average_end'][0]:.2f} at the "
             f"end. Model `{n['options']['model']}`, cache off, default batching "
             f"(max_batch_size {settings['max_batch_size']}, max_delay_ms "
             f"{settings['max_delay_ms']:g}), preprocessing workers: one per core. "
             f"{data['files']} JPEGs ({data['bytes'] / 1e6:.0f} MB) for throughput; whole "
             f"benchmark {n['total_s'] / 60:.1f} min.",
             "", "Throughput, interleaved (a) then (b), each row one pair:", "",
             *throughput_table(n["pairs"]), "", *latency_lines(n), "", "Targets:", ""]
    lines += harness.target_lines(targets(n))
    if n["daemon_warnings"]:
        lines += ["", f"The daemon logged {len(n['daemon_warnings'])} warnings or errors, "
                  f"the first: `{n['daemon_warnings'][0]}`"]
    return "\n".join(lines)


def throughput_table(pairs: list[dict[str, Any]]) -> list[str]:
    lines = ["| pair | (a) score images/s | (b) serve jobs/s | b/a | (a) machine idle "
             "| (b) machine idle | (b) wall s | (b) CPU s: daemon | redis-server | client |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for index, p in enumerate(pairs, 1):
        lines.append(f"| {index} | {p['score_images_per_s']:.1f} | {p['jobs_per_s']:.1f} | "
                     f"{p['jobs_per_s'] / p['score_images_per_s']:.2f} | "
                     f"{p['score_machine_idle']:.0%} | {p['machine_idle']:.0%} | "
                     f"{p['elapsed_s']:.1f} | {p['daemon_cpu_s']:.1f} | "
                     f"{p['redis_cpu_s']:.2f} | {p['client_cpu_s']:.2f} |")
    best_a, best_b = best(pairs, "score_images_per_s"), best(pairs, "jobs_per_s")
    median = statistics.median(p["jobs_per_s"] / p["score_images_per_s"] for p in pairs)
    lines += [f"| best | {best_a:.1f} | {best_b:.1f} | {best_b / best_a:.2f} "
              f"(median pair {median:.2f}) | | | | | | |", "",
              "Machine idle: the share of all cores' time idle during the run (for (a) "
              "including its setup), whoever else was running."]
    return lines


E2E_ROWS = (
    ("path", "end to end, path jobs"),
    ("data", "end to end, data jobs (bytes inline)"),
    ("path_no_delay", "diagnostic: path jobs, max_delay_ms=0"),
)


def latency_lines(n: dict[str, Any]) -> list[str]:
    lat = n["latency"]
    model, pre = lat["model"]["p50_ms"], lat["preprocess"]["p50_ms"]
    lines = [f"Latency at low load, ms: one job at a time, {lat['path']['jobs']} jobs per row "
             "(files spread over the dataset's sizes), each after a random idle time of "
             f"0-{MAX_GAP_S * 1000:g} ms. The stage columns are medians of the `timings_ms` "
             "the results carry; rest is the median of e2e minus those stages.", "",
             "| measurement | p50 | p99 | mean | p50 - model | p50 - model - preprocessing "
             "| queue_wait | preprocess | inference | rest |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for key, name in E2E_ROWS:
        if key in lat:
            r, s = lat[key], lat[key]["stage_medians_ms"]
            lines.append(f"| {name} | {r['p50_ms']:.1f} | {r['p99_ms']:.1f} | {r['mean_ms']:.1f} "
                         f"| {r['p50_ms'] - model:.1f} | {r['p50_ms'] - model - pre:.1f} "
                         f"| {s['queue_wait']:.1f} | {s['preprocess']:.1f} | "
                         f"{s['inference']:.1f} | {r['unaccounted_p50_ms']:.1f} |")
    for key, name in (("model", "model alone, batch of 1 (TorchBackend.predict)"),
                      ("preprocess", "preprocessing alone, one image (read + pillow)")):
        r = lat[key]
        lines.append(f"| {name} | {r['p50_ms']:.1f} | {r['p99_ms']:.1f} | {r['mean_ms']:.1f} "
                     "| | | | | | |")
    return lines


def overhead(n: dict[str, Any]) -> float:
    """The issue's overhead: p50 end to end of path jobs minus the model's own p50."""
    return float(n["latency"]["path"]["p50_ms"] - n["latency"]["model"]["p50_ms"])


def best(pairs: list[dict[str, Any]], key: str) -> float:
    return max(p[key] for p in pairs)


def targets(n: dict[str, Any]) -> list[tuple[str, bool]]:
    pairs = n["pairs"]
    ratio = best(pairs, "jobs_per_s") / best(pairs, "score_images_per_s")
    limit = n["settings"]["max_delay_ms"] + 5
    return [(f"(b) >= 0.9 x (a), best against best: {ratio:.2f}", ratio >= 0.9),
            (f"overhead at p50, path jobs (e2e - model) <= max_delay_ms + 5 = {limit:g} ms: "
             f"{overhead(n):.1f} ms", overhead(n) <= limit)]


def main(argv: Optional[list[str]] = None) -> int:
    options = parse_args(argv)
    started = time.perf_counter()
    directory = datasets.first_images(options.images)
    batching = imgpipe_settings(options.model).batching
    numbers = harness.run_header(directory, options, settings={
        "max_batch_size": batching.max_batch_size, "max_delay_ms": batching.max_delay_ms})
    with tempfile.TemporaryDirectory(prefix="bench-serve-") as scratch:
        numbers.update(run(options, directory, Path(scratch)))
    numbers["load_average_end"] = os.getloadavg()
    numbers["total_s"] = time.perf_counter() - started
    block = report(numbers)
    print(block)
    print(f"\nraw results: {harness.save_json('serve', numbers, options.quick)}")
    if options.write_readme:
        harness.update_readme("serve", block, "## Serving (`bench_serve.py`)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
