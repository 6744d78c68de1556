"""The whole command a user types, against what they would write instead.

1. `imgpipe score DIR --out FILE.jsonl` with the defaults, as a fresh process
   (start-up included), against the script a user would write instead
   (benchmarks/baseline.py), also as a fresh process; alternating, --runs each, on
   (a) 1,000 labelled ImageNet photographs with distinct bytes (accuracy too),
   (b) the generated mixed-size JPEGs (0.08-12 MP).
   One untimed imgpipe run goes first: the first run on a machine exports the
   model to ONNX Runtime and checks it, once.
2. The same after `imgpipe optimize --images ../shared/data/imagenet-val-100
   --calibration-images samples`,
   if optimize accepts that set and chooses a variant.
3. `imgpipe serve` against a plain Celery worker (benchmarks/celery_worker.py;
   eager torch, then ONNX Runtime), the same inline-image jobs; alternating.

    .venv/bin/python -m benchmarks.bench_command [--quick] [--runs N] [--no-serve]

Writes the results block into benchmarks/README.md between the command
markers and every run to benchmarks/results/command-*.json.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from benchmarks import datasets, harness
from benchmarks.harness import BASELINE, CORES, IMGPIPE, log, run_command, user_env
from benchmarks.services import (
    redis_server,
    running_celery_worker,
    running_daemon,
    submit_and_wait,
)

MODEL = "efficientnet_lite0"  # imgpipe's default model, with its ImageNet weights
PROFILES = "profiles"  # where a cache directory keeps optimize's choice
CELERY_BACKENDS = {"onnxruntime": 2, "torch": 1}  # Redis database of each worker
WARMUP_JOBS = 4 * CORES  # every prefork process and the daemon's workers see a few
RESULT_TIMEOUT_S = 900.0
TARGETS = {"photos": 4.0, "mixed": 3.0}  # imgpipe / script, median wall time
SERVE_TARGETS = {"onnxruntime": 1.5, "torch": 2.5}  # serve / Celery, median jobs/s
ACCURACY_SLACK = 0.1  # points of top-1 or top-5 imgpipe may be below the script
# optimize's artifacts (torch-compile's kernels above all, minutes to build on 2
# cores) are kept between runs of this benchmark; the defaults' are not.
OPTIMIZE_ARTIFACTS = datasets.DATA / "command-optimize-artifacts"
OPTIMIZE_COMMAND = ("imgpipe optimize --images ../shared/data/imagenet-val-100 "
                    "--calibration-images samples")
OPTIMIZE_TIMEOUT_S = 1800.0


def parse_args(argv: Optional[list[str]]) -> Any:
    parser = harness.parser(__doc__, "200 photos, 100 mixed, 60 jobs, one run, no optimize")
    parser.add_argument("--runs", type=int, default=3, help="alternating runs of each (3)")
    parser.add_argument("--mixed-images", type=int, default=datasets.FULL_SIZE,
                        help="files of the generated mixed-size directory (default 1000)")
    parser.add_argument("--jobs", type=int, default=300, help="serve jobs per run (300)")
    parser.add_argument("--no-optimize", dest="optimize", action="store_false",
                        help="skip imgpipe score after imgpipe optimize")
    parser.add_argument("--no-serve", dest="serve", action="store_false",
                        help="skip imgpipe serve against Celery")
    args = parser.parse_args(argv)
    args.photos = len(datasets.PHOTO_QUALITIES) * 100  # files of (a), the first by name
    if args.quick:
        args.photos, args.mixed_images, args.jobs, args.runs, args.optimize = 200, 100, 60, 1, False
    args.runs = max(1, args.runs)
    return args


# ---------------------------------------------------------------- fresh processes


@dataclass
class Scored:
    """One fresh-process run over a directory."""

    wall_s: float
    top5: dict[str, list[int]]  # file name -> ImageNet class indices, best first
    summary: str = ""  # imgpipe's closing lines (which backend ran, the cache)


def imgpipe_score(directory: Path, scratch: Path, env: dict[str, str],
                  cache_dir: Optional[Path] = None) -> Scored:
    """`imgpipe score DIR --out FILE.jsonl`, defaults, with a fresh --cache-dir (given
    the profiles of `cache_dir`), so that every run is independent of the others."""
    run = scratch / f"imgpipe-{uuid.uuid4().hex[:8]}"
    cache = run / "cache"
    run.mkdir()
    if cache_dir is not None:  # optimize's choice, and nothing else of its cache
        shutil.copytree(cache_dir / PROFILES, cache / PROFILES)
    out = run / "results.jsonl"
    wall_s, _, stderr = run_command([IMGPIPE, "score", str(directory), "--out",
                                      str(out), "--cache-dir", str(cache)], env)
    records = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()[1:]]
    shutil.rmtree(run)
    failed = [r for r in records if r["status"] != "ok"]
    if failed or len(records) != len(datasets.list_images(directory)):
        raise RuntimeError(f"imgpipe scored {len(records)} files, {len(failed)} failed: "
                           f"{failed[:2]}")
    summary = "\n".join(line for line in stderr.splitlines()
                        if line.startswith(("done:", "cache:", "model ")))
    return Scored(wall_s, {Path(r["path"]).name: [p["index"] for p in r["predictions"]]
                           for r in records}, summary)


def script_score(directory: Path, scratch: Path) -> Scored:
    """The baseline script over DIR, as its own process with a user's environment."""
    out = scratch / f"script-{uuid.uuid4().hex[:8]}.jsonl"
    wall_s, _, _ = run_command([*BASELINE, str(directory), "--model", MODEL, "--out", str(out)],
                               user_env())
    rows = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    out.unlink()
    return Scored(wall_s, {row["file"]: row["top5"] for row in rows})


