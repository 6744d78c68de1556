"""What flows between the stages: plain dataclasses, picklable, no I/O."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal, NotRequired, Optional, TypedDict, Union

import numpy as np

from pipeline.errors import InputError
from pipeline.spec import TTA_VIEWS

if TYPE_CHECKING:
    import torch

# uint8 CHW (views x C x H x W with TTA): NumPy on the host, or a torch tensor on
# the model's device (DALI's output there, pipeline/preprocess/dali_torch.py)
Pixels = Union[np.ndarray, "torch.Tensor"]


def on_host(pixels: Pixels) -> np.ndarray:
    """`pixels` as a NumPy array: a tensor is copied off its device (without one,
    no copy)."""
    return pixels if isinstance(pixels, np.ndarray) else pixels.numpy(force=True)


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
    url: Optional[str] = None  # fetched by the preprocessing worker (then `path` only names it)
    tta: Optional[str] = None  # test-time augmentation mode; None: the run's (preprocess.tta)
    output: Optional[str] = None  # "logits", "embedding" or "both"; None: the run's (model.output)


@dataclass
class Prepared:
    """A job after preprocessing: pixels (uint8 CHW) or the error that stopped it.

    `predictions` is set when the result cache already knew the answer; `cache`
    says which cache level answered ("result:local", "tensor:redis", "miss").
    `tta` is the test-time augmentation mode it was prepared under: with one
    other than "none", `pixels` stacks its views (views x C x H x W).
    `output` is what it is answered with (pipeline/embeddings.py); `embedding`
    is its float16 vector once computed or found in the cache.
    """

    job: Job
    pixels: Optional[Pixels] = None
    error: Optional[InputError] = None
    timings_ms: dict[str, float] = field(default_factory=dict)
    digest: Optional[str] = None
    cache: Optional[str] = None
    predictions: Optional[list[Prediction]] = None
    tta: str = "none"
    output: str = "logits"
    embedding: Optional[np.ndarray] = None

    @property
    def views(self) -> int:
        """How many views its prediction averages (1 without TTA)."""
        return TTA_VIEWS.get(self.tta, 1)

    def batch_weight(self) -> int:
        """What it counts against max_batch_size: the views the model scores for it
        (one for an item the model does not see: an error or a cached answer)."""
        if self.pixels is None or self.error is not None or self.predictions is not None:
            return 1
        return int(self.pixels.shape[0]) if self.pixels.ndim == 4 else 1


class Prediction(TypedDict):
    label: str
    index: int
    score: float  # softmax probability, rounded to 6 digits


class ErrorInfo(TypedDict):
    code: str  # stable: README, "Records"
    message: str


class Record(TypedDict):
    """One output per input, JSON-ready but for `embedding` (an array the sink
    turns into a row index or base64 text): what results files, result streams
    and metrics are made of (README, "Records")."""

    path: str
    status: Literal["ok", "error"]
    ref: NotRequired[str]  # the source's handle (a stream entry id)
    model: NotRequired[str]
    predictions: NotRequired[list[Prediction]]
    timings_ms: NotRequired[dict[str, float]]
    cache: NotRequired[str]  # which cache level answered, with status "ok"
    views: NotRequired[int]  # views the prediction averages, when more than one (TTA)
    # float16 vector (model.output); sinks turn it into a row index or base64 text
    embedding: NotRequired[np.ndarray]
    embedding_row: NotRequired[int]  # its row in the embeddings file (imgpipe score --out)
    error: NotRequired[ErrorInfo]
