"""Scoring from Python, in process: the engine of `imgpipe score` behind a call.

    with Scorer(topk=3) as scorer:
        records = scorer.score(["samples/coffee.jpg", image_bytes, pil_image, array])

The engine runs in a thread of its own while the caller's thread hands it
items and takes records back, put in input order. A window bounds how many
items are between the two at once, so a generator of any length is read
only as fast as its records are taken.
"""

from __future__ import annotations

import os
import queue
import sys
import threading
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional, Union

from pipeline.config import Settings, load_settings
from pipeline.errors import ConfigError, ImgpipeError
from pipeline.items import Job, Record
from pipeline.sources import QueueSource
from pipeline.sources.in_memory import to_job

if TYPE_CHECKING:
    import numpy as np
    from PIL import Image

    from pipeline.engine import Engine

Item = Union[str, "os.PathLike[str]", bytes, bytearray, memoryview, "Image.Image",
             "np.ndarray"]
WAIT_S = 0.1  # how often a waiting thread looks whether the run was stopped
_NO_MORE: Any = object()

# Scorer's keywords: the `imgpipe score` flag of the same name (`_` for `-`).
KEYWORDS = {
    "model": "model.name", "weights": "model.weights", "labels": "model.labels",
    "topk": "model.topk", "device": "model.device", "model_backend": "model.backend",
    "precision": "model.precision", "batch_size": "batching.max_batch_size",
    "max_delay_ms": "batching.max_delay_ms", "workers": "preprocess.workers",
    "backend": "preprocess.backend", "cache": "cache.enabled", "cache_dir": "cache.dir",
    "cache_redis_url": "cache.redis_url",
}


class Scorer:
    """Score images in this process with the engine of `imgpipe score`.

    Settings come in the command's layers: the defaults, a TOML file
    (`config`), `IMGPIPE_*` environment variables, then `settings` (dotted
    keys from configs/default.toml, e.g. ``{"batching.queue_batches": 2}``)
    and the keywords, each named after a flag of `imgpipe score` (`topk` for
    --topk, `cache=False` for --no-cache, `workers` for --workers, ...).
    Invalid settings raise ConfigError here, before anything starts.

    The model loads and the preprocessing workers start on entering the
    `with` block (or on first use; close() stops them). As for the command,
    a model whose results the cache already holds loads only when an image
    needs it. The workers are separate processes started with `spawn`: a
    script must create the Scorer under ``if __name__ == "__main__":``.

    One score() or stream() runs at a time per Scorer.
    """

    def __init__(self, model: Optional[str] = None, *, weights: Optional[str | Path] = None,
                 labels: Optional[str | Path] = None, topk: Optional[int] = None,
                 device: Optional[str] = None, model_backend: Optional[str] = None,
                 precision: Optional[str] = None, batch_size: Optional[int] = None,
                 max_delay_ms: Optional[float] = None, workers: Optional[int] = None,
                 backend: Optional[str] = None, cache: Optional[bool] = None,
                 cache_dir: Optional[str | Path] = None,
                 cache_redis_url: Optional[str] = None,
                 config: Optional[str | Path] = None,
                 settings: Optional[Mapping[str, Any]] = None) -> None:
        given = {"model": model, "weights": weights, "labels": labels, "topk": topk,
                 "device": device, "model_backend": model_backend, "precision": precision,
                 "batch_size": batch_size, "max_delay_ms": max_delay_ms, "workers": workers,
                 "backend": backend, "cache": cache, "cache_dir": cache_dir,
                 "cache_redis_url": cache_redis_url}
        overrides = dict(settings or {})
        for keyword, value in given.items():
            if value is None:
                continue
            key = KEYWORDS[keyword]
            if overrides.get(key) is not None and overrides[key] != value:
                raise ConfigError(f"{key} is given twice: {keyword}={value!r} and "
                                  f"settings[{key!r}]={overrides[key]!r}")
            overrides[key] = value
        self.settings: Settings = load_settings(None if config is None else Path(config),
                                                overrides=overrides)
        self._engine: Optional[Engine] = None
        self._run: Optional[_Run] = None

    @property
    def in_flight_limit(self) -> int:
        """The most items read from an iterable and not yet handed back as records:
        enough to keep every stage busy (two chunks per worker, the batch queue,
        a batch being scored and one more)."""
        pre, batching = self.settings.preprocess, self.settings.batching
        workers = pre.workers or os.cpu_count() or 1
        return 2 * workers * pre.chunk_size + batching.max_batch_size * (
            batching.queue_batches + 2)

    def start(self) -> Scorer:
        """Load the model (or prepare to, when first needed) and start the workers;
        score() and stream() call it when it was not called."""
        if self._engine is None:
            # As the command does, before torch loads OpenMP: idle inference threads
            # sleep instead of spinning on the cores the workers need.
            if "torch" not in sys.modules:
                os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
            from pipeline.engine import Engine

            engine = Engine(self.settings)
            try:
                engine.setup(lazy=True)
            except BaseException:
                engine.close()
                raise
            self._engine = engine
        return self

    def close(self) -> None:
        """Stop a stream still running, the workers, and release the model."""
        if self._run is not None:
            self._run.stop()
            self._run.join()
            self._run = None
        if self._engine is not None:
            self._engine.close()
            self._engine = None

    def __enter__(self) -> Scorer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def score(self, items: Iterable[Item]) -> list[Record]:
        """One record per item, in the order given (see stream())."""
        return list(self.stream(items))

    def stream(self, items: Iterable[Item]) -> Iterator[Record]:
        """Yield one record per item, in the order given, as the engine makes them.

        Items are paths (str or os.PathLike, read by the workers, as `imgpipe
        score` reads files), bytes of an image file, PIL images, or uint8
        arrays shaped HxW, HxWx1, HxWx3 (RGB) or HxWx4 (RGBA). A PIL image or
        an array is copied once into an uncompressed image file in memory
        (PNM; TIFF for alpha and 16 bits; a few ms per megapixel) that the
        workers decode like any file, so it is preprocessed exactly as a
        lossless file of the same pixels would be.

        Records are the dicts `imgpipe score --out -` writes. A bad item
        (unreadable, not an image, an unsupported type) is an error record
        with a stable `code`, never an exception; `path` is the item's path,
        or `<bytes #N>`, `<image #N>`, `<array #N>` for item N without one.

        `items` is read lazily, in a thread of the engine's, at most
        `in_flight_limit` items ahead of the records taken, so an endless
        generator is fine. Leaving the loop early stops the run (what is in
        flight is finished and dropped). An exception raised by `items`
        comes out here after the records of the items before it.
        """
        if self._run is not None and self._run.busy:
            raise RuntimeError("this Scorer is already running a score() or stream(); "
                               "run one at a time (or use another Scorer)")
        engine = self.start()._engine
        assert engine is not None
        if self._run is not None:
            self._run.join()  # a stream left early: its engine thread may still finish up
        self._run = run = _Run(engine, iter(items), self.in_flight_limit)
        return self._records(run)

    def _records(self, run: _Run) -> Iterator[Record]:
        run.start()
        try:
            yield from run.records()
        finally:
            run.stop()
            run.join()


