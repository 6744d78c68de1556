"""The `imgpipe` command: thin wrappers over the engine."""

from __future__ import annotations

import argparse
import itertools
import logging
import os
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from pipeline import __version__, logs
from pipeline.errors import ConfigError, ImgpipeError
from workers import jobs_cli

if TYPE_CHECKING:
    from pipeline.config import Settings
    from pipeline.engine import Engine
    from pipeline.items import Job
    from pipeline.predictions import Record
    from pipeline.sinks.results import ResultFile, ResultSink
    from pipeline.sources.inputs import Inputs

EXIT_INTERRUPTED = 130
STARTED = time.perf_counter()  # the command's start, for the summary's wall time


def main(argv: Optional[Sequence[str]] = None) -> int:
    # Before torch loads OpenMP: idle inference threads must sleep, not spin on
    # cores the preprocessing workers need (1.47x for a preprocessing-bound
    # model on 2 cores; benchmarks/README.md).
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    parser = _parser()
    args = parser.parse_args(argv)
    logs.configure()
    stderr = Console(stderr=True, highlight=False, soft_wrap=True)
    try:
        return int(args.handler(args, stderr))
    except ConfigError as exc:
        stderr.print(f"imgpipe: error: {exc}", markup=False)
        return 2
    except ImgpipeError as exc:
        stderr.print(f"imgpipe: error: {exc}", markup=False)
        return 1
    except KeyboardInterrupt:  # before scoring started; a run reports its own
        stderr.print("imgpipe: interrupted", markup=False)
        return EXIT_INTERRUPTED


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="imgpipe", description=(
        "Fast image preprocessing and batched inference."))
    parser.add_argument("--version", action="version", version=f"imgpipe {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    score = commands.add_parser("score", help="score image files, directories and glob "
                                "patterns")
    score.add_argument("inputs", nargs="*", metavar="INPUT", help="an image file, a "
                       "directory (its visible files), or a glob pattern, quoted: "
                       "'photos/*.jpg', 'photos/**/*.png'")
    score.add_argument("--files-from", metavar="FILE", help="also score the files FILE "
                       "lists, one per line (- for standard input)")
    score.add_argument("-0", "--null", action="store_true", help="with --files-from: the "
                       "names are separated by NUL bytes (find -print0), not newlines")
    score.add_argument("--out", help="results file: .jsonl or .csv (resumable); - for "
                       "JSONL on stdout; default: a top-1 table on stdout")
    score.add_argument("--overwrite", action="store_true", help="with --out FILE: start "
                       "FILE afresh instead of resuming it (needed when the settings changed)")
    _engine_flags(score)
    _tta_flag(score)
    _output_flag(score)
    score.add_argument("--recursive", action="store_true", help="descend into subdirectories")
    _cache_flags(score)
    score.add_argument("--metrics-port", type=int, metavar="PORT",
                       help="serve Prometheus /metrics (and /healthz, /readyz) while scoring")
    score.add_argument("--cache", dest="cache.enabled", action=argparse.BooleanOptionalAction,
                       default=None, help="use the tensor and result cache (default: on)")
    score.set_defaults(handler=_score)

    serve = commands.add_parser("serve", help="score jobs from a Redis stream until stopped")
    _engine_flags(serve)
    _tta_flag(serve)
    _output_flag(serve)
    _redis_flags(serve)
    _cache_redis_flag(serve)
    serve.add_argument("--consumer", dest="serve.consumer",
                       help="this daemon's consumer name (default: <hostname>-<pid>)")
    serve.set_defaults(handler=_serve)

    jobs_cli.add_commands(commands, _redis_command_flags)

    doctor = commands.add_parser("doctor", help="check that this machine can run the "
                                 "configured set-up; non-zero exit when it cannot")
    _engine_flags(doctor)
    _redis_flags(doctor)
    _cache_dir_flag(doctor)
    doctor.add_argument("--serve", action="store_true",
                        help="check for `imgpipe serve`: an unreachable Redis is a failure")
    doctor.add_argument("--json", action="store_true", help="the checks as JSON")
    doctor.set_defaults(handler=_doctor)

    bench = commands.add_parser("bench", help="measure each backend on this machine: model "
                                "only, preprocessing only, end to end")
    _measurement_flags(bench, images="directory of images for preprocessing and end to end")
    bench.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 8, 32])
    bench.add_argument("--json", action="store_true", help="the rows as JSON")
    bench.set_defaults(handler=_bench)

    optimize = commands.add_parser("optimize", help="choose the fastest inference backend "
                                   "that scores like eager fp32; score and serve use it")
    _measurement_flags(optimize, images="validation set: at least 100 real photographs like "
                       "production's, labelled (one subdirectory per class, or a labels.csv) "
                       "or not")
    optimize.add_argument("--labels-csv", type=Path, metavar="FILE", help="labels of the "
                          "--images files: a CSV with a 'file' column (relative to --images) "
                          "and one of index, wnid, label, name (default: DIR/labels.csv)")
    optimize.add_argument("--wnids", type=Path, metavar="FILE", help="the model's WordNet ids, "
                          "one per line in class-index order, for labels such as n01440764")
    optimize.add_argument("--unlabelled", action="store_true", help="ignore labels: judge "
                          "on top-1 agreement with eager fp32")
    optimize.add_argument("--min-accuracy-ratio", type=float, default=None, metavar="R",
                          help="labelled set: least top-1 accuracy as a fraction of eager "
                          "fp32's (default 0.99)")
    optimize.add_argument("--threshold", type=float, default=None,
                          help="unlabelled set: least top-1 agreement with eager fp32 "
                          "(default 0.93)")
    optimize.add_argument("--latency-ms", type=float,
                          help="most batch-of-one p50 latency a variant may have")
    optimize.add_argument("--plan-images", type=int, default=None, metavar="N",
                          help="images each batch and thread plan is measured on, end to "
                          "end with the chosen variant (default 400; 0: no plan)")
    _cache_dir_flag(optimize)
    optimize.set_defaults(handler=_optimize, images=None)

    cache = commands.add_parser("cache", help="inspect or empty the cache")
    cache.add_argument("action", choices=["stats", "clear", "verify"])
    cache.add_argument("--config", type=Path, help="TOML settings file")
    _cache_flags(cache)
    cache.add_argument("--yes", action="store_true", help="clear even when the cache's "
                       "Redis also carries job streams (only cache entries are removed)")
    cache.set_defaults(handler=_cache)
    return parser


