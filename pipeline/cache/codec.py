"""Byte formats of cache entries: a fixed header, a checksum, no pickle.

A cache entry may come from another process, another host or a disk that
went bad, so every field is checked on the way in and anything unexpected
raises `CorruptEntry`; the caller deletes the entry and treats it as a miss.

Tensor entry (little-endian)::

    magic "IPT\\0" | version u8 | dtype u8 | ndim u8 | reserved u8
    | spec digest 16 bytes | payload length u64 | checksum 8 bytes
    | shape: ndim x u32 | payload (C-order array bytes)

Result entry::

    magic "IPR\\0" | version u8 | reserved 3 bytes | payload length u32
    | checksum 8 bytes | payload (compact UTF-8 JSON list of objects)

The checksum is BLAKE2b-64 over the header (checksum zeroed) and the payload,
so a flipped bit in the shape or the digest is caught as well as one in the
pixels. A checksum only catches accidents: anyone who can write the cache
can also write a valid one.

Result entry with an embedding (model.output "embedding" or "both")::

    magic "IPE\0" | version u8 | reserved 3 bytes | predictions length u32
    | dimensions u32 | checksum 8 bytes | predictions (JSON, as above; [] for
    "embedding") | embedding (dimensions x little-endian float16)

Signed entry (with `cache.hmac_key_file`), around any entry above::

    magic "IPS\0" | version u8 | reserved 3 bytes | HMAC-SHA256 32 bytes | entry

The HMAC covers the header's first 8 bytes, the cache key, a NUL byte and the
entry, so an entry forged without the secret is refused, and so is a signed
one copied under another key (another image's predictions). A reader with the
secret refuses unsigned entries; a reader without one reads signed entries
unchecked, like any other.
"""

from __future__ import annotations

import hashlib
import hmac
import itertools
import json
import math
import struct
from typing import Any, Optional, cast

import numpy as np

from pipeline.cache.keys import FILE_KIND, RESULT_KIND, TENSOR_KIND, parse_key
from pipeline.items import Prediction

FORMAT_VERSION = 1
TENSOR_MAGIC = b"IPT\x00"
RESULT_MAGIC = b"IPR\x00"
EMBEDDED_MAGIC = b"IPE\x00"
SIGNED_MAGIC = b"IPS\x00"
MAX_NDIM = 8
SIGNATURE_BYTES = 32  # HMAC-SHA256

_TENSOR_HEAD = struct.Struct("<4sBBBB16sQ8s")
_RESULT_HEAD = struct.Struct("<4sB3xI8s")
_EMBEDDED_HEAD = struct.Struct("<4sB3xII8s")
_EMBEDDING_DTYPE = np.dtype("<f2")
_SIGNED_HEAD = struct.Struct("<4sB3x")  # then the signature
_PREDICTION_FIELDS = {"label", "index", "score"}
_NO_CHECKSUM = bytes(8)
# One-byte dtype codes; only uint8 is cached today (tensors are uint8 CHW).
_DTYPE_CODES = {np.dtype(np.uint8): 1}
_DTYPES = {code: dtype for dtype, code in _DTYPE_CODES.items()}


class CorruptEntry(ValueError):
    """A cache entry failed validation; it never leaves the cache package."""


def encode_tensor(array: np.ndarray, spec_digest: str) -> bytes:
    """Serialise a uint8 array made under the spec whose digest is `spec_digest`."""
    code = _DTYPE_CODES.get(array.dtype)
    if code is None:
        raise ValueError(f"only uint8 tensors are cached, got {array.dtype}")
    if array.ndim > MAX_NDIM or any(dim >= 2**32 for dim in array.shape):
        raise ValueError(f"unsupported tensor shape {array.shape}")
    payload = np.ascontiguousarray(array).tobytes()
    shape = struct.pack(f"<{array.ndim}I", *array.shape)
    head = _TENSOR_HEAD.pack(TENSOR_MAGIC, FORMAT_VERSION, code, array.ndim, 0,
                             _digest_bytes(spec_digest), len(payload), _NO_CHECKSUM)
    checksum = _checksum(head, shape, payload)
    return head[:-8] + checksum + shape + payload


def decode_tensor(blob: bytes, spec_digest: str) -> np.ndarray:
    """The array in `blob`, a read-only view; CorruptEntry on any mismatch."""
    array, stored_digest = _parse_tensor(blob)
    if stored_digest != _digest_bytes(spec_digest):
        raise CorruptEntry("tensor was made under a different preprocessing spec")
    return array


def encode_result(predictions: list[Prediction]) -> bytes:
    """Serialise one image's predictions (JSON-ready dicts) with a checksum."""
    payload = json.dumps(predictions, separators=(",", ":"), ensure_ascii=False,
                         allow_nan=False).encode()
    head = _RESULT_HEAD.pack(RESULT_MAGIC, FORMAT_VERSION, len(payload), _NO_CHECKSUM)
    return head[:-8] + _checksum(head, b"", payload) + payload


