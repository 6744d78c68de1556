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
pixels.
"""

from __future__ import annotations

import hashlib
import json
import math
import struct
from typing import Any

import numpy as np

from pipeline.cache.keys import FILE_KIND, RESULT_KIND, TENSOR_KIND, parse_key

FORMAT_VERSION = 1
TENSOR_MAGIC = b"IPT\x00"
RESULT_MAGIC = b"IPR\x00"
MAX_NDIM = 8

_TENSOR_HEAD = struct.Struct("<4sBBBB16sQ8s")
_RESULT_HEAD = struct.Struct("<4sB3xI8s")
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


def encode_result(predictions: list[dict[str, Any]]) -> bytes:
    """Serialise one image's predictions (JSON-ready dicts) with a checksum."""
    payload = json.dumps(predictions, separators=(",", ":"), ensure_ascii=False,
                         allow_nan=False).encode()
    head = _RESULT_HEAD.pack(RESULT_MAGIC, FORMAT_VERSION, len(payload), _NO_CHECKSUM)
    return head[:-8] + _checksum(head, b"", payload) + payload


def decode_result(blob: bytes) -> list[dict[str, Any]]:
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


def _parse_predictions(payload: bytes) -> list[dict[str, Any]]:
    try:
        predictions = json.loads(payload)
    except (UnicodeDecodeError, ValueError) as exc:
        raise CorruptEntry(f"result payload is not JSON: {exc}") from exc
    if not isinstance(predictions, list) or not all(isinstance(p, dict) for p in predictions):
        raise CorruptEntry("result payload is not a list of objects")
    return predictions


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