def _measurement_flags(parser: argparse.ArgumentParser, images: str) -> None:
    _engine_flags(parser)
    parser.add_argument("--backends", nargs="+", type=_variant, metavar="BACKEND[:PRECISION]",
                        help="inference variants to compare, e.g. torch torch:bf16 "
                        "onnxruntime:int8 (default: every one this device runs)")
    parser.add_argument("--images", type=Path, default=Path("samples"), help=images)
    parser.add_argument("--seconds", type=float, default=3.0,
                        help="time per speed measurement (default 3)")


def _variant(text: str) -> Any:
    from pipeline.variants import Variant

    try:
        return Variant.parse(text)
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


def _cache_dir_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--cache-dir", dest="cache.dir", type=Path,
                        help="local cache directory (default: ~/.cache/imgpipe)")


def _engine_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, help="TOML settings file")
    parser.add_argument("--model", dest="model.name", help="model name or TorchScript file")
    parser.add_argument("--weights", dest="model.weights", type=Path,
                        help="state_dict file for torchvision architectures")
    parser.add_argument("--labels", dest="model.labels", type=Path,
                        help="labels file, one class name per line")
    parser.add_argument("--topk", dest="model.topk", type=int)
    parser.add_argument("--device", dest="model.device", help="auto, cpu, cuda or cuda:N")
    parser.add_argument("--model-backend", dest="model.backend", help="auto, torch, "
                        "torch-compile, torch-graphs, torchscript or onnxruntime")
    parser.add_argument("--precision", dest="model.precision", help="fp32, bf16, fp16 or int8")
    parser.add_argument("--calibration-images", dest="model.calibration_images", type=Path,
                        help="directory of real images to calibrate int8 on")
    parser.add_argument("--batch-size", dest="batching.max_batch_size", type=int)
    parser.add_argument("--max-delay-ms", dest="batching.max_delay_ms", type=float)
    parser.add_argument("--workers", dest="preprocess.workers", type=int,
                        help="preprocessing processes (default: one per usable core)")
    parser.add_argument("--backend", dest="preprocess.backend",
                        choices=["auto", "pillow", "dali"])


