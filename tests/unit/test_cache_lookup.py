"""CacheLookup: an unchanged file is answered from its stat, a changed one is not."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from pipeline.cache.codec import CorruptEntry, decode_file_digest, encode_file_digest
from pipeline.cache.keys import file_key, image_digest
from pipeline.cache.lookup import CacheLookup, ResultScope
from pipeline.config import CacheSettings
from pipeline.spec import PreprocessSpec

SCOPE = ResultScope("model", "weights", 5, "labels")
PREDICTIONS = [{"label": "espresso", "index": 967, "score": 0.9}]


@pytest.fixture
def lookup(tmp_path: Path):
    cache = CacheLookup(CacheSettings(dir=tmp_path / "cache"), PreprocessSpec().digest(), SCOPE)
    cache.setup()
    yield cache
    cache.close()


def test_file_digest_entries_round_trip_and_detect_tampering(tmp_path: Path) -> None:
    key = file_key("imgpipe", str(tmp_path / "a.jpg"), os.stat(tmp_path))
    blob = encode_file_digest(key, "ab" * 16)
    assert decode_file_digest(key, blob) == "ab" * 16
    with pytest.raises(CorruptEntry):
        decode_file_digest(key, blob.replace(b"ab", b"cd", 1))
    with pytest.raises(CorruptEntry):
        decode_file_digest(key + "0", blob)  # an entry moved under another key


def test_an_unchanged_file_is_known_without_reading(lookup: CacheLookup, tmp_path: Path) -> None:
    # given a file whose predictions and stat were recorded
    photo = tmp_path / "photo.jpg"
    photo.write_bytes(b"image bytes")
    digest = image_digest(photo.read_bytes())
    lookup.store_predictions(digest, PREDICTIONS)
    lookup.remember_file(str(photo), os.stat(photo), digest)
    lookup.cache.flush()
    # when it is looked up by its stat alone
    found = lookup.find_unread(str(photo), os.stat(photo))
    # then the predictions come back
    assert found is not None and found.predictions == PREDICTIONS and found.digest == digest


def test_a_changed_file_is_not_known_by_its_stat(lookup: CacheLookup, tmp_path: Path) -> None:
    photo = tmp_path / "photo.jpg"
    photo.write_bytes(b"image bytes")
    digest = image_digest(photo.read_bytes())
    lookup.store_tensor(digest, np.zeros((3, 224, 224), np.uint8))
    lookup.remember_file(str(photo), os.stat(photo), digest)
    lookup.cache.flush()
    photo.write_bytes(b"other bytes")  # same size; ctime moves
    assert lookup.find_unread(str(photo), os.stat(photo)) is None


def test_counters_are_reported_as_deltas(lookup: CacheLookup, tmp_path: Path) -> None:
    # given two lookups that miss
    lookup.find(b"first image")
    first = lookup.counters_since_last_call()
    # when one more lookup happens
    lookup.find(b"second image")
    second = lookup.counters_since_last_call()
    # then each report holds only what happened since the previous one
    assert first["local"]["misses"] == 2  # result, then tensor
    assert second["local"]["misses"] == 2
    assert lookup.counters_since_last_call()["local"]["misses"] == 0
