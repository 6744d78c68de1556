"""Cache keys and entry formats: round trips, and every kind of damage is caught."""

from __future__ import annotations

import hashlib
import os
import struct
from pathlib import Path

import numpy as np
import pytest

from pipeline.cache.codec import (
    CorruptEntry,
    check_entry,
    decode_embedded,
    decode_result,
    decode_tensor,
    encode_embedded,
    encode_file_digest,
    encode_result,
    encode_tensor,
    open_entry,
    sign_entry,
)
from pipeline.cache.keys import file_key, image_digest, parse_key, result_key, tensor_key
from pipeline.models.registry import file_digest
from pipeline.spec import PreprocessSpec

SPEC = PreprocessSpec().digest()
OTHER_SPEC = PreprocessSpec(crop=200).digest()
TENSOR_HEADER_BYTES = 40 + 3 * 4  # fixed part + a 3-d shape
PREDICTIONS = [{"label": "Egyptian cat", "index": 285, "score": 0.367123},
               {"label": "café au lait ☕", "index": 967, "score": 1e-07}]


@pytest.fixture(scope="module")
def tensor() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (3, 224, 224), dtype=np.uint8)


@pytest.fixture(scope="module")
def blob(tensor: np.ndarray) -> bytes:
    return encode_tensor(tensor, SPEC)


def flipped(data: bytes, offset: int) -> bytes:
    damaged = bytearray(data)
    damaged[offset] ^= 0x01
    return bytes(damaged)


# --- keys -------------------------------------------------------------------

def test_image_digest_is_blake2b_128_hex() -> None:
    # given the bytes of a file
    data = b"\xff\xd8 not really a jpeg"
    # when it is digested / then it is BLAKE2b with a 16-byte digest
    assert image_digest(data) == hashlib.blake2b(data, digest_size=16).hexdigest()
    assert len(image_digest(data)) == 32


def test_file_digest_reads_in_chunks_to_the_same_digest(tmp_path: Path) -> None:
    # given a file larger than one read chunk
    data = bytes(range(256)) * 9000
    (tmp_path / "weights.pth").write_bytes(data)
    # when it is digested from disk / then it matches the in-memory digest
    assert file_digest(tmp_path / "weights.pth") == image_digest(data)


def test_tensor_key_is_short_and_namespaced() -> None:
    # given an image digest and the default spec
    digest = image_digest(b"x")
    # when the key is made
    key = tensor_key("imgpipe", digest, SPEC)
    # then it is prefix:cache:t:<spec16>:<digest> and parses back
    assert key == f"imgpipe:cache:t:{SPEC[:16]}:{digest}"
    parsed = parse_key(key)
    assert (parsed.prefix, parsed.kind, parsed.scope, parsed.image_digest) == (
        "imgpipe", "t", SPEC[:16], digest)


def test_result_key_changes_with_everything_that_changes_predictions() -> None:
    # given one configuration
    base = {"model_id": "resnet50", "weights_digest": "w1", "topk": 5,
            "spec_digest": SPEC, "labels_digest": ""}
    key = result_key("imgpipe", "d" * 32, **base)  # type: ignore[arg-type]
    # when any one part changes
    variants = [{**base, "model_id": "resnet18"}, {**base, "weights_digest": "w2"},
                {**base, "topk": 3}, {**base, "spec_digest": OTHER_SPEC},
                {**base, "labels_digest": "l"}, {**base, "output": "embedding:l2"},
                {**base, "output": "both:l2"}]
    others = {result_key("imgpipe", "d" * 32, **v) for v in variants}  # type: ignore[arg-type]
    # then every key differs, and all sit under prefix:cache:r:
    assert key not in others and len(others) == len(variants)
    assert key.startswith("imgpipe:cache:r:") and parse_key(key).kind == "r"


def test_a_result_key_is_the_same_in_every_build() -> None:
    # given a fixed configuration / when its result key is made / then it is the
    # key every other host and every earlier build of this format made: the Redis
    # tier is shared, and a key that drifts is a cache that silently stops hitting
    assert result_key("imgpipe", "d" * 32, "resnet50", "w1", 5, spec_digest="ab" * 16,
                      labels_digest="") == (
        "imgpipe:cache:r:426c68a020c2507f:dddddddddddddddddddddddddddddddd")