def _tta_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tta", dest="preprocess.tta",
                        choices=["none", "hflip", "five_crop", "ten_crop"],
                        help="test-time augmentation: score 2, 5 or 10 views of each image "
                             "and average them (default: none)")


def _output_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--output", dest="model.output", choices=["logits", "embedding", "both"],
                        help="what each image gets: logits (top-k predictions), embedding "
                             "(pooled penultimate features, float16) or both; score writes "
                             "embeddings to FILE.embeddings.npy beside --out FILE")


def _redis_command_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, help="TOML settings file")
    _redis_flags(parser)


def _redis_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--redis-url", dest="redis.url",
                        help="Redis of the jobs and results (default: from the config, "
                        "or IMGPIPE_REDIS_URL)")


def _cache_flags(parser: argparse.ArgumentParser) -> None:
    _cache_dir_flag(parser)
    _cache_redis_flag(parser)
    # The old spelling, from before `serve` took a cache Redis too.
    parser.add_argument("--redis-url", dest="cache.redis_url", help=argparse.SUPPRESS)


def _cache_redis_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--cache-redis-url", dest="cache.redis_url",
                        help="Redis of the shared cache tier, e.g. redis://host:6379/1")


def _settings(args: argparse.Namespace) -> Settings:
    from pipeline.config import settings_from_flags

    return settings_from_flags(vars(args))


def _score(args: argparse.Namespace, stderr: Console) -> int:
    from pipeline.sources.inputs import Inputs

    settings = _settings(args)
    with Inputs(args.inputs, args.files_from, args.null, args.recursive) as inputs:
        return _score_inputs(args, stderr, settings, inputs)


def _score_inputs(args: argparse.Namespace, stderr: Console, settings: Settings,
                  inputs: Inputs) -> int:
    from pipeline.sinks.results import inspect_result_file

    if settings.cache.enabled:
        settings.cache.hmac_key()  # an unreadable key file fails before the model loads
    # Read before the model loads, so a wrong --out fails at once.
    results = (inspect_result_file(Path(args.out), args.overwrite)
               if args.out not in (None, "-") else None)
    if settings.model.output != "logits" and (results is None or results.fmt == "stream"):
        raise ConfigError(f"--output {settings.model.output} writes the embeddings to a file "
                          f"beside the results: use --out FILE.jsonl or FILE.csv")
    done = results.done if results is not None else set()
    skip = _skipper(done, results.own_files() if results is not None else [])
    jobs = inputs.jobs(skip)
    first = next(jobs, None)
    if first is None:  # no model to load, no workers to start (nor torch to import)
        _report_nothing_to_score(stderr, args, settings, results, len(done), inputs)
        return 0
    return _score_jobs(args, stderr, settings, itertools.chain([first], jobs), results, skip,
                       inputs)


def _score_jobs(args: argparse.Namespace, stderr: Console, settings: Settings,
                jobs: Iterator[Job], results: Optional[ResultFile],
                skip: Callable[[str], bool], inputs: Inputs) -> int:
    from pipeline.engine import Engine
    from pipeline.metrics import Metrics
    from pipeline.status_server import Health, start_configured

    done = results.done if results is not None else set()
    metrics, health = Metrics(), Health()
    endpoint = None
    if args.metrics_port is not None:
        endpoint = start_configured(settings.metrics.model_copy(update={"port": args.metrics_port}),
                                    metrics, health)
    engine = Engine(settings, metrics=metrics if endpoint is not None else None)
    sink: Any = None
    try:
        with stderr.status("loading model and starting workers"):
            engine.setup(lazy=True)
        sink = _sink(args.out, results, engine)
        health.ready()
        total = inputs.count(skip) if stderr.is_terminal else None
        with _Progress(stderr, total) as advance:
            def write(records: list[Record]) -> None:
                sink.write(records)
                advance(len(records))
            summary = engine.run(jobs, write)
    finally:
        if sink is not None:
            sink.close()
        engine.close()
        if endpoint is not None:
            endpoint.stop()
    _print_summary(stderr, summary, len(done), engine, args.out)
    _hint_subdirectories(stderr, inputs.subdirectories_left_out)
    return EXIT_INTERRUPTED if summary.interrupted else 0