# ---------------------------------------------------------------- 1. score vs script


def first_run(directory: Path, scratch: Path, env: dict[str, str]) -> dict[str, Any]:
    """The untimed warm-up: imgpipe's first run with an empty artifacts directory,
    which exports the model and checks the export (once per machine)."""
    log(f"first imgpipe run over {directory.name} (empty artifacts directory)")
    scored = imgpipe_score(directory, scratch, env)
    log(f"first run: {scored.wall_s:.1f} s")
    return {"wall_s": scored.wall_s, "summary": scored.summary}


def compare(name: str, directory: Path, scratch: Path, env: dict[str, str],
            args: Any, optimized: Optional[Path]) -> dict[str, Any]:
    """imgpipe (and imgpipe after optimize) and the script, alternating."""
    runs: dict[str, list[Scored]] = {"imgpipe": [], "script": [], "optimized": []}
    for attempt in range(args.runs):
        log(f"{name}: run {attempt + 1}/{args.runs}")
        runs["imgpipe"].append(imgpipe_score(directory, scratch, env))
        runs["script"].append(script_score(directory, scratch))
        if optimized is not None:
            runs["optimized"].append(
                imgpipe_score(directory, scratch, optimize_env(), optimized))
        log("  " + ", ".join(f"{k} {v[-1].wall_s:.1f} s" for k, v in runs.items() if v))
    files = len(datasets.list_images(directory))
    return {"files": files, "summary": runs["imgpipe"][0].summary,
            **{key: timing(scored, files) for key, scored in runs.items() if scored},
            "runs": runs}


def timing(runs: list[Scored], files: int) -> dict[str, Any]:
    walls = [r.wall_s for r in runs]
    median = statistics.median(walls)
    return {"wall_s": walls, "median_s": median, "images_per_s": files / median}


def agreement(a: dict[str, list[int]], b: dict[str, list[int]]) -> float:
    """Share of files, in percent, with the same top-1 in both."""
    return 100 * sum(a[f][0] == b[f][0] for f in a) / len(a)


def photo_accuracy(result: dict[str, Any], labels: dict[str, int]) -> dict[str, Any]:
    """Accuracy of each command's first run on (a), and whether its runs agree."""
    runs: dict[str, list[Scored]] = result["runs"]
    out: dict[str, Any] = {}
    for key, scored in runs.items():
        if scored:
            out[key] = {**harness.accuracy(scored[0].top5, labels),
                        "same_top5_every_run": all(s.top5 == scored[0].top5 for s in scored)}
    out["top1_agreement"] = agreement(runs["imgpipe"][0].top5, runs["script"][0].top5)
    return out


# ---------------------------------------------------------------- 2. optimize