def test_a_prefix_with_colons_parses_back_whole() -> None:
    # given a key under a prefix that itself holds colons (a per-team namespace)
    key = tensor_key("team:imgpipe", "abcd", SPEC)
    # when it is parsed / then the prefix is everything before the namespace
    parsed = parse_key(key)
    assert (parsed.prefix, parsed.kind, parsed.scope, parsed.image_digest) == (
        "team:imgpipe", "t", SPEC[:16], "abcd")


@pytest.mark.parametrize(("prefix", "digest", "spec"), [
    ("", "abcd", SPEC), ("imgpipe", "", SPEC), ("imgpipe", "abcd", "")])
def test_a_key_with_an_empty_part_is_refused(prefix: str, digest: str, spec: str) -> None:
    # an empty part would make a key that parse_key refuses (and `cache verify` deletes)
    with pytest.raises(ValueError, match="must not be empty"):
        tensor_key(prefix, digest, spec)


@pytest.mark.parametrize("key", ["", "imgpipe", "imgpipe:cache:x:abc:def", "imgpipe:cache:t::def",
                                 "a:b:c", "imgpipe:t:abc:def", "imgpipe:jobs:t:abc:def"])
def test_parse_key_refuses_foreign_strings(key: str) -> None:
    # the message reaches `imgpipe cache verify`'s report through CorruptEntry
    with pytest.raises(ValueError, match="not an imgpipe cache key"):
        parse_key(key)


# --- tensors ----------------------------------------------------------------

@pytest.mark.parametrize("shape", [(3, 224, 224), (3, 7, 5), (16,), (0,), ()])
def test_tensor_round_trip(shape: tuple[int, ...]) -> None:
    # given a uint8 array of any shape
    array = np.random.default_rng(1).integers(0, 256, shape, dtype=np.uint8)
    # when it is encoded and decoded
    decoded = decode_tensor(encode_tensor(array, SPEC), SPEC)
    # then the same values come back, uint8, read-only
    assert decoded.dtype == np.uint8 and decoded.shape == shape
    np.testing.assert_array_equal(decoded, array)
    assert not decoded.flags.writeable


def test_non_contiguous_tensor_round_trips(tensor: np.ndarray) -> None:
    view = tensor[:, ::2, ::3]
    np.testing.assert_array_equal(decode_tensor(encode_tensor(view, SPEC), SPEC), view)


def test_a_tensor_of_the_most_dimensions_allowed_round_trips() -> None:
    array = np.arange(2, dtype=np.uint8).reshape((1,) * 7 + (2,))
    np.testing.assert_array_equal(decode_tensor(encode_tensor(array, SPEC), SPEC), array)


@pytest.mark.parametrize("shape", [(1,) * 9, (0, 2**32)])
def test_encode_refuses_shapes_the_header_cannot_hold(shape: tuple[int, ...]) -> None:
    # (0, 2**32) holds no bytes, so it costs no memory to try
    with pytest.raises(ValueError, match="unsupported tensor shape"):
        encode_tensor(np.zeros(shape, dtype=np.uint8), SPEC)


def test_a_tensor_entry_is_the_same_bytes_in_every_build() -> None:
    # entries are shared between hosts and builds through Redis: the bytes are the
    # format, down to the reserved byte and the checksum, not just what decodes back
    entry = encode_tensor(np.arange(6, dtype=np.uint8).reshape(2, 3), "ab" * 16)
    assert entry.hex() == ("4950540001010200" + "ab" * 16 + "0600000000000000"
                           "9e8b2eb8a7cf0057" "0200000003000000" "000102030405")


def test_a_length_that_does_not_fit_the_shape_is_corrupt_even_with_a_valid_checksum(
        ) -> None:
    # given an entry whose header claims 7 payload bytes for a (2, 3) tensor, with 7
    # bytes there and a checksum recomputed over all of it (a buggy or foreign writer)
    shape, payload = struct.pack("<2I", 2, 3), bytes(7)
    head = struct.pack("<4sBBBB16sQ", b"IPT\x00", 1, 1, 2, 0, bytes.fromhex(SPEC), 7)
    checksum = hashlib.blake2b(head + bytes(8) + shape + payload, digest_size=8).digest()
    blob = head + checksum + shape + payload
    # when it is decoded / then it is a corrupt entry, not a numpy reshape error
    with pytest.raises(CorruptEntry, match="header says 7"):
        decode_tensor(blob, SPEC)


