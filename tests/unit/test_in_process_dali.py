"""InProcessDali on real DALI CPU operators: reading, cache, fallback and bounds."""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path
from typing import Optional

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("nvidia.dali")

from pipeline.cache.lookup import CacheLookup, ResultScope  # noqa: E402
from pipeline.config import CacheSettings  # noqa: E402
from pipeline.items import Job, Prepared  # noqa: E402
from pipeline.preprocess import in_process  # noqa: E402
from pipeline.preprocess.dali import DaliBackend  # noqa: E402
from pipeline.preprocess.in_process import InProcessDali  # noqa: E402
from pipeline.preprocess.pillow import PillowBackend  # noqa: E402
from pipeline.preprocess.pool import WorkerPlan  # noqa: E402
from pipeline.preprocess.select import dali_in_process  # noqa: E402
from pipeline.sources import IterableSource  # noqa: E402
from pipeline.spec import InputLimits, PreprocessSpec  # noqa: E402
from tests.truncated_jpegs import imagenet_photos  # noqa: E402

SAMPLES = Path(__file__).resolve().parents[2] / "samples"
SPEC, LIMITS = PreprocessSpec(), InputLimits()
SCOPE = ResultScope("mean_colour", "w" * 16, 3, "l" * 16)


def mean_abs_diff(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.int16) - b.astype(np.int16)).mean())


def jpeg(image: Image.Image, path: Path, **options: object) -> Path:
    image.save(path, "JPEG", **options)
    return path


