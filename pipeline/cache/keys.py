"""Cache keys: content digests and short, namespaced key strings.

Every key lives under ``<prefix>:cache`` (the prefix is configurable, default
``imgpipe``) and has three more colon-separated parts::

    imgpipe:cache:t:<spec16>:<image digest>      a preprocessed tensor
    imgpipe:cache:r:<scope16>:<image digest>     the predictions for one image
    imgpipe:cache:f:stat:<stat digest>           a file's image digest, by path and stat

The ``cache`` part keeps the cache apart from the job queue, which uses the
same default prefix in the same kind of Redis (``imgpipe:jobs``,
``imgpipe:results``, ...): cache maintenance never sees a queue key, whatever
the two prefixes are set to.

``<image digest>`` is BLAKE2b-128 of the file's bytes, so the same image under
two names, on two hosts, is one entry. ``<spec16>`` is the first 16 hex digits
of ``PreprocessSpec.digest()``, which covers everything that determines the
tensor (sizes, interpolation, colour handling, output layout) and includes
``SPEC_VERSION``, bumped whenever a backend changes its output. With
test-time augmentation it is the digest of the spec *and* the view set
(``spec.views_digest``; the spec's own for "none"): an image's views are one
entry, never served for another mode or for the plain crop.

The preprocessing *backend* is deliberately not part of the tensor key: the
Pillow and DALI backends are required, and tested, to agree (mean absolute
difference <= 2/255, same top-1), so a tensor made by DALI may serve a Pillow
run and vice versa. If a backend ever stops meeting that contract, bump
SPEC_VERSION rather than adding the backend to the key.

``<scope16>`` for results hashes everything that changes the predictions for
a given tensor: the model, its weights, the labels, top-k and the spec
(with the view set, as above: TTA and plain predictions never mix), and
the output kind other than "logits" ("embedding", "both"; with the
normalisation): an answer of one kind never serves a request for another,
and logits keys stay those of before embeddings existed.

File entries let an unchanged file skip even being read and hashed: the key
digests its path, device, inode, size, mtime and ctime (ctime changes on any
write and cannot be set back), as git's index does. They describe one host's
files, so they live in the local tier only.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass

DEFAULT_PREFIX = "imgpipe"
NAMESPACE = "cache"
TENSOR_KIND = "t"
RESULT_KIND = "r"
FILE_KIND = "f"
FILE_SCOPE = "stat"
SCOPE_HEX_CHARS = 16  # 64 bits: collisions between configurations are not a concern


@dataclass(frozen=True)
class ParsedKey:
    """The parts of a cache key, as `parse_key` splits them."""

    prefix: str
    kind: str
    scope: str
    image_digest: str


def image_digest(data: bytes) -> str:
    """BLAKE2b with a 16-byte digest of an image file's bytes, as 32 hex digits."""
    return hashlib.blake2b(data, digest_size=16).hexdigest()


def tensor_key(prefix: str, image_digest: str, spec_digest: str) -> str:
    """The key of the preprocessed tensor of one image under one spec."""
    return _join(prefix, TENSOR_KIND, spec_digest[:SCOPE_HEX_CHARS], image_digest)


def result_key(prefix: str, image_digest: str, model_id: str, weights_digest: str,
               topk: int, *, spec_digest: str, labels_digest: str,
               output: str = "logits") -> str:
    """The key of one image's predictions under one model configuration.

    `spec_digest` and `labels_digest` are required because both change the
    predictions: the spec changes the model's input, the labels file the
    names in the output. Pass "" for `labels_digest` only when the labels are
    fixed by `model_id` (for example the bundled ImageNet names). `output` is
    the output kind ("logits", or "embedding"/"both" with their normalisation).
    """
    parts = (model_id, weights_digest, str(topk), spec_digest, labels_digest)
    scope = "\x1f".join(parts if output == "logits" else (*parts, output))
    scope_hex = hashlib.blake2b(scope.encode(), digest_size=8).hexdigest()
    return _join(prefix, RESULT_KIND, scope_hex, image_digest)


def file_key(prefix: str, path: str, info: os.stat_result) -> str:
    """The key of the image digest of the file at `path` as `info` describes it."""
    identity = "\x1f".join(str(part) for part in (
        path, info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns, info.st_ctime_ns))
    digest = hashlib.blake2b(identity.encode(errors="surrogateescape"), digest_size=16)
    return _join(prefix, FILE_KIND, FILE_SCOPE, digest.hexdigest())


def namespace(prefix: str) -> str:
    """What every cache key under `prefix` starts with (then a colon)."""
    return f"{prefix}:{NAMESPACE}"


def parse_key(key: str) -> ParsedKey:
    """Split a key made by this module; ValueError when it is not one."""
    parts = key.rsplit(":", 4)
    kinds = (TENSOR_KIND, RESULT_KIND, FILE_KIND)
    if (len(parts) != 5 or parts[1] != NAMESPACE or parts[2] not in kinds
            or not all(parts)):
        raise ValueError(f"not an imgpipe cache key: {key!r}")
    prefix, _, kind, scope, digest = parts
    return ParsedKey(prefix, kind, scope, digest)


def _join(prefix: str, kind: str, scope: str, digest: str) -> str:
    if not prefix or not digest or not scope:
        raise ValueError("cache key parts must not be empty")
    return f"{namespace(prefix)}:{kind}:{scope}:{digest}"
