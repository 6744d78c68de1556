"""One engine behind every front door: preprocessing pool -> batcher -> model.

Sources hand it Jobs; it hands sinks one record per job. Bounded queues join
the stages, so a full queue slows the source and memory stays flat.
"""

from __future__ import annotations

import queue
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional, Union

from pipeline import __version__, prebuilt
from pipeline.batching import END, Batcher
from pipeline.cache import scopes
from pipeline.cache.lookup import CacheLookup, ResultScope
from pipeline.config import Settings
from pipeline.cores import usable_cores
from pipeline.inference import InferenceLoop
from pipeline.items import Job, Pixels, Prepared
from pipeline.model_loading import ModelLoader, surely_cpu, with_plan
from pipeline.notify import Heartbeat
from pipeline.plans import Plan
from pipeline.predictions import Prediction, Record
from pipeline.preprocess.pool import PreprocessPool, WorkerPlan
from pipeline.preprocess.select import dali_in_process, resolve_backend
from pipeline.profiles import chosen
from pipeline.sources import ChunkSource, IterableSource
from pipeline.spec import TTA_VIEWS

if TYPE_CHECKING:
    import numpy as np
    import torch

    from pipeline.backends import InferenceBackend
    from pipeline.metrics import Metrics
    from pipeline.models import LoadedModel
    from pipeline.prebuilt import ModelCard
    from pipeline.preprocess.in_process import InProcessDali
# torch, the models and the inference backends are imported when a model loads:
# a run the result cache answers in full never needs them, nor does a run on
# the CPU default once its checked export exists (pipeline/prebuilt.py).

Sink = Callable[[list[Record]], None]
Producer = Union[PreprocessPool, "InProcessDali"]  # what turns jobs into Prepared items


@dataclass
class RunSummary:
    """What a run did: counts by outcome, timing, and whether it was cut short."""

    scored: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    cache: Counter[str] = field(default_factory=Counter)  # "result:local", "miss", ...
    tiers: dict[str, Counter[str]] = field(default_factory=dict)  # all processes' counters
    elapsed_s: float = 0.0
    interrupted: bool = False

    @property
    def total(self) -> int:
        return self.scored + sum(self.errors.values())

    @property
    def images_per_s(self) -> float:
        return self.total / self.elapsed_s if self.elapsed_s > 0 else 0.0

    def count(self, records: list[Record]) -> None:
        for record in records:
            if record["status"] == "ok":
                self.scored += 1
                if "cache" in record:
                    self.cache[record["cache"]] += 1
            else:
                self.errors[record["error"]["code"]] += 1