def optimize(scratch: Path) -> dict[str, Any]:
    """`imgpipe optimize --images SHARED_PHOTOS --calibration-images samples/` into
    its own cache directory: what it chose (None when it failed, ran out of time or
    chose nothing), that directory, and whether its artifacts had to be built."""
    cache = scratch / "optimize-cache"
    # int8 calibrates on other real photographs (samples/): on the validation set
    # itself it could not be judged (optimize would leave it undecided).
    command = [IMGPIPE, "optimize", "--images", str(datasets.SHARED_PHOTOS),
               "--calibration-images", str(datasets.SAMPLES), "--cache-dir", str(cache)]
    fresh = not OPTIMIZE_ARTIFACTS.exists()
    log(f"imgpipe optimize --images {datasets.SHARED_PHOTOS} (artifacts "
        f"{'built now' if fresh else 'kept from an earlier run'})")
    started = time.perf_counter()
    try:
        _, stdout, stderr = run_command(command, optimize_env(), OPTIMIZE_TIMEOUT_S)
        output, failed = stdout + stderr, False
    except (RuntimeError, subprocess.TimeoutExpired) as exc:  # reported; the rest goes on
        output, failed = str(exc), True
    wall_s = time.perf_counter() - started
    profiles = sorted((cache / PROFILES).glob("*.json"))
    chosen = None
    if profiles and not failed:
        profile = json.loads(profiles[0].read_text(encoding="utf-8"))
        chosen = f"{profile['backend']}:{profile['precision']}"
    log(f"optimize: {'failed' if failed else 'done'} after {wall_s:.0f} s, chose {chosen}")
    return {"failed": failed, "wall_s": wall_s, "chosen": chosen, "artifacts_built": fresh,
            "cache_dir": str(cache), "output_tail": output.strip().splitlines()[-25:]}


def optimize_env() -> dict[str, str]:
    """optimize and the runs after it share the kept artifacts directory."""
    return {**os.environ, "IMGPIPE_MODEL__ARTIFACTS_DIR": str(OPTIMIZE_ARTIFACTS)}


# ---------------------------------------------------------------- 3. serve vs Celery


def serve_env(url: str, scratch: Path, artifacts: Path) -> dict[str, str]:
    """The daemon's settings: the defaults, with this run's Redis, a fresh cache
    directory and the artifacts section 1 exported."""
    return {"IMGPIPE_REDIS_URL": url, "IMGPIPE_CACHE__DIR": str(scratch / "serve-cache"),
            "IMGPIPE_MODEL__ARTIFACTS_DIR": str(artifacts)}


def serve_jobs(client: Any, payloads: dict[str, bytes]) -> dict[str, Any]:
    """Every payload as an inline-data job (job id = file name) to one fresh reply
    stream, timed from before the first submit to the last result read."""
    cpu = time.process_time()
    started = time.perf_counter()
    found = submit_and_wait(client, [{"data": data, "job_id": name}
                                     for name, data in payloads.items()], RESULT_TIMEOUT_S)
    elapsed = time.perf_counter() - started
    return {"jobs_per_s": len(found) / elapsed, "elapsed_s": elapsed,
            "client_cpu_s": time.process_time() - cpu,
            "top1": {job: r["predictions"][0]["index"] for job, r in found.items()}}


def celery_jobs(app: Any, payloads: dict[str, bytes]) -> dict[str, Any]:
    """Every payload as one `classify` task, timed from before the first send to the
    last result read (AsyncResult.get, Redis result backend)."""
    cpu = time.process_time()
    started = time.perf_counter()
    pending = {name: app.send_task("classify", args=(data,)) for name, data in payloads.items()}
    top5 = {name: result.get(timeout=RESULT_TIMEOUT_S) for name, result in pending.items()}
    elapsed = time.perf_counter() - started
    for result in pending.values():
        result.forget()
    return {"jobs_per_s": len(payloads) / elapsed, "elapsed_s": elapsed,
            "client_cpu_s": time.process_time() - cpu,
            "top1": {name: int(top[0][0]) for name, top in top5.items()}}


def job_rounds(directory: Path, args: Any) -> tuple[dict[str, bytes], list[dict[str, bytes]]]:
    """Warm-up payloads, then one set of `jobs` distinct photographs per run (no
    daemon cache hit across runs), taken from the end of (a)'s files."""
    files = datasets.list_images(directory)
    warm = {f.name: f.read_bytes() for f in files[-WARMUP_JOBS:]}
    rest = files[:-WARMUP_JOBS]
    if len(rest) < args.jobs * args.runs:
        raise RuntimeError(f"{len(rest)} photographs for {args.runs} x {args.jobs} jobs")
    rounds = [{f.name: f.read_bytes() for f in rest[k * args.jobs:(k + 1) * args.jobs]}
              for k in range(args.runs)]
    return warm, rounds


