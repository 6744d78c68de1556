"""Top-k on the inference device: only k columns per image come back to the host.

A batch's logits stay where the model left them. The softmax (float64), the
mean over each image's views and a stable descending sort run there, and
only each image's top-k class indices and probabilities (and, where asked,
its pooled embedding in float16) are copied into host memory: pinned, with
non-blocking copies and a CUDA event recorded after them, on a GPU; plain
copies and no event on the CPU. `OnHost.collect()` waits for that event, so
the inference loop can launch the next batch before it collects this one.

The numbers are those of the NumPy path (`pipeline.predictions`,
`pipeline.embeddings.pooled`): the same float64 softmax and view mean, and
ties keep the lower class index first (a stable sort of the descending
probabilities, as `top_k_of_probabilities` does; `torch.topk` promises no
order among equals). Embeddings are the float32 mean of the views' features,
L2-normalised when asked (a zero vector stays zero), as float16.

Nothing here waits for the device: per-image spans are host integers and
slices, never a tensor copied from the host, which would synchronise.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from pipeline.backends.devices import on_device
from pipeline.embeddings import DTYPE, NORM_FLOOR
from pipeline.predictions import Prediction, predictions_of


@dataclass
class OnHost:
    """One batch's results on their way to host memory; `collect()` has them."""

    indices: torch.Tensor  # (images, k) int64, host
    scores: torch.Tensor  # (images, k) float64, host
    embeddings: Optional[torch.Tensor]  # (images, dim) float16, host; None when not asked
    labels: Sequence[str]
    event: Optional[torch.cuda.Event]  # recorded after the copies; None on the CPU
    in_flight: bool = True  # the device may still be working on it: collect it later

    def collect(self) -> tuple[list[list[Prediction]], Optional[np.ndarray]]:
        """Each image's predictions, best first, and the embeddings (float16 rows)."""
        if self.event is not None:
            self.event.synchronize()
        predictions = predictions_of(self.indices.numpy(), self.scores.numpy(), self.labels)
        # A copy: the host buffer goes back to torch's allocator with this object.
        embeddings = None if self.embeddings is None else self.embeddings.numpy().astype(DTYPE)
        return predictions, embeddings


@torch.inference_mode()
def reduce_on_device(logits: torch.Tensor, features: Optional[torch.Tensor],
                     views: Sequence[int], k: int, labels: Sequence[str],
                     normalize: bool = True) -> OnHost:
    """Start copying the top `k` of each image's mean softmax over its `views[i]`
    consecutive rows of `logits` (and, with `features`, its pooled embedding)
    to the host; returns at once, before the device has finished."""
    with on_device(logits.device):
        return _reduced(logits, features, views, k, labels, normalize)


def _reduced(logits: torch.Tensor, features: Optional[torch.Tensor], views: Sequence[int],
             k: int, labels: Sequence[str], normalize: bool) -> OnHost:
    probs = _mean_over_views(torch.softmax(logits.double(), dim=1), views)
    k = min(k, probs.shape[1])
    scores, indices = torch.sort(probs, dim=1, descending=True, stable=True)
    embeddings = None if features is None else _pooled(features, views, normalize)
    on_gpu = logits.device.type == "cuda"
    result = OnHost(_to_host(indices[:, :k], on_gpu), _to_host(scores[:, :k], on_gpu),
                    None if embeddings is None else _to_host(embeddings, on_gpu), labels,
                    event=None)
    if on_gpu:
        result.event = torch.cuda.Event()
        # On this device's stream: a bare record() uses the current device's.
        result.event.record(torch.cuda.current_stream(logits.device))
    return result


def _mean_over_views(rows: torch.Tensor, views: Sequence[int]) -> torch.Tensor:
    """One row per image: the mean of its `views[i]` consecutive rows."""
    if len(set(views)) == 1:  # every image has as many views: one kernel
        count = views[0]
        return rows if count == 1 else rows.reshape(len(views), count, -1).mean(dim=1)
    starts = np.cumsum([0, *views[:-1]])
    return torch.stack([rows[start:start + count].mean(dim=0)
                        for start, count in zip(starts.tolist(), views, strict=True)])


def _pooled(features: torch.Tensor, views: Sequence[int], normalize: bool) -> torch.Tensor:
    """`pipeline.embeddings.pooled` on the device: float32 mean, L2 norm, float16."""
    means = _mean_over_views(features.float(), views)
    if normalize:
        means = means / means.norm(dim=1, keepdim=True).clamp_min(NORM_FLOOR)
    return means.half()


def _to_host(rows: torch.Tensor, on_gpu: bool) -> torch.Tensor:
    """`rows` copied into a host buffer: pinned, and not waited for, on a GPU."""
    host = torch.empty(rows.shape, dtype=rows.dtype, pin_memory=on_gpu)
    return host.copy_(rows, non_blocking=on_gpu)