class _Run:
    """One stream: a reader thread turns items into jobs, the engine thread scores
    them, and the caller's thread puts the records back in order."""

    def __init__(self, engine: Engine, items: Iterator[Item], window: int) -> None:
        self.engine = engine
        self.items = items
        self.window = window
        self.limits = engine.settings.preprocess.limits()
        self.stopped = threading.Event()
        self.taken = 0  # items read from `items`
        self.handed_back = 0  # records yielded to the caller
        self.turn = threading.Condition()
        self.source = QueueSource(engine.settings.preprocess.chunk_size)  # the reader's jobs
        self.done: queue.Queue[list[Record] | _End] = queue.Queue()
        self.items_error: Optional[BaseException] = None
        self.reader = threading.Thread(target=self._read, name="imgpipe-scorer-reader",
                                       daemon=True)
        self.scorer = threading.Thread(target=self._score, name="imgpipe-scorer-engine",
                                       daemon=True)

    @property
    def busy(self) -> bool:
        """Started and neither finished nor stopped."""
        return self.scorer.ident is not None and not self.stopped.is_set()

    def start(self) -> None:
        self.reader.start()
        self.scorer.start()

    def stop(self) -> None:
        self.stopped.set()
        with self.turn:
            self.turn.notify_all()

    def join(self) -> None:
        """Wait for the engine thread (the engine is then free). The reader is not
        waited for: it may be blocked in the caller's iterable, and the engine
        no longer reads from it once stopped."""
        if self.scorer.ident is not None:
            self.scorer.join()

    # -- the reader thread: items -> jobs, never more than `window` ahead --------

    def _read(self) -> None:
        try:
            while self._wait_for_room():  # before the next item is even asked for
                item = next(self.items, _NO_MORE)
                if item is _NO_MORE:
                    break
                job = to_job(item, self.taken, self.limits)
                job.ref = str(self.taken)  # which item a record is for: they come in any order
                self.taken += 1
                self.source.jobs.put(job)
        except BaseException as exc:  # the caller's iterable failed: raised to the caller
            self.items_error = exc
        finally:
            self.source.jobs.put(None)

    def _wait_for_room(self) -> bool:
        with self.turn:
            while self.taken - self.handed_back >= self.window and not self.stopped.is_set():
                self.turn.wait(WAIT_S)
        return not self.stopped.is_set()

    # -- the engine thread ---------------------------------------------------------

    def _score(self) -> None:
        end = _End()
        try:
            self.engine.run(self, self.done.put)
        except BaseException as exc:  # raised to the caller, after the records before it
            end.error = exc
        finally:
            self.done.put(end)

    def next_chunk(self, wait_s: float) -> Optional[list[Job]]:
        """The engine's ChunkSource: up to a chunk of the jobs read so far; [] when
        none came within `wait_s`, None at the end (or once stopped)."""
        return None if self.stopped.is_set() else self.source.next_chunk(wait_s)

    # -- the caller's thread -------------------------------------------------------

    def records(self) -> Iterator[Record]:
        """The records in item order, as they arrive."""
        waiting: dict[int, Record] = {}
        while not isinstance(got := self.done.get(), _End):
            for record in got:
                waiting[int(record.pop("ref"))] = record
            while self.handed_back in waiting:
                yield waiting.pop(self.handed_back)
                with self.turn:
                    self.handed_back += 1
                    self.turn.notify_all()
        error = got.error or self.items_error
        if error is not None:
            raise error
        if waiting or self.handed_back != self.taken:
            raise ImgpipeError(f"the engine returned {self.handed_back + len(waiting)} "
                               f"records in order for {self.taken} items")


class _End:
    """The end of the items or of the run, and the exception that ended it, if any."""

    def __init__(self) -> None:
        self.error: Optional[BaseException] = None