def test_encode_refuses_other_dtypes_as_a_caller_error() -> None:
    with pytest.raises(ValueError, match="only uint8") as raised:
        encode_tensor(np.zeros((3, 2, 2), dtype=np.float32), SPEC)
    assert not isinstance(raised.value, CorruptEntry)


def test_every_header_byte_is_protected(blob: bytes) -> None:
    # given a valid entry / when any single header bit flips / then decoding refuses it
    for offset in range(TENSOR_HEADER_BYTES):
        with pytest.raises(CorruptEntry):
            decode_tensor(flipped(blob, offset), SPEC)


@pytest.mark.parametrize("where", [0, 1000, -1])
def test_flipped_payload_byte_is_detected(blob: bytes, where: int) -> None:
    offset = TENSOR_HEADER_BYTES + where if where >= 0 else len(blob) + where
    with pytest.raises(CorruptEntry, match="checksum"):
        decode_tensor(flipped(blob, offset), SPEC)


@pytest.mark.parametrize("length", [0, 1, 39, 40, 45, TENSOR_HEADER_BYTES, -1])
def test_truncated_tensor_is_detected(blob: bytes, length: int) -> None:
    with pytest.raises(CorruptEntry):
        decode_tensor(blob[:length], SPEC)


def test_extra_trailing_bytes_are_detected(blob: bytes) -> None:
    with pytest.raises(CorruptEntry):
        decode_tensor(blob + b"\x00", SPEC)


def test_tensor_from_another_spec_is_refused(blob: bytes) -> None:
    with pytest.raises(CorruptEntry, match="spec"):
        decode_tensor(blob, OTHER_SPEC)


@pytest.mark.parametrize("garbage", [b"", b"garbage", bytes(4096), b"IPT\x00" + bytes(100),
                                     encode_result(PREDICTIONS)])
def test_garbage_is_not_a_tensor(garbage: bytes) -> None:
    with pytest.raises(CorruptEntry):
        decode_tensor(garbage, SPEC)


# --- results ----------------------------------------------------------------

def test_result_round_trip_is_exact() -> None:
    assert decode_result(encode_result(PREDICTIONS)) == PREDICTIONS


def test_a_result_entry_is_the_same_bytes_in_every_build() -> None:
    # compact JSON, UTF-8 as is: the bytes are the format other builds read
    entry = encode_result([{"label": "café", "index": 0, "score": 1.0},
                           {"label": "b", "index": 1, "score": 0.0}])
    assert entry == (b"IPR\x00\x01\x00\x00\x00M\x00\x00\x00\xa1\xb1\xa0\x97/\xc8\x14j"
                     b'[{"label":"caf\xc3\xa9","index":0,"score":1.0},'
                     b'{"label":"b","index":1,"score":0.0}]')


def test_the_bounds_of_a_prediction_are_valid() -> None:
    # class 0, a score of exactly 1 and exactly 0, and two classes tied on a score
    edges = [{"label": "a", "index": 0, "score": 1.0}, {"label": "b", "index": 1, "score": 0.0},
             {"label": "c", "index": 2, "score": 0.0}]
    assert decode_result(encode_result(edges)) == edges  # type: ignore[arg-type]


def test_a_score_that_is_not_a_number_is_never_written() -> None:
    with pytest.raises(ValueError):
        encode_result([{"label": "a", "index": 0, "score": float("nan")}])


def test_every_result_byte_is_protected() -> None:
    # given a valid result entry / when any bit of any byte flips / then it is refused
    blob = encode_result(PREDICTIONS)
    for offset in range(len(blob)):
        with pytest.raises(CorruptEntry):
            decode_result(flipped(blob, offset))


@pytest.mark.parametrize("garbage", [b"", b"IPR\x00", b"{}" * 20, bytes(64)])
def test_garbage_is_not_a_result(garbage: bytes) -> None:
    with pytest.raises(CorruptEntry):
        decode_result(garbage)


def test_truncated_result_is_detected() -> None:
    blob = encode_result(PREDICTIONS)
    with pytest.raises(CorruptEntry, match="header says"):
        decode_result(blob[:-1])
    with pytest.raises(CorruptEntry, match="truncated"):
        decode_result(blob[:15])


def test_well_formed_json_that_is_not_predictions_is_refused() -> None:
    # given an entry whose checksum is right but whose JSON is a list of numbers
    blob = encode_result([1, 2])  # type: ignore[list-item]
    with pytest.raises(CorruptEntry, match="list of objects"):
        decode_result(blob)