def _report_nothing_to_score(console: Console, args: argparse.Namespace, settings: Settings,
                             results: Optional[ResultFile], skipped: int,
                             inputs: Inputs) -> None:
    if results is not None:
        results.check(_settings_known_unloaded(settings))  # the rest needs the model
        results.open().close()  # the file exists afterwards, as after any run
    console.print(f"done: nothing to score in {inputs} ({_wall_s():.1f} s)", markup=False)
    if skipped:
        console.print(f"skipped {skipped} files already in {args.out}", markup=False)
    _hint_subdirectories(console, inputs.subdirectories_left_out)


def _sink(out: Optional[str], results: Optional[ResultFile], engine: Engine) -> ResultSink:
    """Where the records go; a results file first checks the settings that shape
    them, known only now that the model has loaded."""
    from pipeline.sinks.results import JsonlStream, TerminalTable

    if results is not None:
        return results.open(_record_settings(engine))
    if out == "-":
        return JsonlStream()
    stdout = Console(highlight=False, soft_wrap=True)
    return TerminalTable(lambda line: stdout.print(line, markup=False))


def _record_settings(engine: Engine) -> dict[str, Any]:
    """Everything besides the image that shapes a record: one results file keeps to one."""
    scope = engine.result_scope
    return {**_settings_known_unloaded(engine.settings), "model": scope.model_id,
            "weights_digest": scope.weights_digest, "labels_digest": scope.labels_digest}


def _settings_known_unloaded(settings: Settings) -> dict[str, Any]:
    """Those of the record settings known without loading the model."""
    from pipeline.spec import views_digest

    pre, model = settings.preprocess, settings.model
    # The views are part of what shaped a record: a TTA run never resumes a plain one;
    # nor does a run of another output kind (its records and rows would not match).
    known = {"model": model.name, "topk": model.topk,
             "preprocess_digest": views_digest(pre.spec().digest(), pre.tta), "tta": pre.tta,
             "output": model.output}
    if model.output != "logits":
        known["normalize_embeddings"] = model.normalize_embeddings
    return known


def _hint_subdirectories(console: Console, count: int) -> None:
    """Without --recursive: how many subdirectories of the directories scored were
    left out (counted as the walk passed them)."""
    if count:
        noun = "subdirectory" if count == 1 else "subdirectories"
        console.print(f"skipped {count} {noun}; use --recursive to score them", markup=False)


def _serve(args: argparse.Namespace, stderr: Console) -> int:
    from workers.daemon import serve

    logs.configure(logging.INFO)
    return serve(_settings(args))


def _doctor(args: argparse.Namespace, stderr: Console) -> int:
    import dataclasses
    import json

    from pipeline import doctor

    checks = doctor.run(_settings(args), serve=args.serve)
    stdout = Console(highlight=False, soft_wrap=True)
    if args.json:
        stdout.print(json.dumps([dataclasses.asdict(c) for c in checks]), markup=False)
    else:
        doctor.render(checks, stdout)
    return doctor.exit_code(checks)


def _bench(args: argparse.Namespace, stderr: Console) -> int:
    import json

    from pipeline import bench

    if not args.images.is_dir():
        raise ConfigError(f"--images {args.images} is not a directory")
    with stderr.status("measuring"):
        rows = bench.run(_settings(args), args.backends, args.batch_sizes, args.images,
                         args.seconds)
    stdout = Console(highlight=False, soft_wrap=True)
    lines = [json.dumps(bench.as_dicts(rows))] if args.json else bench.table(rows)
    for line in lines:
        stdout.print(line, markup=False)
    return 0