@contextmanager
def celery_clients(url: str, scratch: Path, onnx_file: Path) -> Iterator[dict[str, Any]]:
    """One running worker per backend (its own Redis database), and a Celery app
    (client) for each."""
    from celery import Celery

    with ExitStack() as stack:
        apps = {}
        for backend, db in CELERY_BACKENDS.items():
            broker = url.rsplit("/", 1)[0] + f"/{db}"
            stack.enter_context(running_celery_worker(
                "benchmarks.celery_worker", CORES, backend,
                {**user_env(), "CELERY_BROKER_URL": broker, "MODEL_BACKEND": backend,
                 "ONNX_FILE": str(onnx_file)}, scratch / f"celery-{backend}.log"))
            apps[backend] = Celery("client", broker=broker, backend=broker)
            log(f"celery worker ({backend}) ready")
        yield apps


def serve_vs_celery(directory: Path, labels: dict[str, int], scratch: Path,
                    artifacts: Path, args: Any) -> dict[str, Any]:
    """imgpipe serve and the Celery workers, all warm, alternating per run."""
    from pipeline.config import RedisSettings
    from pipeline.transport.client import Client

    warm, rounds = job_rounds(directory, args)
    onnx_file = scratch / "celery-model" / "efficientnet_lite0.onnx"
    onnx_file.parent.mkdir()
    log("exporting the Celery worker's ONNX graph (torch.onnx.export)")
    export_s, _, _ = run_command([sys.executable, "-m", "benchmarks.celery_worker", "export",
                                  str(onnx_file)], user_env())
    systems = ["serve", *CELERY_BACKENDS]
    measured: dict[str, list[dict[str, Any]]] = {name: [] for name in systems}
    with redis_server(scratch / "redis") as url, \
            running_daemon(serve_env(url, scratch, artifacts), scratch / "serve.log") as daemon, \
            Client(RedisSettings(url=url)) as client, \
            celery_clients(url, scratch, onnx_file) as apps:
        serve_jobs(client, warm)
        for app in apps.values():
            celery_jobs(app, warm)
        for attempt, payloads in enumerate(rounds):
            log(f"serve vs Celery: run {attempt + 1}/{len(rounds)}, {len(payloads)} jobs")
            measured["serve"].append(serve_jobs(client, payloads))
            for backend, app in apps.items():
                measured[backend].append(celery_jobs(app, payloads))
            log("  " + ", ".join(f"{k} {v[-1]['jobs_per_s']:.1f} jobs/s"
                                 for k, v in measured.items()))
        daemon_onnxruntime = has_onnxruntime(daemon.pid)
    return {"jobs": args.jobs, "onnx_export_s": export_s,
            "daemon_has_onnxruntime": daemon_onnxruntime,
            **{name: summarise_jobs(runs, labels) for name, runs in measured.items()}}


def has_onnxruntime(pid: int) -> bool:
    """Whether a process has ONNX Runtime loaded: the daemon does not log which
    inference backend it chose, and it runs inference in its main process."""
    return "onnxruntime" in Path(f"/proc/{pid}/maps").read_text(encoding="utf-8", errors="replace")


def summarise_jobs(runs: list[dict[str, Any]], labels: dict[str, int]) -> dict[str, Any]:
    rates = [r["jobs_per_s"] for r in runs]
    top1 = {job: index for r in runs for job, index in r["top1"].items()}
    return {"jobs_per_s": rates, "median_jobs_per_s": statistics.median(rates),
            "client_cpu_s": [r["client_cpu_s"] for r in runs],
            "top1_accuracy": 100 * sum(top1[j] == labels[j] for j in top1) / len(top1),
            "top1": top1}


# ---------------------------------------------------------------- report


def score_ratio(result: dict[str, Any], key: str = "imgpipe") -> float:
    return float(result["script"]["median_s"] / result[key]["median_s"])


