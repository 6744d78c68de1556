"""CacheLookup: an unchanged file is answered from its stat, a changed one is not."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from pipeline.cache.codec import (
    SIGNED_MAGIC,
    CorruptEntry,
    decode_file_digest,
    encode_file_digest,
    encode_result,
)
from pipeline.cache.keys import file_key, image_digest
from pipeline.cache.lookup import CacheLookup, ResultScope
from pipeline.config import CacheSettings
from pipeline.errors import ConfigError
from pipeline.spec import PreprocessSpec

SCOPE = ResultScope("model", "weights", 2, "labels")
PREDICTIONS = [{"label": "espresso", "index": 967, "score": 0.9},
               {"label": "cup", "index": 968, "score": 0.05}]


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


def test_a_cached_result_with_fewer_predictions_than_top_k_is_a_miss(
        lookup: CacheLookup) -> None:
    # given a result entry holding one prediction where top-2 was asked for
    digest = image_digest(b"image bytes")
    key = lookup._result_key(digest)
    lookup.cache.put(key, encode_result(PREDICTIONS[:1]))
    lookup.cache.flush()
    # when the image is looked up
    found = lookup.find_digest(digest)
    # then no predictions are served: the entry is dropped, counted, and missed
    assert found.predictions is None and found.tier == "miss"
    assert lookup.cache.stats.corrupt == 1 and lookup.cache.get(key) == (None, "miss")


@pytest.fixture
def key_file(tmp_path: Path) -> Path:
    path = tmp_path / "cache.key"
    path.write_bytes(b"a secret only the fleet knows\n")
    path.chmod(0o600)
    return path


def test_with_an_hmac_key_entries_are_signed_and_unsigned_ones_missed(
        tmp_path: Path, key_file: Path) -> None:
    # given a cache signing with a key file, and the same directory without the key
    settings = CacheSettings(dir=tmp_path / "cache", hmac_key_file=key_file)
    signing = CacheLookup(settings, PreprocessSpec().digest(), SCOPE)
    digest = image_digest(b"image bytes")
    signing.store_predictions(digest, PREDICTIONS)
    signing.cache.flush()
    # then what it wrote is signed and served to it
    (stored,) = [signing.cache.tiers[0].get(key) for key in signing.cache.tiers[0].iter_keys()]
    assert stored is not None and stored.startswith(SIGNED_MAGIC)
    assert signing.find_digest(digest).predictions == PREDICTIONS
    # and an entry written without the key is dropped by the signing reader
    unsigned = CacheLookup(CacheSettings(dir=tmp_path / "cache"), PreprocessSpec().digest(),
                           SCOPE)
    unsigned.store_predictions(digest, PREDICTIONS)
    unsigned.close()
    assert signing.find_digest(digest).predictions is None
    assert signing.cache.stats.corrupt == 1
    signing.close()


@pytest.mark.parametrize("content", [None, b"", b" \n"])
def test_an_unreadable_or_empty_hmac_key_file_is_a_one_line_config_error(
        tmp_path: Path, content: bytes | None) -> None:
    path = tmp_path / "cache.key"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(ConfigError) as raised:
        CacheSettings(hmac_key_file=path).hmac_key()
    assert "cache.hmac_key_file" in str(raised.value) and "\n" not in str(raised.value)


def test_the_key_is_the_file_without_surrounding_whitespace(key_file: Path) -> None:
    assert CacheSettings(hmac_key_file=key_file).hmac_key() == b"a secret only the fleet knows"
    assert CacheSettings().hmac_key() is None


VECTOR = np.array([0.6, 0.8, 0.0], dtype=np.float16)


def test_each_output_kind_has_its_own_answers(lookup: CacheLookup) -> None:
    # given an image whose logits answer is cached
    digest = image_digest(b"photo")
    lookup.store_predictions(digest, PREDICTIONS)
    lookup.cache.flush()

    # then neither an embedding nor a both request is answered by it
    assert lookup.find(b"photo").predictions == PREDICTIONS
    for output in ("embedding", "both"):
        found = lookup.find(b"photo", output=output)
        assert (found.predictions, found.embedding, found.tier) == (None, None, "miss")

    # and once an embedding answer is cached, it answers only embedding requests
    lookup.store_predictions(digest, [], output="embedding", embedding=VECTOR)
    lookup.cache.flush()
    found = lookup.find(b"photo", output="embedding")
    assert (found.predictions, found.embedding.tolist()) == ([], VECTOR.tolist())
    assert lookup.find(b"photo", output="both").tier == "miss"
    assert lookup.find(b"photo").embedding is None
    assert lookup.find(b"photo").predictions == PREDICTIONS


def test_embeddings_normalised_or_not_are_apart(tmp_path: Path) -> None:
    raw_scope = ResultScope("model", "weights", 2, "labels", normalize_embeddings=False)
    raw = CacheLookup(CacheSettings(dir=tmp_path / "cache"), PreprocessSpec().digest(),
                      raw_scope)
    normalised = CacheLookup(CacheSettings(dir=tmp_path / "cache"), PreprocessSpec().digest(),
                             SCOPE)
    for cache in (raw, normalised):
        cache.setup()
    try:
        normalised.store_predictions(image_digest(b"photo"), PREDICTIONS, output="both",
                                     embedding=VECTOR)
        normalised.cache.flush()
        assert normalised.find(b"photo", output="both").embedding is not None
        assert raw.find(b"photo", output="both").tier == "miss"
    finally:
        raw.close()
        normalised.close()
