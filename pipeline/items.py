"""What flows between the stages: plain dataclasses, picklable, no I/O."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, NotRequired, Optional, TypedDict

import numpy as np

from pipeline.errors import InputError


@dataclass
class Job:
    """One input to score: a file, or inline bytes (then `path` only names it).

    `error` is set when it failed before preprocessing; `topk` overrides the
    model's; `ref` is the source's handle for it (a stream entry id), copied
    into its record so the sink can find where the result goes.
    """

    path: str
    error: Optional[InputError] = None
    data: Optional[bytes] = None
    topk: Optional[int] = None
    ref: Optional[str] = None


@dataclass
class Prepared:
    """A job after preprocessing: pixels (uint8 CHW) or the error that stopped it.

    `predictions` is set when the result cache already knew the answer; `cache`
    says which cache level answered ("result:local", "tensor:redis", "miss").
    """

    job: Job
    pixels: Optional[np.ndarray] = None
    error: Optional[InputError] = None
    timings_ms: dict[str, float] = field(default_factory=dict)
    digest: Optional[str] = None
    cache: Optional[str] = None
    predictions: Optional[list[Prediction]] = None


class Prediction(TypedDict):
    label: str
    index: int
    score: float  # softmax probability, rounded to 6 digits


class ErrorInfo(TypedDict):
    code: str  # stable: README, "Records"
    message: str


class Record(TypedDict):
    """One output per input, JSON-ready: what results files, result streams and
    metrics are made of (README, "Records")."""

    path: str
    status: Literal["ok", "error"]
    ref: NotRequired[str]  # the source's handle (a stream entry id)
    model: NotRequired[str]
    predictions: NotRequired[list[Prediction]]
    timings_ms: NotRequired[dict[str, float]]
    cache: NotRequired[str]  # which cache level answered, with status "ok"
    error: NotRequired[ErrorInfo]