def targets(n: dict[str, Any]) -> list[tuple[str, bool]]:
    checks = []
    for name, label in (("photos", "(a) photographs"), ("mixed", "(b) mixed sizes")):
        ratio = score_ratio(n[name])
        checks.append((f"{label}: imgpipe score >= {TARGETS[name]:g}x the script: "
                       f"{ratio:.2f}x", ratio >= TARGETS[name]))
    acc = n["accuracy"]
    for k in ("top1", "top5"):
        diff = acc["imgpipe"][k] - acc["script"][k]
        checks.append((f"(a) {k} accuracy within {ACCURACY_SLACK:g} point of the script's "
                       f"(eager): {diff:+.1f} points", diff >= -ACCURACY_SLACK))
    serve = n.get("serve")
    if serve:
        for backend, target in SERVE_TARGETS.items():
            ratio = serve["serve"]["median_jobs_per_s"] / serve[backend]["median_jobs_per_s"]
            checks.append((f"imgpipe serve >= {target:g}x the Celery worker with {backend}: "
                           f"{ratio:.2f}x", ratio >= target))
    return checks


def score_table(n: dict[str, Any]) -> list[str]:
    lines = ["| directory | files | imgpipe score s | images/s | script s | images/s "
             "| imgpipe / script |",
             "|---|---:|---|---:|---|---:|---:|"]
    for name, label in (("photos", "(a) ImageNet photographs"), ("mixed", "(b) mixed sizes")):
        r = n[name]
        lines.append(f"| {label} | {r['files']} | {_runs(r['imgpipe'])} | "
                     f"{r['imgpipe']['images_per_s']:.1f} | {_runs(r['script'])} | "
                     f"{r['script']['images_per_s']:.1f} | {score_ratio(r):.2f}x |")
        if "optimized" in r:
            lines.append(f"| {label}, after optimize | {r['files']} | {_runs(r['optimized'])} "
                         f"| {r['optimized']['images_per_s']:.1f} | | | "
                         f"{score_ratio(r, 'optimized'):.2f}x |")
    return lines


def _runs(t: dict[str, Any]) -> str:
    """"median (run, run, run)" in seconds."""
    return f"{t['median_s']:.1f} ({', '.join(f'{s:.1f}' for s in t['wall_s'])})"


def accuracy_lines(n: dict[str, Any]) -> list[str]:
    acc = n["accuracy"]
    names = {"imgpipe": "imgpipe score (defaults)", "script": "script (eager torch)",
             "optimized": f"imgpipe score after optimize ({n['optimize'].get('chosen')})"}
    lines = [f"| (a), {acc['imgpipe']['images']} files | top-1 % | top-5 % "
             "| same top-5 in every run |",
             "|---|---:|---:|---|"]
    for key, name in names.items():
        if key in acc:
            a = acc[key]
            lines.append(f"| {name} | {a['top1']:.1f} | {a['top5']:.1f} | "
                         f"{'yes' if a['same_top5_every_run'] else 'no'} |")
    return [*lines, "", f"Top-1 agreement, imgpipe score against the script: "
            f"{acc['top1_agreement']:.1f}% of the files."]


def serve_lines(serve: dict[str, Any]) -> list[str]:
    names = {"serve": "imgpipe serve (defaults)", "onnxruntime": "Celery worker, ONNX Runtime",
             "torch": "Celery worker, eager torch"}
    base = serve["serve"]["median_jobs_per_s"]
    lines = [f"{serve['jobs']} jobs per run, each a photograph's bytes inline; jobs/s from "
             "the first submit to the last result read:", "",
             "| system | jobs/s, median (runs) | serve / this | client CPU s | top-1 % |",
             "|---|---|---:|---:|---:|"]
    for key, name in names.items():
        s = serve[key]
        runs = ", ".join(f"{r:.1f}" for r in s["jobs_per_s"])
        lines.append(f"| {name} | {s['median_jobs_per_s']:.1f} ({runs}) | "
                     f"{base / s['median_jobs_per_s']:.2f}x | "
                     f"{statistics.median(s['client_cpu_s']):.2f} | {s['top1_accuracy']:.1f} |")
    if "daemon_has_onnxruntime" in serve:
        lines += ["", "The daemon's process had ONNX Runtime loaded: "
                  f"{'yes' if serve['daemon_has_onnxruntime'] else 'no'}. The Celery "
                  f"worker's graph: `torch.onnx.export`, {serve['onnx_export_s']:.0f} s."]
    return lines