@pytest.mark.parametrize("malformed", [
    {"label": "cup", "index": 968},                                       # a field missing
    {"label": "cup", "index": 968, "score": 0.1, "note": "x"},            # a field too many
    {"label": 968, "index": 968, "score": 0.1},                           # label not text
    {"label": "cup", "index": "968", "score": 0.1},                       # index not a number
    {"label": "cup", "index": True, "score": 0.1},                        # index a boolean
    {"label": "cup", "index": -1, "score": 0.1},                          # negative index
    {"label": "cup", "index": 968, "score": 1.5},                         # score above 1
    {"label": "cup", "index": 968, "score": "0.1"},                       # score as text
])
def test_a_result_holding_something_else_than_a_prediction_is_refused(malformed) -> None:
    # given a checksummed result whose second entry is not a prediction
    blob = encode_result([PREDICTIONS[0], malformed])
    # when it is decoded / then it is refused
    with pytest.raises(CorruptEntry, match="not a prediction"):
        decode_result(blob)


@pytest.mark.parametrize("predictions", [
    [PREDICTIONS[1], PREDICTIONS[0]],                                     # worst first
    [PREDICTIONS[0], {**PREDICTIONS[1], "index": PREDICTIONS[0]["index"]}],  # one class twice
])
def test_predictions_that_are_not_a_ranking_are_refused(predictions) -> None:
    with pytest.raises(CorruptEntry, match="best first"):
        decode_result(encode_result(predictions))


# --- signed entries ---------------------------------------------------------

SECRET = b"a secret only the fleet knows"
RESULT_KEY = result_key("imgpipe", image_digest(b"img"), "m", "w", 2, spec_digest=SPEC,
                        labels_digest="")


def test_a_signature_is_the_same_in_every_build() -> None:
    # a fleet sharing a secret may run two builds at once during an upgrade
    assert sign_entry(b"k", "imgpipe:cache:r:s:d", b"entry").hex() == (
        "4950530001000000d43cdf207e4d2c2d81175d527d6e6178"
        "b10cb90af06a677a9857982609b681c9" + b"entry".hex())


def test_a_signed_entry_opens_with_its_secret_under_its_key() -> None:
    entry = encode_result(PREDICTIONS)
    assert open_entry(SECRET, RESULT_KEY, sign_entry(SECRET, RESULT_KEY, entry)) == entry


def test_with_a_secret_an_unsigned_entry_is_refused() -> None:
    # given a result with a valid checksum, written by someone without the secret
    forged = encode_result(PREDICTIONS)
    # when it is opened with the secret / then it is refused
    with pytest.raises(CorruptEntry, match="not signed"):
        open_entry(SECRET, RESULT_KEY, forged)


def test_an_entry_signed_with_another_secret_is_refused() -> None:
    forged = sign_entry(b"a guess", RESULT_KEY, encode_result(PREDICTIONS))
    with pytest.raises(CorruptEntry, match="signature"):
        open_entry(SECRET, RESULT_KEY, forged)


def test_a_signed_entry_moved_under_another_images_key_is_refused() -> None:
    # given a genuine signed result of one image
    signed = sign_entry(SECRET, RESULT_KEY, encode_result(PREDICTIONS))
    other_image = RESULT_KEY[:-32] + image_digest(b"other")
    # when it is copied under another image's key / then it is refused there
    with pytest.raises(CorruptEntry, match="signature"):
        open_entry(SECRET, other_image, signed)


def test_every_byte_of_a_signed_entry_is_protected() -> None:
    signed = sign_entry(SECRET, RESULT_KEY, encode_result(PREDICTIONS))
    for offset in range(len(signed)):
        with pytest.raises(CorruptEntry):
            decode_result(open_entry(SECRET, RESULT_KEY, flipped(signed, offset)))
    with pytest.raises(CorruptEntry, match="truncated"):
        open_entry(SECRET, RESULT_KEY, signed[:39])


def test_without_a_secret_entries_are_read_as_before() -> None:
    # a reader without the secret trusts the cache: signed entries are unwrapped
    entry = encode_result(PREDICTIONS)
    assert open_entry(None, RESULT_KEY, entry) == entry
    assert open_entry(None, RESULT_KEY, sign_entry(SECRET, RESULT_KEY, entry)) == entry


