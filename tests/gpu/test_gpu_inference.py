"""The CUDA path: pinned staging ring, device-side normalisation and top-k, same answers."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.backends import TorchBackend
from pipeline.backends.reduce import reduce_on_device
from pipeline.backends.staging import StagingRing
from pipeline.config import load_settings
from pipeline.models import load_model
from pipeline.predictions import mean_over_views, softmax, top_k_of_probabilities
from pipeline.preprocess.pillow import PillowBackend
from pipeline.spec import InputLimits, PreprocessSpec

pytestmark = pytest.mark.gpu
SHAPE = (3, 224, 224)


def test_staging_ring_is_pinned_and_reused() -> None:
    # given a ring of 3 pinned slots, and a GPU stream held busy (a spin kernel
    # of about a second) so that every copy queued behind it is still pending
    # when the ring comes round to its slot again
    slots = 3
    ring = StagingRing(slots, 4, SHAPE, torch.device("cuda"))
    assert all(buffer.is_pinned() for buffer in ring.buffers)
    host = [buffer.data_ptr() for buffer in ring.buffers]
    assert len(set(host)) == slots
    torch.cuda._sleep(2_000_000_000)  # GPU cycles; nothing waits for it here
    # when 2 x slots batches of distinct values are staged
    batches = [[np.full(SHAPE, 10 * call + index, np.uint8) for index in range(2)]
               for call in range(2 * slots)]
    staged = []
    for call, batch in enumerate(batches):
        staged.append(ring.stage(batch))
        # then each went through the next slot in turn: that pinned buffer holds it
        slot = ring.buffers[call % slots]
        assert int(slot[0, 0, 0, 0]) == 10 * call and int(slot[1, 0, 0, 0]) == 10 * call + 1
    # and the ring reused its buffers, never allocating new ones ...
    assert [buffer.data_ptr() for buffer in ring.buffers] == host
    assert all(buffer.is_pinned() for buffer in ring.buffers)
    # ... and reused a slot only once the copy out of it had finished: every
    # batch arrived on the device as it was, none overwritten by a later one
    torch.cuda.synchronize()
    for call, batch in enumerate(staged):
        assert batch.is_cuda and batch.shape == (2, *SHAPE)
        assert [int(batch[index].min()) for index in range(2)] == [10 * call, 10 * call + 1]
        assert [int(batch[index].max()) for index in range(2)] == [10 * call, 10 * call + 1]


def test_cuda_logits_match_the_cpu(samples_dir: Path) -> None:
    model = load_model()
    pixels = PillowBackend(PreprocessSpec(), InputLimits()).run(
        [(samples_dir / name).read_bytes() for name in ("coffee.jpg", "rocket.jpg")])
    cpu = TorchBackend(model, torch.device("cpu"), 4, SHAPE)
    cpu.setup()
    expected = cpu.predict(pixels).clone()
    gpu = TorchBackend(load_model(), torch.device("cuda"), 4, SHAPE)
    gpu.setup()
    got = gpu.predict(pixels).cpu()
    assert torch.equal(got.argmax(1), expected.argmax(1))
    assert torch.allclose(got.softmax(1), expected.softmax(1), atol=1e-3)


@pytest.mark.parametrize("precision, dtype", [("fp16", torch.float16),
                                              ("bf16", torch.bfloat16)])
def test_reduced_precision_runs_converted_weights_with_the_cpus_answers(
        samples_dir: Path, precision: str, dtype: torch.dtype) -> None:
    # given one loaded model, fp32 on the CPU and converted to `dtype` on the GPU
    model = load_model()
    pixels = PillowBackend(PreprocessSpec(), InputLimits()).run(
        [(samples_dir / name).read_bytes() for name in ("coffee.jpg", "rocket.jpg")])
    cpu = TorchBackend(model, torch.device("cpu"), 4, SHAPE)
    cpu.setup()
    gpu = TorchBackend(model, torch.device("cuda", 0), 4, SHAPE, precision=precision)
    gpu.setup()

    # when both classify the photographs
    expected, got = cpu.predict(pixels).clone(), gpu.predict(pixels).cpu()

    # then the GPU ran weights of that dtype (the loaded model kept fp32) and gave
    # fp32 logits with the CPU's top-1
    assert {tensor.dtype for tensor in gpu.module.parameters()} == {dtype}
    assert {tensor.dtype for tensor in model.module.parameters()} == {torch.float32}
    assert got.dtype == torch.float32
    assert torch.equal(got.argmax(1), expected.argmax(1))
    assert torch.allclose(got.softmax(1), expected.softmax(1), atol=0.05)


def test_cuda_embeddings_match_the_cpu_in_a_padded_batch(samples_dir: Path) -> None:
    # three photographs: a batch padded to the warmed size 8 on the GPU
    pixels = PillowBackend(PreprocessSpec(), InputLimits()).run(
        [(samples_dir / name).read_bytes() for name in ("coffee.jpg", "rocket.jpg",
                                                         "chelsea.jpg")])
    setting = "model.output = 'embedding'"
    cpu = TorchBackend(load_model(), torch.device("cpu"), 8, SHAPE, embeddings=setting)
    cpu.setup()
    _, expected = cpu.predict_features(pixels)
    gpu = TorchBackend(load_model(), torch.device("cuda", 0), 8, SHAPE, embeddings=setting)
    gpu.setup()
    _, got = gpu.predict_features(pixels)
    assert got.shape == expected.shape == (3, 1280)
    cosines = torch.nn.functional.cosine_similarity(got.cpu(), expected.clone(), dim=1)
    assert bool((cosines > 0.999).all()), cosines


def test_engine_scores_on_the_gpu(score_samples) -> None:
    summary, by_name = score_samples(load_settings(overrides={"model.device": "cuda"}))
    assert summary.scored == 6
    assert by_name["coffee.jpg"]["predictions"][0]["label"] == "espresso"


def test_batches_run_padded_to_the_warmed_sizes_and_keep_their_own_answers(
        samples_dir: Path) -> None:
    pixels = PillowBackend(PreprocessSpec(), InputLimits()).run(
        [path.read_bytes() for path in sorted(samples_dir.glob("*.jpg"))])
    gpu = TorchBackend(load_model(), torch.device("cuda", 0), 32, SHAPE)
    gpu.setup()
    assert gpu.buckets == (1, 8, 32)
    one_by_one = torch.cat([gpu.predict([sample]) for sample in pixels]).cpu()
    together = gpu.predict(pixels).cpu()  # padded to 8
    assert together.shape == one_by_one.shape
    assert torch.equal(together.argmax(1), one_by_one.argmax(1))
    assert torch.allclose(together.softmax(1), one_by_one.softmax(1), atol=1e-3)


def test_top_k_comes_back_pinned_without_waiting_for_the_device() -> None:
    # given logits on the GPU, with a tie among the best, for images of 1, 2 and 3
    # views, and the reduction's host buffers allocated once already
    labels = [str(i) for i in range(1000)]
    logits = torch.randn(6, 1000, generator=torch.Generator().manual_seed(0))
    logits[0, [5, 3]] = 10.0
    on_device, views = logits.cuda(), [1, 2, 3]
    reduce_on_device(on_device, None, views, 5, labels).collect()
    # when they are reduced behind a busy stream (a spin kernel of about a second)
    torch.cuda._sleep(2_000_000_000)
    pending = reduce_on_device(on_device, None, views, 5, labels)
    # then it returned before the device got to it, into pinned buffers of k columns
    assert pending.event is not None and not pending.event.query()
    assert pending.indices.is_pinned() and tuple(pending.indices.shape) == (3, 5)
    assert pending.scores.is_pinned() and tuple(pending.scores.shape) == (3, 5)
    # and collecting it gives the host path's answers, the tie in class order
    predictions, _ = pending.collect()
    expected = top_k_of_probabilities(mean_over_views(softmax(logits), views), 5, labels)
    assert [[p["index"] for p in row] for row in predictions] == \
        [[p["index"] for p in row] for row in expected]
    assert [p["index"] for p in predictions[0][:2]] == [3, 5]
    for row, host in zip(predictions, expected, strict=True):
        assert [p["score"] for p in row] == pytest.approx([p["score"] for p in host], abs=1e-6)


def test_cuda_graphs_agree_with_eager_and_each_batch_keeps_its_logits(
        samples_dir: Path, tmp_path: Path) -> None:
    # given eager and CUDA-graph backends of one model on the GPU
    pixels = PillowBackend(PreprocessSpec(), InputLimits()).run(
        [path.read_bytes() for path in sorted(samples_dir.glob("*.jpg"))])
    model = load_model()
    eager = TorchBackend(model, torch.device("cuda", 0), 8, SHAPE)
    eager.setup()
    graphs = TorchBackend(model, torch.device("cuda", 0), 8, SHAPE,
                          compile_cache=tmp_path / "inductor", graphs=True)
    graphs.setup()

    # when the graphs score the photographs, then the same photographs reversed
    first = graphs.predict(pixels)
    second = graphs.predict(pixels[::-1])

    # then each matches eager, and the second replay left the first's logits alone
    expected = eager.predict(pixels).cpu()
    for got, want in ((first.cpu(), expected), (second.cpu(), expected.flip(0))):
        assert torch.equal(got.argmax(1), want.argmax(1))
        assert torch.allclose(got.softmax(1), want.softmax(1), atol=1e-3)


def test_rows_on_the_gpu_and_host_arrays_stage_together_in_order() -> None:
    # given rows already on the GPU (DALI's hand-off) made on another stream, and
    # host arrays (Pillow's), in one batch padded to eight
    device = torch.device("cuda", 0)
    ring = StagingRing(2, 8, SHAPE, device)
    producer = torch.cuda.Stream(device)
    with torch.cuda.stream(producer):
        on_gpu = [torch.full(SHAPE, value, dtype=torch.uint8, device=device)
                  for value in (1, 3)]
    producer.synchronize()
    mixed = [on_gpu[0], np.full(SHAPE, 2, np.uint8), on_gpu[1], np.full(SHAPE, 4, np.uint8)]
    # when they are staged
    staged = ring.stage(mixed, rows=8)
    # then each row is its own sample, on the GPU, and the padding is zeros
    assert staged.device == device and staged.shape == (8, *SHAPE)
    rows = staged.cpu()
    assert [int(rows[i].min()) for i in range(4)] == [1, 2, 3, 4]
    assert [int(rows[i].max()) for i in range(4)] == [1, 2, 3, 4]
    assert int(rows[4:].max()) == 0