def _optimize(args: argparse.Namespace, stderr: Console) -> int:
    from pipeline import optimize
    from pipeline.backends.validation import DEFAULT_AGREEMENT, MIN_ACCURACY_RATIO
    from pipeline.optimize_report import table

    if args.images is None:
        raise ConfigError("optimize needs --images DIR: at least 100 real photographs like "
                          "production's (labelled, for the accuracy rule, or not)")
    if not args.images.is_dir():
        raise ConfigError(f"--images {args.images} is not a directory")
    for flag, path in (("--labels-csv", args.labels_csv), ("--wnids", args.wnids)):
        if path is not None and not path.is_file():
            raise ConfigError(f"{flag} {path} is not a file")
    if args.unlabelled and args.labels_csv is not None:
        raise ConfigError("--unlabelled and --labels-csv contradict each other")
    threshold = DEFAULT_AGREEMENT if args.threshold is None else args.threshold
    ratio = MIN_ACCURACY_RATIO if args.min_accuracy_ratio is None else args.min_accuracy_ratio
    for flag, value in (("--threshold", threshold), ("--min-accuracy-ratio", ratio)):
        if not 0 < value <= 1:
            raise ConfigError(f"{flag} must be in (0, 1]")
    plan_images = optimize.PLAN_IMAGES if args.plan_images is None else args.plan_images
    if plan_images < 0:
        raise ConfigError("--plan-images must be 0 or more")
    options = optimize.Options(args.images, args.backends, threshold, ratio, args.latency_ms,
                               args.seconds, args.labels_csv, args.wnids, args.unlabelled,
                               plan_images)
    with stderr.status("exporting, validating and measuring"):
        outcome = optimize.run(_settings(args), options)
    stdout = Console(highlight=False, soft_wrap=True)
    for line in table(outcome):
        stdout.print(line, markup=False)
    if outcome.chosen is None:
        undecided = any(not c.decided for c in outcome.candidates)
        stderr.print("imgpipe: no variant met the requirements" + (
            " (some were judged on too few images to decide)" if undecided else "")
            + "; nothing written", markup=False)
        return 1
    stdout.print(f"chosen: {outcome.chosen} (used by score and serve with model.backend = "
                 f"auto)", markup=False)
    return 0


def _skipper(done: set[str], own_files: list[Path]) -> Any:
    """Skip what the results file holds, and the results file itself."""
    own = {os.path.realpath(path) for path in own_files}

    def skip(path: str) -> bool:
        return path in done or (bool(own) and os.path.realpath(path) in own)

    return skip


class _Progress:
    """A rich progress bar on a terminal; nothing otherwise."""

    def __init__(self, console: Console, total: Optional[int]) -> None:
        self.bar: Optional[Progress] = None
        if console.is_terminal:
            self.bar = Progress(TextColumn("scoring"), BarColumn(), MofNCompleteColumn(),
                                TextColumn("{task.fields[rate]}"),
                                TimeElapsedColumn(), TextColumn("ETA"),
                                TimeRemainingColumn(), console=console, transient=True)
            self.task = self.bar.add_task("score", total=total, rate="")

    def __enter__(self) -> Any:
        if self.bar is None:
            return lambda n: None
        self.bar.start()
        return self._advance

    def _advance(self, n: int) -> None:
        assert self.bar is not None
        self.bar.advance(self.task, n)
        speed = self.bar.tasks[0].speed
        self.bar.update(self.task, rate=f"{speed:.1f} img/s" if speed else "")

    def __exit__(self, *exc: object) -> None:
        if self.bar is not None:
            self.bar.stop()