def report(n: dict[str, Any]) -> str:
    photos, mixed = n["dataset"], n["mixed_dataset"]
    lines = [f"{harness.measured_on(n)} (a) {photos['files']} JPEGs, "
             f"{photos['bytes'] / 1e6:.0f} MB; (b) {mixed['files']} JPEGs, "
             f"{mixed['bytes'] / 1e6:.0f} MB. Each command a fresh process, start-up "
             f"included; runs alternating, {n['options']['runs']} of each; whole benchmark "
             f"{n['total_s'] / 60:.1f} min.", "",
             f"First run on this machine (empty artifacts directory; the untimed warm-up "
             f"over (a)): {n['first_run']['wall_s']:.1f} s, against "
             f"{n['photos']['imgpipe']['median_s']:.1f} s (median) once the export is kept: "
             f"{n['first_run']['wall_s'] - n['photos']['imgpipe']['median_s']:+.1f} s, once.",
             "",
             *score_table(n), "", f"imgpipe's summary: `{_one_line(n['photos']['summary'])}`",
             "", *accuracy_lines(n), "", *optimize_lines(n)]
    if n.get("serve"):
        lines += ["", *serve_lines(n["serve"])]
    lines += ["", *harness.target_lines(targets(n))]
    return "\n".join(lines)


def _one_line(text: str) -> str:
    return "; ".join(line for line in text.splitlines() if line.startswith("model "))


def optimize_lines(n: dict[str, Any]) -> list[str]:
    opt = n["optimize"]
    if opt.get("skipped"):
        return [f"`imgpipe optimize`: not run ({opt['skipped']})."]
    if opt["chosen"] is None:
        last = opt["output_tail"][-1] if opt["output_tail"] else ""
        return [f"`{OPTIMIZE_COMMAND}` {'failed' if opt['failed'] else 'ended'} after "
                f"{opt['wall_s']:.0f} s and chose nothing, so the after-optimize runs were "
                f"skipped. Its last line: `{last}`"]
    built = ("built now" if opt["artifacts_built"]
             else "kept from an earlier run, so no torch-compile build")
    return [f"`{OPTIMIZE_COMMAND}` took "
            f"{opt['wall_s']:.0f} s (artifacts {built}) and chose `{opt['chosen']}`."]


def raw(n: dict[str, Any]) -> dict[str, Any]:
    """Everything, with the runs' wall times but not their per-file predictions."""
    out = {k: v for k, v in n.items() if k not in ("photos", "mixed")}
    for name in ("photos", "mixed"):
        out[name] = {k: v for k, v in n[name].items() if k != "runs"}
    out["targets"] = dict(targets(n))
    return out


# ---------------------------------------------------------------- main


def run(args: Any, scratch: Path) -> dict[str, Any]:
    full = datasets.ensure_labelled_photos()
    photos = datasets.ensure_subset(full, args.photos)
    every_label = datasets.labels_of(full)
    labels = {f.name: every_label[f.name] for f in datasets.list_images(photos)}
    mixed = datasets.first_images(args.mixed_images)
    n = harness.run_header(photos, args, mixed_dataset=datasets.describe(mixed))
    datasets.warm_page_cache(mixed)
    artifacts = scratch / "artifacts"  # empty: the first run exports, as on a new machine
    env = {**os.environ, "IMGPIPE_MODEL__ARTIFACTS_DIR": str(artifacts)}
    n["first_run"] = first_run(photos, scratch, env)
    n["optimize"] = optimize(scratch) if args.optimize else {"skipped": "--no-optimize"}
    chosen = n["optimize"].get("chosen")
    optimized = Path(n["optimize"]["cache_dir"]) if chosen else None
    n["photos"] = compare("(a) photographs", photos, scratch, env, args, optimized)
    n["accuracy"] = photo_accuracy(n["photos"], labels)
    n["mixed"] = compare("(b) mixed sizes", mixed, scratch, env, args, optimized)
    if args.serve:
        n["serve"] = serve_vs_celery(full, every_label, scratch, artifacts, args)
    return n


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench-command-") as scratch:
        numbers = run(args, Path(scratch))
    return harness.finish("command", args, numbers, started, report, "command", raw)


if __name__ == "__main__":
    sys.exit(main())