# --- verify -----------------------------------------------------------------

def test_check_entry_matches_blob_to_key(blob: bytes, tmp_path: Path) -> None:
    digest = image_digest(b"img")
    tkey = tensor_key("imgpipe", digest, SPEC)
    rkey = result_key("imgpipe", digest, "m", "w", 5, spec_digest=SPEC, labels_digest="")
    fkey = file_key("imgpipe", str(tmp_path), os.stat(tmp_path))
    # valid pairs pass
    check_entry(tkey, blob)
    check_entry(rkey, encode_result(PREDICTIONS))
    check_entry(fkey, encode_file_digest(fkey, digest))
    # the reason reaches `cache verify`'s report
    with pytest.raises(CorruptEntry, match="not an imgpipe cache key"):
        check_entry("not-a-key", blob)
    with pytest.raises(CorruptEntry, match="does not match its key"):
        check_entry(tensor_key("imgpipe", digest, OTHER_SPEC), blob)
    # a tensor under another spec's key, a result under a tensor key, a foreign key fail
    for key, value in [(tensor_key("imgpipe", digest, OTHER_SPEC), blob),
                       (tkey, encode_result(PREDICTIONS)), (rkey, blob),
                       ("not-a-key", blob)]:
        with pytest.raises(CorruptEntry):
            check_entry(key, value)


# --- results with an embedding ------------------------------------------------
VECTOR = np.linspace(-1, 1, 1280).astype(np.float16)


def test_an_embedding_entry_round_trips_with_or_without_predictions() -> None:
    for predictions in (PREDICTIONS, []):
        got, vector = decode_embedded(encode_embedded(predictions, VECTOR))  # type: ignore[arg-type]
        assert got == predictions
        assert vector.dtype == np.dtype("<f2") and vector.tolist() == VECTOR.tolist()


def test_an_embedding_entry_is_the_same_bytes_in_every_build() -> None:
    # compact JSON, UTF-8 as is, and the vector as float16, whatever it came as
    entry = encode_embedded([{"label": "café", "index": 0, "score": 1.0}],
                            np.array([[1.0, -0.5, 0.25]], dtype=np.float32))
    assert entry == (b"IPE\x00\x01\x00\x00\x00)\x00\x00\x00\x03\x00\x00\x00"
                     b"V1\xac\xa0\xb0\x0e\xae\xdb"
                     b'[{"label":"caf\xc3\xa9","index":0,"score":1.0}]'
                     b"\x00<\x00\xb8\x004")


def test_an_embedding_of_one_value_is_one_and_of_none_is_refused() -> None:
    _, vector = decode_embedded(encode_embedded([], np.ones(1, dtype=np.float16)))
    assert vector.tolist() == [1.0]
    with pytest.raises(CorruptEntry, match="header says"):
        decode_embedded(encode_embedded([], np.ones(0, dtype=np.float16)))


def test_an_embedding_entry_never_holds_what_is_not_a_number() -> None:
    with pytest.raises(ValueError):
        encode_embedded([{"label": "a", "index": 0, "score": float("nan")}], VECTOR)
    with pytest.raises(CorruptEntry, match="not finite"):
        decode_embedded(encode_embedded([], np.array([1.0, np.inf], dtype=np.float16)))


def test_a_damaged_embedding_entry_is_corrupt_wherever_the_damage_is() -> None:
    blob = encode_embedded(PREDICTIONS, VECTOR)  # type: ignore[arg-type]
    for offset in (5, 12, 30, len(blob) - 1):
        with pytest.raises(CorruptEntry):
            decode_embedded(flipped(blob, offset))
    with pytest.raises(CorruptEntry, match="checksum mismatch"):
        decode_embedded(flipped(blob, len(blob) - 1))
    with pytest.raises(CorruptEntry, match="header says"):
        decode_embedded(blob[:-2])
    with pytest.raises(CorruptEntry, match="truncated"):
        decode_embedded(blob[:10])
    with pytest.raises(CorruptEntry):  # a logits entry is not an embedding answer
        decode_embedded(encode_result(PREDICTIONS))  # type: ignore[arg-type]
    key = result_key("imgpipe", "d" * 32, "m", "w", 5, spec_digest=SPEC, labels_digest="",
                     output="both:l2")
    check_entry(key, blob)  # cache verify reads it as a result entry