class Engine:
    """Loads the model and starts the pool in setup(); run() may be called repeatedly.

    `max_topk` is how many predictions are computed (and cached) per image when
    jobs may ask for more than the configured `model.topk`. `progress` ticks
    whenever a batch is delivered or nothing is waiting: a watchdog reads it.
    With `allowed_roots` (real paths), files are read only from beneath them.
    """

    def __init__(self, settings: Settings, max_topk: Optional[int] = None,
                 metrics: Optional[Metrics] = None,
                 allowed_roots: Optional[tuple[str, ...]] = None) -> None:
        self.settings = settings
        self.allowed_roots = allowed_roots
        self.topk = max(max_topk or 0, settings.model.topk)
        self.metrics = metrics
        self.progress = Heartbeat()
        self.device: Any = None  # a torch.device once the model loads ("cpu" until then)
        self.model: LoadedModel | ModelCard
        self.inference: InferenceBackend
        self.variant_note = ""  # why this variant: the summary and doctor say it
        self._fallbacks_reported = 0
        self.cores = usable_cores()
        self._setup_pending = False  # a backend built whose setup() has not run yet
        self._load_s = 0.0
        self.plan: Optional[Plan] = None  # the plan run, when optimize's profile had one
        # optimize's recorded ONNX Runtime choice, read once at setup (prebuilt.recall_choice)
        self._choice: Optional[prebuilt.Checked] = None

    def setup(self, lazy: bool = False) -> None:
        """Load the model and start the workers. With `lazy`, a model whose cache
        scope an earlier run remembered (on a host without a GPU) is loaded only
        when an image first needs it: a run the cache answers in full, or an
        empty one, never loads it, nor imports torch."""
        if self.settings.model.backend == "auto" and surely_cpu(self.settings):
            self._choice = prebuilt.recall_choice(self.settings)  # read without torch
            if self._choice is not None:
                self.settings, self.plan = with_plan(
                    self.settings, chosen(self.settings.cache.directory(), self._choice.card))
        model_cfg = self.settings.model
        # Embeddings load the model at start: whether its head gives them is known then.
        known = self._remembered_scope() if lazy and model_cfg.output == "logits" else None
        if known is None:
            # The backend's setup (to the device, warm-up) waits until the workers
            # have been launched below: both take seconds on a GPU host.
            self._load_model(at_setup=True)
            known = scopes.ModelScope(self.model.name, self.model.weights_digest,
                                      ResultScope.labels_digest_of(self.model.labels))
            if self.settings.cache.enabled:
                scopes.remember(self._scopes_directory(), scopes.identity(model_cfg), known)
            inference: Any = self.inference
        else:
            self.device = "cpu"
            inference = _LoadedOnDemand(self)
        self.preprocess_backend = resolve_backend(self.settings.preprocess.backend,
                                                  self._device_type(),
                                                  self.settings.preprocess.spec())
        self.result_scope = ResultScope(known.model_id, known.weights_digest, self.topk,
                                        known.labels_digest, model_cfg.normalize_embeddings)
        self.cache = self._open_cache()
        remember = None if self.cache is None else self._remember
        self.worker = InferenceLoop(inference, self.topk, remember, model_cfg.topk,
                                    known.model_id, model_cfg.normalize_embeddings,
                                    overlap=self._device_type() == "cuda")
        self.pool = self._start_pool()
        self._finish_model_setup()
        self.pool.wait_started()

    @property
    def model_loaded(self) -> bool:
        return hasattr(self, "inference")

    def _load_model(self, at_setup: bool = False) -> None:
        """Load the model and its backend. `at_setup` (not lazily, mid-run): a
        profile's plan may still change the settings, and a torch backend's
        setup is left to _finish_model_setup()."""
        started = time.perf_counter()
        loader = ModelLoader(self.settings, self._choice, self.plan)
        loaded = loader.load(at_setup)
        self.settings, self.plan = loader.settings, loader.plan
        self.device, self.model, self.inference = loaded.device, loaded.model, loaded.inference
        self.variant, self.variant_note = loaded.variant, loaded.note
        self._setup_pending = loaded.needs_setup
        self._load_s = time.perf_counter() - started
        if not at_setup:
            self._finish_model_setup()

    def _finish_model_setup(self) -> None:
        if not self.model_loaded:  # lazy: loaded when first needed
            return
        started = time.perf_counter()
        if self._setup_pending:
            self.inference.setup()
            self._setup_pending = False
        if self.metrics is not None:
            self.metrics.model_loaded(self._load_s + time.perf_counter() - started)
            self.metrics.set_info(__version__, self.model.name, str(self.device))

    def _remembered_scope(self) -> Optional[scopes.ModelScope]:
        """The model's cache scope from an earlier run, where loading it can wait:
        with the cache on, and surely no GPU to choose (its check needs torch)."""
        if not self.settings.cache.enabled or not surely_cpu(self.settings):
            return None
        return scopes.recall(self._scopes_directory(), scopes.identity(self.settings.model))

    def _scopes_directory(self) -> Path:
        return self.settings.cache.directory() / "scopes"

    def _device_type(self) -> str:
        return str(getattr(self.device, "type", self.device))

    def _open_cache(self) -> Optional[CacheLookup]:
        cfg = self.settings.cache
        if not cfg.enabled:
            return None
        cache = CacheLookup(cfg, self.settings.preprocess.spec().digest(), self.result_scope)
        cache.setup()
        return cache

    def _remember(self, item: Prepared, predictions: list[Prediction]) -> None:
        if self.cache is not None and item.digest is not None:
            self.cache.store_predictions(item.digest, predictions, item.tta, item.output,
                                         item.embedding)

    def _start_pool(self) -> Producer:
        """The pool of preprocessing processes, or DALI in this process
        (preprocess.dali_in_process), launched; setup() waits for it once the
        model is ready."""
        pre_cfg = self.settings.preprocess
        workers, threads = pre_cfg.workers or self.cores, 1
        in_process = dali_in_process(pre_cfg.dali_in_process, self.preprocess_backend)
        if self.preprocess_backend == "dali" and (in_process or self._device_type() == "cuda"):
            # One process owns the decoder; DALI's own threads use the cores.
            workers, threads = 1, pre_cfg.workers or self.cores
        plan = WorkerPlan(self.preprocess_backend, pre_cfg.spec(), pre_cfg.limits(),
                          str(self.device), threads, self.settings.cache, self.result_scope,
                          self.allowed_roots,
                          self.settings.serve.url_policy(pre_cfg.max_file_bytes),
                          tta=pre_cfg.tta, output=self.settings.model.output,
                          hints=pre_cfg.decoder_hints())
        pool: Producer
        if in_process:
            from pipeline.preprocess.in_process import InProcessDali  # imports DALI

            pool = InProcessDali(plan, self.settings.batching.max_batch_size,
                                 pre_cfg.chunk_size, pre_cfg.handoff, pre_cfg.dali_output)
        else:
            pool = PreprocessPool(plan, workers, pre_cfg.chunk_size, pre_cfg.handoff)
        pool.launch()
        return pool

    def run(self, jobs: Iterable[Job] | ChunkSource, sink: Sink) -> RunSummary:
        """Score every job, one record each to `sink`; Ctrl-C stops cleanly with
        what was written kept. A ChunkSource (a stream) ends when it says so."""
        batching = self.settings.batching
        # queue_batches batches' worth of views (TTA items hold several each)
        prepared: queue.Queue[object] = queue.Queue(max(
            1, batching.max_batch_size * batching.queue_batches
            // TTA_VIEWS[self.settings.preprocess.tta]))
        stop = threading.Event()
        source = jobs if isinstance(jobs, ChunkSource) else IterableSource(
            jobs, self.settings.preprocess.chunk_size)
        feeder = _Feeder(self.pool, source, prepared, stop)
        summary = RunSummary()
        started = time.perf_counter()

        def deliver(records: list[Record]) -> None:
            sink(records)
            summary.count(records)
            self.progress.tick()
            self._observe(records, prepared)

        def idle() -> None:
            if self.pool.outstanding == 0 and prepared.empty():
                self.progress.tick()  # nothing waits: no progress is due
            self._observe([], prepared)

        if self.cache is not None:
            self.cache.counters_since_last_call()  # count this run only
        feeder.start()
        try:
            self.worker.drain(Batcher(prepared, batching.max_batch_size, batching.max_delay_ms,
                                      lambda: self.pool.outstanding > 0,
                                      weight=Prepared.batch_weight), deliver, idle)
        except KeyboardInterrupt:
            summary.interrupted = True
        finally:
            stop.set()
            feeder.join()
            summary.elapsed_s = time.perf_counter() - started
            summary.tiers = self._cache_counters()
        if feeder.error is not None and not summary.interrupted:
            raise feeder.error
        return summary

    def _observe(self, records: list[Record], prepared: queue.Queue[object]) -> None:
        if self.metrics is None:
            return
        self.metrics.observe_records(records)
        batch = sum(1 for record in records if "inference" in record.get("timings_ms", {}))
        if batch:
            self.metrics.observe_batch(batch)
        self.metrics.decode_fell_back(self.pool.decode_fallbacks - self._fallbacks_reported)
        self._fallbacks_reported = self.pool.decode_fallbacks
        self.metrics.set_queue_depth("preprocess", self.pool.outstanding)
        self.metrics.set_queue_depth("batch", prepared.qsize())

    def _cache_counters(self) -> dict[str, Counter[str]]:
        """Every process's tier counters for this run, summed per tier."""
        totals = {tier: Counter(delta) for tier, delta in self.pool.cache_counters.items()}
        if self.cache is not None:
            for tier, delta in self.cache.counters_since_last_call().items():
                totals.setdefault(tier, Counter()).update(delta)
        return totals

    def close(self) -> None:
        if hasattr(self, "pool"):
            self.pool.close()
        cache: Optional[CacheLookup] = getattr(self, "cache", None)
        if cache is not None:
            cache.close()
        if self.model_loaded:
            self.inference.close()


class _LoadedOnDemand:
    """The engine's inference backend, loaded when first used (thread-safe)."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._lock = threading.Lock()

    def _backend(self) -> InferenceBackend:
        with self._lock:
            if not self.engine.model_loaded:
                self.engine._load_model()
            return self.engine.inference

    @property
    def model(self) -> LoadedModel | ModelCard:
        return self._backend().model

    @property
    def last_staging_s(self) -> float:
        return self._backend().last_staging_s

    def setup(self) -> None:
        self._backend()

    def predict(self, samples: Sequence[Pixels]) -> torch.Tensor | np.ndarray:
        return self._backend().predict(samples)

    def close(self) -> None:
        pass  # the engine closes what was loaded


class _Feeder(threading.Thread):
    """Moves preprocessed items into the bounded queue; stops when told."""

    def __init__(self, pool: Producer, source: ChunkSource,
                 out: queue.Queue[object], stop: threading.Event) -> None:
        super().__init__(name="imgpipe-feeder", daemon=True)
        self.pool, self.source, self.out, self.stop = pool, source, out, stop
        self.error: Optional[BaseException] = None

    def run(self) -> None:
        try:
            for item in self.pool.map_chunks(self.source):
                if not self._put(item):
                    return
        except BaseException as exc:  # reported by Engine.run in the main thread
            self.error = exc
        finally:
            self._put(END)

    def _put(self, item: Prepared | object) -> bool:
        while not self.stop.is_set():
            try:
                self.out.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False