def decode_result(blob: bytes) -> list[Prediction]:
    """The predictions in `blob`; CorruptEntry on any mismatch."""
    if len(blob) < _RESULT_HEAD.size:
        raise CorruptEntry("result entry is truncated")
    magic, version, length, checksum = _RESULT_HEAD.unpack_from(blob)
    _check_magic_version(magic, RESULT_MAGIC, version)
    payload = blob[_RESULT_HEAD.size:]
    if len(payload) != length:
        raise CorruptEntry(f"result payload is {len(payload)} bytes, header says {length}")
    head = blob[:_RESULT_HEAD.size - 8] + _NO_CHECKSUM
    if _checksum(head, b"", payload) != checksum:
        raise CorruptEntry("result checksum mismatch")
    return _parse_predictions(payload)


def encode_embedded(predictions: list[Prediction], embedding: np.ndarray) -> bytes:
    """Serialise one image's predictions (possibly none) and its embedding."""
    payload = json.dumps(predictions, separators=(",", ":"), ensure_ascii=False,
                         allow_nan=False).encode()
    vector = np.ascontiguousarray(embedding, dtype=_EMBEDDING_DTYPE).reshape(-1).tobytes()
    dim = len(vector) // _EMBEDDING_DTYPE.itemsize
    head = _EMBEDDED_HEAD.pack(EMBEDDED_MAGIC, FORMAT_VERSION, len(payload), dim,
                               _NO_CHECKSUM)
    return head[:-8] + _checksum(head, payload, vector) + payload + vector


def decode_embedded(blob: bytes) -> tuple[list[Prediction], np.ndarray]:
    """The predictions and the float16 embedding in `blob`; CorruptEntry on any mismatch."""
    if len(blob) < _EMBEDDED_HEAD.size:
        raise CorruptEntry("embedding entry is truncated")
    magic, version, length, dim, checksum = _EMBEDDED_HEAD.unpack_from(blob)
    _check_magic_version(magic, EMBEDDED_MAGIC, version)
    start = _EMBEDDED_HEAD.size
    payload, vector = blob[start:start + length], blob[start + length:]
    if dim == 0 or len(payload) != length or len(vector) != dim * _EMBEDDING_DTYPE.itemsize:
        raise CorruptEntry(f"embedding entry is {len(blob)} bytes, header says "
                           f"{length} + {dim} values")
    head = blob[:_EMBEDDED_HEAD.size - 8] + _NO_CHECKSUM
    if _checksum(head, payload, vector) != checksum:
        raise CorruptEntry("embedding entry checksum mismatch")
    embedding = np.frombuffer(vector, dtype=_EMBEDDING_DTYPE)
    if not np.isfinite(embedding).all():
        raise CorruptEntry("embedding holds values that are not finite")
    return _parse_predictions(payload), embedding


def sign_entry(secret: bytes, key: str, entry: bytes) -> bytes:
    """`entry` behind a header carrying its HMAC, bound to `key`."""
    head = _SIGNED_HEAD.pack(SIGNED_MAGIC, FORMAT_VERSION)
    return head + _signature(secret, head, key, entry) + entry


def open_entry(secret: Optional[bytes], key: str, blob: bytes) -> bytes:
    """The entry inside a stored `blob`, its signature checked when there is a secret.

    With a `secret`, an unsigned entry or a wrong signature is CorruptEntry;
    without one, a signed entry is unwrapped unchecked and any other passes as is.
    """
    signed = blob.startswith(SIGNED_MAGIC)
    if secret is None and not signed:
        return blob
    if not signed:
        raise CorruptEntry("entry is not signed")
    start = _SIGNED_HEAD.size + SIGNATURE_BYTES
    if len(blob) < start:
        raise CorruptEntry("signed entry is truncated")
    magic, version = _SIGNED_HEAD.unpack_from(blob)
    _check_magic_version(magic, SIGNED_MAGIC, version)
    head, signature, entry = blob[:_SIGNED_HEAD.size], blob[_SIGNED_HEAD.size:start], blob[start:]
    if secret is not None and not hmac.compare_digest(
            signature, _signature(secret, head, key, entry)):
        raise CorruptEntry("entry signature does not match")
    return entry


def _signature(secret: bytes, head: bytes, key: str, entry: bytes) -> bytes:
    """HMAC-SHA256 over the signed header (reserved bytes too), the key, NUL, the entry."""
    mac = hmac.new(secret, head, hashlib.sha256)
    mac.update(key.encode())
    mac.update(b"\x00")  # cache keys never hold NUL: key and entry cannot run together
    mac.update(entry)
    return mac.digest()


def encode_file_digest(key: str, image_digest: str) -> bytes:
    """A file entry: the image digest, bound to its key by a checksum."""
    return f"{image_digest}:{_file_check(key, image_digest)}".encode()


def decode_file_digest(key: str, blob: bytes) -> str:
    """The image digest stored under a file key; CorruptEntry if it was altered."""
    try:
        image_digest, check = blob.decode("ascii").split(":")
    except (UnicodeDecodeError, ValueError) as exc:
        raise CorruptEntry("file entry is not a digest") from exc
    if check != _file_check(key, image_digest):
        raise CorruptEntry("file entry checksum mismatch")
    return image_digest


