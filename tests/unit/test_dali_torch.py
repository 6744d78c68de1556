"""DALI's batches handed on as torch tensors (preprocess.dali_output = "device"),
on DALI's CPU operators: copied out of DALI's buffers, the same rows as the
NumPy hand-off, and cached as the NumPy ones are."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("nvidia.dali")

from pipeline.cache.lookup import CacheLookup  # noqa: E402
from pipeline.config import CacheSettings  # noqa: E402
from pipeline.items import Job, Prepared  # noqa: E402
from pipeline.preprocess import DecoderHints  # noqa: E402
from pipeline.preprocess.dali import build_graph, feed, plan_job  # noqa: E402
from pipeline.preprocess.dali_torch import TorchOutput  # noqa: E402
from pipeline.preprocess.in_process import InProcessDali, _to_torch  # noqa: E402
from pipeline.preprocess.pool import WorkerPlan  # noqa: E402
from pipeline.sources import IterableSource  # noqa: E402
from pipeline.spec import InputLimits, PreprocessSpec  # noqa: E402
from tests.unit.test_in_process_dali import SCOPE, jpeg, photo  # noqa: E402

SPEC, LIMITS = PreprocessSpec(), InputLimits()
SAMPLES = Path(__file__).resolve().parents[2] / "samples"


@pytest.fixture
def producers(tmp_path: Path) -> Iterator[dict[str, InProcessDali]]:
    """One producer per hand-off, each with its own tensor cache, batches of 2."""
    made = {}
    for output in ("host", "device"):
        settings = CacheSettings(dir=tmp_path / f"cache-{output}", results=False)
        plan = WorkerPlan("dali", SPEC, LIMITS, "cpu", 2, settings, SCOPE)
        made[output] = InProcessDali(plan, max_batch_size=2, chunk_size=2, output=output)
        made[output].launch()
        made[output].wait_started()
    yield made
    for producer in made.values():
        producer.close()


def run(producer: InProcessDali, jobs: list[Job]) -> dict[str, Prepared]:
    return {item.job.path: item for item in producer.map_chunks(IterableSource(jobs, 2))}


def mixed_jobs(tmp_path: Path) -> list[Job]:
    """Eight photos (four DALI batches, held until the end), one with hflip, a
    CMYK JPEG (Pillow's), and noise."""
    jobs = [Job(str(jpeg(photo(seed), tmp_path / f"p{seed}.jpg"))) for seed in range(8)]
    jobs[3].tta = "hflip"
    with Image.open(SAMPLES / "coffee.jpg") as image:
        image.convert("CMYK").save(tmp_path / "cmyk.jpg")
    (tmp_path / "noise.jpg").write_bytes(np.random.default_rng(1).bytes(4096))
    return [*jobs, Job(str(tmp_path / "cmyk.jpg")), Job(str(tmp_path / "noise.jpg"))]


def test_device_rows_are_the_host_arrays(
        tmp_path: Path, producers: dict[str, InProcessDali]) -> None:
    # given photos in batches of two (every item kept until all were decoded), a
    # TTA job, a file DALI leaves to Pillow and one that is no image
    jobs = mixed_jobs(tmp_path)
    # when both hand-offs preprocess them
    host, device = (run(producers[output], jobs) for output in ("host", "device"))
    # then DALI's rows are torch tensors, Pillow's stay NumPy, each equal to the host's
    assert host.keys() == device.keys() and len(device) == len(jobs)
    for path, expected in host.items():
        got = device[path]
        if expected.error is not None:
            assert got.error is not None and got.error.code == expected.error.code, path
            continue
        assert got.pixels is not None and expected.pixels is not None
        assert isinstance(got.pixels, np.ndarray) == path.endswith("cmyk.jpg"), path
        np.testing.assert_array_equal(np.asarray(got.pixels), expected.pixels, path)
    assert device[jobs[3].path].pixels.shape == (2, 3, 224, 224)  # type: ignore[union-attr]
    assert producers["device"].decode_fallbacks >= 1


def test_a_batch_is_copied_into_memory_torch_owns(tmp_path: Path) -> None:
    # given a batch of two photos decoded by DALI, in DALI's buffer
    pipe = build_graph(SPEC, "cpu", "none", batch_size=2, num_threads=1,
                       hints=DecoderHints(roi_decode="off"))
    jobs = [plan_job(index, jpeg(photo(index), tmp_path / f"p{index}.jpg").read_bytes(),
                     SPEC, LIMITS) for index in range(2)]
    feed(pipe, [job for job in jobs if job is not None], "none")
    pixels, _ = pipe.run()
    dalis = pixels.as_tensor()
    # when it is handed on as a tensor
    copied = TorchOutput("cpu").copy(pixels)
    # then the tensor holds its pixels in memory of its own: still valid once DALI
    # reuses its buffer, as DALI's contract asks of whoever keeps its outputs
    np.testing.assert_array_equal(copied.numpy(), np.array(dalis))
    start = copied.data_ptr()
    assert not start <= dalis.data_ptr() < start + copied.nbytes


def test_device_rows_reach_the_tensor_cache_as_host_arrays(
        tmp_path: Path, producers: dict[str, InProcessDali]) -> None:
    # given photos and the TTA job preprocessed with the device hand-off
    jobs = mixed_jobs(tmp_path)[:8]
    items = run(producers["device"], jobs)
    producers["device"].close()
    # when the tensor cache is read back
    lookup = CacheLookup(CacheSettings(dir=tmp_path / "cache-device", results=False),
                         SPEC.digest(), None)
    lookup.setup()
    try:
        for job in jobs:
            found = lookup.find(Path(job.path).read_bytes(), job.tta or "none")
            # then each holds the pixels that were handed on
            assert found.pixels is not None, job.path
            np.testing.assert_array_equal(found.pixels, np.asarray(items[job.path].pixels))
    finally:
        lookup.close()


@pytest.mark.parametrize(("output", "device", "expected"), [
    ("auto", "cpu", None), ("host", "cpu", None), ("device", "cpu", "cpu")])
def test_dali_output_setting(output: str, device: str, expected: str | None) -> None:
    copy = _to_torch(output, device)
    assert (copy is None) == (expected is None)
    if copy is not None:
        assert copy.__self__.device == torch.device(expected)  # type: ignore[attr-defined]