def photo(seed: int, size: tuple[int, int] = (320, 240)) -> Image.Image:
    small = np.random.default_rng(seed).integers(0, 256, (size[1] // 16, size[0] // 16, 3),
                                                 np.uint8)
    return Image.fromarray(small).resize(size, Image.Resampling.BICUBIC)


def producer(tmp_path: Path, max_batch_size: int = 4, cache: bool = False,
             allowed_roots: Optional[tuple[str, ...]] = None) -> InProcessDali:
    settings = CacheSettings(enabled=cache, dir=tmp_path / "cache")
    plan = WorkerPlan("dali", SPEC, LIMITS, "cpu", 2, settings, SCOPE, allowed_roots)
    made = InProcessDali(plan, max_batch_size, chunk_size=2)
    made.launch()
    made.wait_started()
    return made


def run(made: InProcessDali, jobs: list[Job]) -> dict[str, Prepared]:
    return {item.job.path: item for item in made.map_chunks(IterableSource(jobs, 2))}


@pytest.fixture
def close_after() -> Iterator[list[InProcessDali]]:
    made: list[InProcessDali] = []
    yield made
    for each in made:
        each.close()


def test_bad_files_get_their_errors_and_neighbours_are_decoded(
        tmp_path: Path, close_after: list[InProcessDali]) -> None:
    # given good photos around an empty file, noise, a JPEG cut in half, and a
    # missing file, in batches of four
    good = [jpeg(photo(seed), tmp_path / f"good{seed}.jpg") for seed in range(6)]
    whole = (SAMPLES / "coffee.jpg").read_bytes()
    (tmp_path / "empty.jpg").write_bytes(b"")
    (tmp_path / "noise.jpg").write_bytes(np.random.default_rng(1).bytes(4096))
    (tmp_path / "cut.jpg").write_bytes(whole[: len(whole) // 2])
    names = [good[0], tmp_path / "empty.jpg", good[1], tmp_path / "noise.jpg", good[2],
             tmp_path / "cut.jpg", good[3], tmp_path / "missing.jpg", good[4], good[5]]
    close_after.append(made := producer(tmp_path))
    # when they are preprocessed in this process
    items = run(made, [Job(str(path)) for path in names])
    # then each bad one has its code, and every good one DALI's pixels
    codes = {Path(path).name: getattr(item.error, "code", None) for path, item in items.items()}
    assert codes == {"good0.jpg": None, "good1.jpg": None, "good2.jpg": None,
                     "good3.jpg": None, "good4.jpg": None, "good5.jpg": None,
                     "empty.jpg": "empty_file", "noise.jpg": "not_an_image",
                     "cut.jpg": "truncated", "missing.jpg": "not_found"}
    reference = DaliBackend(SPEC, LIMITS).run([path.read_bytes() for path in good])
    for path, expected in zip(good, reference, strict=True):
        np.testing.assert_array_equal(items[str(path)].pixels, expected)
    assert made.outstanding == 0


def test_a_header_the_dali_plan_trips_on_goes_to_the_pillow_workers(
        tmp_path: Path, close_after: list[InProcessDali],
        monkeypatch: pytest.MonkeyPatch) -> None:
    # given a file whose header parse raises something unforeseen (not an InputError)
    odd, plain = (jpeg(photo(seed), tmp_path / f"{name}.jpg")
                  for seed, name in ((3, "odd"), (4, "plain")))
    real_plan = in_process.plan_job

    def tripping(index: int, data: bytes, *args: object) -> object:
        if data == odd.read_bytes():
            raise ValueError("an EXIF the parse did not foresee")
        return real_plan(index, data, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(in_process, "plan_job", tripping)
    close_after.append(made := producer(tmp_path))
    # when it is preprocessed beside a plain one, then it is decoded by Pillow,
    # and the run goes on
    items = run(made, [Job(str(odd)), Job(str(plain))])
    (expected,) = PillowBackend(SPEC, LIMITS).run([odd.read_bytes()])
    np.testing.assert_array_equal(items[str(odd)].pixels, expected)
    assert made.decode_fallbacks == 1 and items[str(plain)].pixels is not None


def test_a_file_dali_refuses_is_decoded_by_the_pillow_workers(
        tmp_path: Path, close_after: list[InProcessDali]) -> None:
    # given a CMYK JPEG (DALI does not decode it like Pillow) between two RGB ones
    cmyk = jpeg(photo(7).convert("CMYK"), tmp_path / "cmyk.jpg")
    rgb = [jpeg(photo(seed), tmp_path / f"rgb{seed}.jpg") for seed in range(2)]
    close_after.append(made := producer(tmp_path))
    # when they are preprocessed
    items = run(made, [Job(str(rgb[0])), Job(str(cmyk)), Job(str(rgb[1]))])
    # then the CMYK one has exactly the Pillow backend's pixels, and only it fell back
    (expected,) = PillowBackend(SPEC, LIMITS).run([cmyk.read_bytes()])
    np.testing.assert_array_equal(items[str(cmyk)].pixels, expected)
    assert made.decode_fallbacks == 1
    assert all(items[str(path)].pixels is not None for path in rgb)


def test_a_path_outside_the_allowed_roots_is_refused(
        tmp_path: Path, close_after: list[InProcessDali]) -> None:
    # given files inside and outside the one allowed root
    allowed = tmp_path / "allowed"
    allowed.mkdir()
    inside = jpeg(photo(1), allowed / "in.jpg")
    outside = jpeg(photo(2), tmp_path / "out.jpg")
    close_after.append(made := producer(tmp_path, allowed_roots=(str(allowed),)))
    # when both are asked for
    items = run(made, [Job(str(outside)), Job(str(inside))])
    # then the outside one is refused unread, the inside one decoded
    assert getattr(items[str(outside)].error, "code", None) == "path_not_allowed"
    assert items[str(inside)].pixels is not None


def test_the_result_cache_answers_without_decoding(
        tmp_path: Path, close_after: list[InProcessDali]) -> None:
    # given photos whose answers the result cache holds (under their bytes' digest)
    paths = [jpeg(photo(seed), tmp_path / f"p{seed}.jpg") for seed in range(3)]
    close_after.append(first := producer(tmp_path, cache=True))
    digests = [item.digest for item in run(first, [Job(str(p)) for p in paths]).values()]
    first.close()
    lookup = CacheLookup(CacheSettings(dir=tmp_path / "cache"), SPEC.digest(), SCOPE)
    lookup.setup()
    answer = [{"label": name, "index": index, "score": score}
              for index, (name, score) in enumerate([("a", 0.5), ("b", 0.3), ("c", 0.1)])]
    for digest in digests:
        assert digest is not None
        lookup.store_predictions(digest, answer)  # type: ignore[arg-type]
    lookup.close()
    # when they are asked for again (bytes copied: no stat shortcut), with DALI watched
    jobs = [Job(str(p), data=p.read_bytes()) for p in paths]
    close_after.append(again := producer(tmp_path, cache=True))
    submitted: list[object] = []
    submit = again.stream.submit
    again.stream.submit = lambda batch: (submitted.append(batch), submit(batch))  # type: ignore
    items = run(again, jobs)
    # then the cache answered every one, and nothing reached a decoder
    assert {item.cache for item in items.values()} == {"result:local"}
    assert all(item.predictions == answer and item.pixels is None for item in items.values())
    assert submitted == [] and again.decode_fallbacks == 0


def test_tta_views_come_from_the_dali_graph(tmp_path: Path,
                                             close_after: list[InProcessDali]) -> None:
    # given a photo asked for with hflip
    path = jpeg(photo(3), tmp_path / "p.jpg")
    close_after.append(made := producer(tmp_path))
    # when it is preprocessed
    (item,) = run(made, [Job(str(path), tta="hflip")]).values()
    # then it holds DaliBackend's two views
    (expected,) = DaliBackend(SPEC, LIMITS).run([path.read_bytes()], "hflip")
    assert item.pixels is not None and item.pixels.shape == (2, 3, 224, 224)
    np.testing.assert_array_equal(item.pixels, expected)


class CountingSource:
    """A ChunkSource of `total` jobs that records how far ahead of the consumer
    the producer has read."""

    def __init__(self, job: Job, total: int, chunk_size: int) -> None:
        self.job, self.left, self.chunk_size = job, total, chunk_size
        self.taken = 0

    def next_chunk(self, wait_s: float) -> Optional[list[Job]]:
        if not self.left:
            return None
        size = min(self.chunk_size, self.left)
        self.left -= size
        self.taken += size
        return [Job(self.job.path, data=self.job.data) for _ in range(size)]


def test_never_more_than_a_bounded_number_of_jobs_are_held(
        tmp_path: Path, close_after: list[InProcessDali]) -> None:
    # given a source five times larger than the producer's bound
    data = io.BytesIO()
    photo(5, (64, 48)).save(data, "JPEG")
    close_after.append(made := producer(tmp_path, max_batch_size=4))
    total = 5 * made.max_outstanding
    source = CountingSource(Job("small.jpg", data=data.getvalue()), total, 2)
    # when its items are taken one by one
    handed, most_held = 0, 0
    for item in made.map_chunks(source):
        assert item.pixels is not None
        handed += 1
        most_held = max(most_held, source.taken - handed)
    # then every job came out, and never more than the bound were held at once
    assert handed == total
    assert most_held <= made.max_outstanding


@pytest.mark.parametrize(("setting", "backend", "expected"), [
    ("auto", "dali", True), ("on", "dali", True), ("off", "dali", False),
    ("auto", "pillow", False), ("on", "pillow", False)])
def test_dali_in_process_setting(setting: str, backend: str, expected: bool) -> None:
    assert dali_in_process(setting, backend) is expected


@pytest.mark.skipif(not imagenet_photos(), reason="needs ../shared/data/imagenet-val-100")
def test_real_photographs_match_dali_backend(tmp_path: Path,
                                              close_after: list[InProcessDali]) -> None:
    # given the 100 ImageNet photographs, in model-sized batches of 32
    photos = imagenet_photos()
    close_after.append(made := producer(tmp_path, max_batch_size=32))
    # when they are preprocessed in this process
    items = run(made, [Job(str(path)) for path in photos])
    # then each is within 2/255 of the Pillow backend, as the pool's DALI is
    pillow = PillowBackend(SPEC, LIMITS)
    for path in photos:
        pixels = items[str(path)].pixels
        assert pixels is not None, path
        assert mean_abs_diff(pixels, pillow.run_one(path.read_bytes())) <= 2, path


def test_decoder_hints_reach_the_gpu_decoder_only() -> None:
    # given the preprocess settings' nvJPEG hints
    from pipeline.config import PreprocessSettings

    hints = PreprocessSettings(hw_decoder_load=0.9, device_memory_padding=1024,
                               host_memory_padding=2048).decoder_hints()
    # then the GPU ("mixed") decoder gets them, the CPU decoder none
    assert hints.for_decoder("mixed") == {"hw_decoder_load": 0.9,
                                          "device_memory_padding": 1024,
                                          "host_memory_padding": 2048}
    assert hints.for_decoder("cpu") == {}
