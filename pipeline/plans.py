"""The batch and thread plan: how many preprocessing workers, how many inference
threads, and the largest model batch a run uses.

Without a profile a run takes every usable core for each (idle ONNX Runtime
and torch threads sleep rather than spin, so the two share the cores) and
batches of up to 32; a study on the benchmark machine ranked the
alternatives within about 15% of that. Which plan wins depends on the model,
the variant and the images, so `imgpipe optimize` measures the candidates
below end to end with the variant it chose, on its validation photographs,
and its profile keeps the fastest. A run takes a profile's plan for the
settings left at their defaults: `preprocess.workers` and `model.threads` at
0 (auto) and `batching.max_batch_size` at 32.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from pipeline.config import Settings
from pipeline.spec import TTA_VIEWS

DEFAULT_MAX_BATCH_SIZE = 32
BATCH_SIZES = (1, 8, DEFAULT_MAX_BATCH_SIZE)


@dataclass(frozen=True)
class Plan:
    workers: int  # preprocessing processes
    threads: int  # inference threads
    max_batch_size: int
    images_per_s: float = 0.0  # measured by optimize, end to end

    def describe(self) -> str:
        return (f"batch {self.max_batch_size}, {_count(self.workers, 'preprocessing worker')}, "
                f"{_count(self.threads, 'inference thread')}")

    @classmethod
    def from_json(cls, fields: Any) -> Optional[Plan]:
        """The plan a profile recorded; None for one without (or a damaged one)."""
        try:
            plan = cls(int(fields["workers"]), int(fields["threads"]),
                       int(fields["max_batch_size"]), float(fields.get("images_per_s", 0.0)))
        except (TypeError, KeyError, ValueError):
            return None
        return plan if min(plan.workers, plan.threads, plan.max_batch_size) >= 1 else None


def candidates(cores: int) -> list[Plan]:
    """The plans optimize measures on `cores` usable cores: every core for both
    (the default), all for preprocessing with one inference thread, one core
    left to inference alone, and an even split; each at batch 1, 8 and 32."""
    splits = dict.fromkeys([(cores, cores), (cores, 1), (max(1, cores - 1), 1),
                            (max(1, cores // 2), max(1, cores - cores // 2))])
    return [Plan(workers, threads, batch) for batch in BATCH_SIZES for workers, threads in splits]


def applied(settings: Settings, plan: Plan) -> Settings:
    """`settings` with `plan` in the keys left at their defaults; a batch never
    smaller than the views test-time augmentation puts in it."""
    pre, model, batching = settings.preprocess, settings.model, settings.batching
    batch = batching.max_batch_size
    if batch == DEFAULT_MAX_BATCH_SIZE:
        batch = max(plan.max_batch_size, TTA_VIEWS[pre.tta])
    return settings.model_copy(update={
        "preprocess": pre.model_copy(update={"workers": pre.workers or plan.workers}),
        "model": model.model_copy(update={"threads": model.threads or plan.threads}),
        "batching": batching.model_copy(update={"max_batch_size": batch})})


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'s' * (n != 1)}"
