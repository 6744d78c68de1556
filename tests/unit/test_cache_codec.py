"""Cache keys and entry formats: round trips, and every kind of damage is caught."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest

from pipeline.cache.codec import (
    CorruptEntry,
    check_entry,
    decode_result,
    decode_tensor,
    encode_result,
    encode_tensor,
)
from pipeline.cache.keys import image_digest, parse_key, result_key, tensor_key
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
    # then it is prefix:t:<spec16>:<digest> and parses back
    assert key == f"imgpipe:t:{SPEC[:16]}:{digest}"
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
                {**base, "labels_digest": "l"}]
    others = {result_key("imgpipe", "d" * 32, **v) for v in variants}  # type: ignore[arg-type]
    # then every key differs, and all sit under prefix:r:
    assert key not in others and len(others) == len(variants)
    assert key.startswith("imgpipe:r:") and parse_key(key).kind == "r"


@pytest.mark.parametrize("key", ["", "imgpipe", "imgpipe:x:abc:def", "imgpipe:t::def", "a:b:c"])
def test_parse_key_refuses_foreign_strings(key: str) -> None:
    with pytest.raises(ValueError):
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


def test_encode_refuses_other_dtypes_as_a_caller_error() -> None:
    with pytest.raises(ValueError) as raised:
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
    with pytest.raises(CorruptEntry):
        decode_result(blob[:-1])


def test_well_formed_json_that_is_not_predictions_is_refused() -> None:
    # given an entry whose checksum is right but whose JSON is a list of numbers
    blob = encode_result([1, 2])  # type: ignore[list-item]
    with pytest.raises(CorruptEntry, match="list of objects"):
        decode_result(blob)


# --- verify -----------------------------------------------------------------

def test_check_entry_matches_blob_to_key(blob: bytes) -> None:
    digest = image_digest(b"img")
    tkey = tensor_key("imgpipe", digest, SPEC)
    rkey = result_key("imgpipe", digest, "m", "w", 5, spec_digest=SPEC, labels_digest="")
    # valid pairs pass
    check_entry(tkey, blob)
    check_entry(rkey, encode_result(PREDICTIONS))
    # a tensor under another spec's key, a result under a tensor key, a foreign key fail
    for key, value in [(tensor_key("imgpipe", digest, OTHER_SPEC), blob),
                       (tkey, encode_result(PREDICTIONS)), (rkey, blob),
                       ("not-a-key", blob)]:
        with pytest.raises(CorruptEntry):
            check_entry(key, value)