def _print_summary(console: Console, summary: Any, skipped: int, engine: Any,
                   out: Optional[str]) -> None:
    from pipeline.preprocess.select import pillow_implementation

    errors = sum(summary.errors.values())
    state = "interrupted after" if summary.interrupted else "done:"
    # The whole command, as its user waited for it: start-up (model, workers) and scoring.
    wall_s = _wall_s()
    console.print(f"{state} {summary.scored} scored, {errors} errors in {wall_s:.1f} s "
                  f"(start-up {wall_s - summary.elapsed_s:.1f} s, scoring "
                  f"{summary.elapsed_s:.1f} s), {summary.total / wall_s:.1f} images/s",
                  markup=False)
    if summary.errors:
        kinds = ", ".join(f"{code}={n}" for code, n in summary.errors.most_common())
        console.print(f"errors by kind: {kinds}", markup=False)
    if skipped:
        console.print(f"skipped {skipped} files already in {out}", markup=False)
    if summary.cache:
        levels = ", ".join(f"{level}={n}" for level, n in sorted(summary.cache.items()))
        console.print(f"cache: {levels}", markup=False)
    for tier, counts in sorted(summary.tiers.items()):
        # Lookups only: writes are queued and may land after the summary.
        console.print(f"cache tier {tier}: {counts['hits']} hits, {counts['misses']} misses, "
                      f"{counts['errors']} errors, {counts['bytes_read'] / 2**20:.1f} MiB read",
                      markup=False)
    pillow = pillow_implementation()
    why = f": {engine.variant_note}" if engine.variant_note else ""
    model = (f"model {engine.model.name} on {engine.device} ({engine.variant}{why})"
             if engine.model_loaded else
             f"model {engine.result_scope.model_id} not loaded: the cache answered every image")
    console.print(f"{model}; preprocessing {engine.preprocess_backend} ({pillow}): "
                  f"{engine.settings.preprocess.describe()}", markup=False)
    if summary.interrupted and out not in (None, "-"):
        console.print(f"re-run the same command to resume; {out} is complete up to here",
                      markup=False)


def _wall_s() -> float:
    """How long this process has run: from its start where Linux says, else from
    this module's import."""
    try:
        with open("/proc/self/stat", "rb") as stat, open("/proc/uptime", "rb") as uptime:
            # Field 22, counted after the parenthesised command name (which may hold spaces).
            started_ticks = int(stat.read().rpartition(b")")[2].split()[19])
            return float(uptime.read().split()[0]) - started_ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return time.perf_counter() - STARTED


def _cache(args: argparse.Namespace, stderr: Console) -> int:
    from pipeline.cache.lookup import open_tiers

    settings = _settings(args)
    secret = settings.cache.hmac_key()
    stdout = Console(highlight=False, soft_wrap=True)
    tiers = open_tiers(settings.cache)
    try:
        usable = [tier for tier in tiers if tier.setup()]
        if args.action == "clear" and not args.yes:
            _refuse_clearing_beside_jobs(usable, settings)
        for tier in tiers:
            outcome = _cache_action(tier, args.action, secret) if tier in usable else "unavailable"
            stdout.print(f"{tier.name}: {outcome}", markup=False)
    finally:
        for tier in tiers:
            tier.close()
    return 0


def _cache_action(tier: Any, action: str, secret: Optional[bytes]) -> str:
    """Run `cache ACTION` on one tier; what to print after its name."""
    from pipeline.cache.tiered import verify_tier

    if action == "stats":
        return f"{tier.entry_count()} entries, {tier.volume_bytes() / 2**20:.1f} MiB"
    if action == "clear":
        return f"removed {tier.clear()} entries"
    report = verify_tier(tier, secret)
    return f"checked {report.checked}, removed {report.corrupt} corrupt entries"


def _refuse_clearing_beside_jobs(tiers: list[Any], settings: Settings) -> None:
    """A Redis that carries job streams is a production queue: clearing its
    cache wants a second thought (--yes), though it never touches the streams."""
    if settings.cache.redis_url is None:
        return
    from pipeline.cache.redis_tier import RedisTier  # redis-py only when configured

    for tier in tiers:
        if isinstance(tier, RedisTier):
            streams = tier.streams_under({settings.cache.prefix, settings.redis.prefix})
            if streams:
                shown = ", ".join(streams[:3]) + (", ..." if len(streams) > 3 else "")
                raise ConfigError(f"the cache Redis at {tier.location} also carries job "
                                  f"streams ({shown}); to remove its cache entries (and "
                                  f"nothing else) run again with --yes")


if __name__ == "__main__":
    sys.exit(main())
