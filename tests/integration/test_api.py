"""`imgpipe.Scorer` end to end: the real model, workers and sample photographs,
and the README's Python examples run as they are written."""

from __future__ import annotations

import io
import itertools
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import imgpipe
from tests.integration.conftest import read_jsonl, run_imgpipe

ROOT = Path(__file__).resolve().parents[2]
SAMPLES = ROOT / "samples"
CATS = {"tabby", "tiger cat", "Egyptian cat", "Persian cat", "Siamese cat"}


def readme_examples() -> list[tuple[str, str]]:
    """The Python blocks of the README's "From Python" section, each with the
    output block that follows it."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text.split("\n## From Python\n", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"^```(\w+)\n(.*?)^```$", section, flags=re.S | re.M)
    return [(code, output) for (kind, code), (next_kind, output)
            in itertools.pairwise(blocks) if kind == "python" and next_kind == "text"]


EXAMPLES = readme_examples()


def test_the_readme_has_python_examples_with_their_output() -> None:
    assert len(EXAMPLES) >= 2


@pytest.mark.parametrize(("code", "output"), EXAMPLES,
                         ids=[f"example{n}" for n in range(1, len(EXAMPLES) + 1)])
def test_a_readme_example_runs_as_a_script_and_prints_what_the_readme_says(
        tmp_path: Path, code: str, output: str) -> None:
    script = tmp_path / "example.py"
    script.write_text(code)
    done = subprocess.run([sys.executable, str(script)], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout == output


@pytest.fixture(scope="module")
def scorer() -> Iterator[imgpipe.Scorer]:
    with imgpipe.Scorer(topk=3, workers=2) as scorer:
        yield scorer


def opened(name: str) -> Image.Image:
    return Image.open(io.BytesIO((SAMPLES / name).read_bytes()))


def test_one_record_per_item_in_input_order_whatever_the_item(
        scorer: imgpipe.Scorer) -> None:
    coffee = (SAMPLES / "coffee.jpg").read_bytes()
    items = [str(SAMPLES / "coffee.jpg"), SAMPLES / "camera.png", coffee,
             opened("chelsea.jpg"), np.asarray(opened("rocket.jpg")), 42,
             str(SAMPLES / "missing.jpg"), b"not an image", np.zeros((2, 2), np.float64),
             SAMPLES / "coffee.jpg"]
    records = scorer.score(items)
    assert [r["path"] for r in records] == [
        str(SAMPLES / "coffee.jpg"), str(SAMPLES / "camera.png"), "<bytes #2>",
        "<image #3>", "<array #4>", "<int #5>", str(SAMPLES / "missing.jpg"),
        "<bytes #7>", "<array #8>", str(SAMPLES / "coffee.jpg")]
    top1 = [r["predictions"][0]["label"] if r["status"] == "ok" else r["error"]["code"]
            for r in records]
    assert top1[:3] == ["espresso", "tripod", "espresso"] and top1[3] in CATS
    assert top1[4] == "missile" and top1[9] == "espresso"
    assert top1[5:9] == ["not_an_image", "not_found", "not_an_image", "not_an_image"]
    assert all(len(r["predictions"]) == 3 for r in records if r["status"] == "ok")
    # the same image from a path, its bytes and its pixels: the same scores
    assert records[0]["predictions"] == records[2]["predictions"] == records[9]["predictions"]


def test_records_come_back_in_input_order_though_they_finish_out_of_order(
        scorer: imgpipe.Scorer) -> None:
    # a first chunk that takes long to decode (a 16-megapixel array), then
    # chunks the cache answers at once on the other worker
    items = [np.full((4000, 4000, 3), 128, np.uint8)] + [SAMPLES / "coffee.jpg"] * 40
    paths = [r["path"] for r in scorer.score(items)]
    assert paths == ["<array #0>"] + [str(SAMPLES / "coffee.jpg")] * 40


def test_records_are_the_ones_the_command_writes(scorer: imgpipe.Scorer,
                                                 tmp_path: Path) -> None:
    out = tmp_path / "results.jsonl"
    done = run_imgpipe("score", "samples", "--topk", "3", "--out", str(out))
    assert done.returncode == 0, done.stderr
    written = {r["path"]: r for r in read_jsonl(out) if "path" in r}
    records = scorer.score(sorted(written))
    for record in records:
        expected = written[record["path"]]
        assert set(record) == set(expected)
        assert record["predictions"] == expected["predictions"]
        assert (record["status"], record["model"]) == (expected["status"], expected["model"])


class Counted:
    """An endless generator of alternating photographs that counts what it handed out."""

    def __init__(self) -> None:
        self.pulled = 0
        self.photos = [(SAMPLES / "coffee.jpg").read_bytes(), SAMPLES / "camera.png"]

    def __iter__(self) -> Iterator[object]:
        while True:
            self.pulled += 1
            yield self.photos[(self.pulled - 1) % 2]


@pytest.fixture(scope="module")
def small() -> Iterator[imgpipe.Scorer]:
    """A Scorer with a small window: one worker, chunks of 1, batches of 2."""
    with imgpipe.Scorer(topk=1, workers=1, batch_size=2, max_delay_ms=1,
                        settings={"preprocess.chunk_size": 1,
                                  "batching.queue_batches": 1}) as scorer:
        yield scorer


def test_a_generator_is_read_lazily_no_further_ahead_than_the_window(
        small: imgpipe.Scorer) -> None:
    items = Counted()
    limit = small.in_flight_limit
    assert limit == 2 * 1 * 1 + 2 * (1 + 2)
    labels = []
    for taken, record in enumerate(small.stream(items), start=1):
        assert items.pulled <= taken + limit, (items.pulled, taken)
        labels.append(record["predictions"][0]["label"])
        if taken == 4 * limit:
            break
    # in order: the photographs alternate, so do their labels
    assert labels == ["espresso", "tripod"] * (2 * limit)


@pytest.mark.timeout(60)  # a run left running would keep the next call waiting
def test_leaving_a_stream_early_stops_reading_and_the_scorer_goes_on(
        small: imgpipe.Scorer) -> None:
    items = Counted()
    for _ in zip(range(3), small.stream(items), strict=False):
        pass
    pulled = items.pulled
    time.sleep(0.5)
    assert items.pulled == pulled  # nothing more is read once the loop is left
    records = small.score([SAMPLES / "coffee.jpg"])
    assert [r["predictions"][0]["label"] for r in records] == ["espresso"]


@pytest.mark.timeout(60)
def test_one_stream_at_a_time(small: imgpipe.Scorer) -> None:
    running = small.stream(Counted())
    next(running)
    with pytest.raises(RuntimeError, match="already running"):
        small.score([SAMPLES / "coffee.jpg"])
    running.close()
    assert small.score([SAMPLES / "camera.png"])[0]["predictions"][0]["label"] == "tripod"


def test_an_error_from_the_items_comes_after_the_records_before_it(
        small: imgpipe.Scorer) -> None:
    def items() -> Iterator[Path]:
        yield SAMPLES / "coffee.jpg"
        yield SAMPLES / "camera.png"
        raise ValueError("the caller's generator broke")

    seen = []
    with pytest.raises(ValueError, match="generator broke"):
        for record in small.stream(items()):
            seen.append(record["predictions"][0]["label"])
    assert seen == ["espresso", "tripod"]
    assert small.score([SAMPLES / "coffee.jpg"])[0]["status"] == "ok"


def test_without_a_with_block_the_first_call_starts_it_and_close_stops_it() -> None:
    scorer = imgpipe.Scorer(topk=1, workers=1, cache=False)
    try:
        assert scorer.score([SAMPLES / "coffee.jpg"])[0]["predictions"][0]["label"] == \
            "espresso"
    finally:
        scorer.close()
    assert scorer.score([]) == []  # started again for the call
    scorer.close()


def test_a_model_that_cannot_load_raises_model_load_error() -> None:
    with pytest.raises(imgpipe.ModelLoadError, match="no_such_model"), \
            imgpipe.Scorer(model="no_such_model", cache=False):
        pass