def _file_check(key: str, image_digest: str) -> str:
    return hashlib.blake2b(f"{key}={image_digest}".encode(), digest_size=8).hexdigest()


def check_entry(key: str, blob: bytes) -> None:
    """Validate a stored entry against its key (for `cache verify`).

    Raises CorruptEntry when the key is not a cache key, the blob does not
    decode, or a tensor's spec digest does not match the key's.
    """
    try:
        parsed = parse_key(key)
    except ValueError as exc:
        raise CorruptEntry(str(exc)) from exc
    if parsed.kind == FILE_KIND:
        decode_file_digest(key, blob)
    elif parsed.kind == RESULT_KIND and blob.startswith(EMBEDDED_MAGIC):
        decode_embedded(blob)
    elif parsed.kind == RESULT_KIND:
        decode_result(blob)
    elif parsed.kind == TENSOR_KIND:
        _, stored_digest = _parse_tensor(blob)
        if not stored_digest.hex().startswith(parsed.scope):
            raise CorruptEntry("tensor spec digest does not match its key")


def _parse_tensor(blob: bytes) -> tuple[np.ndarray, bytes]:
    if len(blob) < _TENSOR_HEAD.size:
        raise CorruptEntry("tensor entry is truncated")
    magic, version, code, ndim, _, digest, length, checksum = _TENSOR_HEAD.unpack_from(blob)
    _check_magic_version(magic, TENSOR_MAGIC, version)
    dtype = _DTYPES.get(code)
    if dtype is None or ndim > MAX_NDIM:
        raise CorruptEntry(f"unknown dtype code {code} or ndim {ndim}")
    start = _TENSOR_HEAD.size + 4 * ndim
    if len(blob) < start:
        raise CorruptEntry("tensor header is truncated")
    shape = struct.unpack_from(f"<{ndim}I", blob, _TENSOR_HEAD.size)
    payload = memoryview(blob)[start:]
    if len(payload) != length or length != math.prod(shape) * dtype.itemsize:
        raise CorruptEntry(f"tensor payload is {len(payload)} bytes, header says "
                           f"{length} for shape {shape}")
    head = blob[:_TENSOR_HEAD.size - 8] + _NO_CHECKSUM
    if _checksum(head, blob[_TENSOR_HEAD.size:start], payload) != checksum:
        raise CorruptEntry("tensor checksum mismatch")
    array = np.frombuffer(blob, dtype=dtype, offset=start).reshape(shape)
    return array, digest


def _parse_predictions(payload: bytes) -> list[Prediction]:
    try:
        predictions = json.loads(payload)
    except (UnicodeDecodeError, ValueError) as exc:
        raise CorruptEntry(f"result payload is not JSON: {exc}") from exc
    if not isinstance(predictions, list) or not all(isinstance(p, dict) for p in predictions):
        raise CorruptEntry("result payload is not a list of objects")
    if not all(_is_prediction(p) for p in predictions):
        raise CorruptEntry("result payload holds an object that is not a prediction")
    if not _is_ranking(predictions):
        raise CorruptEntry("predictions are not distinct classes, best first")
    return cast(list[Prediction], predictions)  # each one checked above


def _is_prediction(prediction: dict[str, Any]) -> bool:
    """{"label": str, "index": int >= 0, "score": 0..1}, and nothing else."""
    index, score = prediction.get("index"), prediction.get("score")
    return (prediction.keys() == _PREDICTION_FIELDS and isinstance(prediction["label"], str)
            and isinstance(index, int) and not isinstance(index, bool) and index >= 0
            and isinstance(score, (int, float)) and not isinstance(score, bool)
            and 0 <= score <= 1)


def _is_ranking(predictions: list[dict[str, Any]]) -> bool:
    scores = [p["score"] for p in predictions]
    distinct = len({p["index"] for p in predictions}) == len(predictions)
    return distinct and all(a >= b for a, b in itertools.pairwise(scores))


def _check_magic_version(magic: bytes, expected: bytes, version: int) -> None:
    if magic != expected:
        raise CorruptEntry(f"bad magic {magic!r}, expected {expected!r}")
    if version != FORMAT_VERSION:
        raise CorruptEntry(f"format version {version}, this build reads {FORMAT_VERSION}")


def _checksum(head: bytes, shape: bytes | memoryview, payload: bytes | memoryview) -> bytes:
    digest = hashlib.blake2b(head, digest_size=8)
    digest.update(shape)
    digest.update(payload)
    return digest.digest()


def _digest_bytes(spec_digest: str) -> bytes:
    # A malformed digest is a caller bug, not a corrupt entry: ValueError.
    raw = bytes.fromhex(spec_digest)
    if len(raw) != 16:
        raise ValueError(f"spec digest must be 32 hex digits, got {spec_digest!r}")
    return raw
