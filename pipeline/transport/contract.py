"""The Redis wire contract, version 1: job fields in, result fields out.

Keys share one prefix: `<prefix>:jobs` (jobs, a stream read by one consumer
group), `<prefix>:results` (the default result stream) and `<prefix>:dead`
(dead letters); with shards, each shard's under `<prefix>:{N}` (`shards`).
Every value is bytes on the wire: scalars are UTF-8 text, structured values
(predictions, error, timings) JSON. Both sides of the contract live here: the
daemon parses jobs and encodes results, the client encodes jobs and decodes
results. An embedding travels as base64 text of its
little-endian float16 bytes, with `dim` and `dtype` beside it: a tenth of the
bytes of JSON numbers, and decodable in any language.

Parsing never raises: a malformed job still yields a JobRequest, carrying an
InputError that names the field, so it gets an error result like any other.
Anything unexpected becomes an `internal_error` the same way.

A client names its result stream (`reply_to`), so the daemon would write
where the client says: the daemon's own streams (jobs, dead letters) and the
cache's keys are refused, and only the default result stream is trimmed.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Optional

import numpy as np

from pipeline.embeddings import DTYPE_NAME, OUTPUTS, from_base64, to_base64
from pipeline.errors import InputError, internal_error
from pipeline.sources.files import resolve_allowed
from pipeline.sources.urls import MAX_URL_CHARS, Prefix, check_url
from pipeline.spec import TTA_VIEWS
from pipeline.transport.shards import hash_tag, shard_prefix

if TYPE_CHECKING:
    from pipeline.predictions import Record  # torch: not for clients

log = logging.getLogger("imgpipe.serve")

VERSION = 1
JOB_FIELDS = frozenset({"v", "image", "data", "id", "model", "topk", "reply_to", "deadline_ms",
                        "url", "tta", "output"})
# Added to a job's original fields when it is dead-lettered.
DEAD_FIELDS = ("error", "deliveries", "entry_id")
EXPIRED = "deadline_exceeded"  # the error code of an `expired` result
MAX_TEXT_CHARS = 256
STREAM_NAME = re.compile(r"^[A-Za-z0-9_.:{}-]{1,256}$")


@dataclass(frozen=True)
class Keys:
    """Every key of one shard (of the whole deployment when unsharded), under its prefix."""

    prefix: str

    @property
    def jobs(self) -> str:
        return f"{self.prefix}:jobs"

    @property
    def results(self) -> str:
        return f"{self.prefix}:results"

    @property
    def dead(self) -> str:
        return f"{self.prefix}:dead"

    @classmethod
    def of_shard(cls, prefix: str, index: int, count: int) -> Keys:
        """Shard `index` of `count`'s keys: under `<prefix>:{index}`, or under
        `prefix` itself when there is one shard."""
        return cls(shard_prefix(prefix, index, count))

    @classmethod
    def of_shards(cls, prefix: str, count: int) -> list[Keys]:
        """Every shard's keys, by index."""
        return [cls.of_shard(prefix, index, count) for index in range(count)]

    @property
    def own_streams(self) -> frozenset[str]:
        """The streams a result must never be written into."""
        return frozenset({self.jobs, self.dead})


@dataclass(frozen=True)
class JobRules:
    """What this daemon accepts."""

    model: str
    max_topk: int
    max_inline_bytes: int
    allowed_roots: Sequence[str]  # real paths
    default_reply_to: str
    forbidden_reply_to: frozenset[str] = frozenset()  # the daemon's own streams
    forbidden_reply_prefixes: tuple[str, ...] = ()  # key spaces of others (the cache)
    url_prefixes: tuple[Prefix, ...] = ()  # serve.allowed_url_prefixes; none: no URL jobs
    max_views: int = max(TTA_VIEWS.values())  # most views a job's tta may ask for
    # The output kinds a job may ask for: embeddings only where the daemon's model
    # gives them (model.output other than "logits").
    outputs: tuple[str, ...] = ("logits",)
    # With shards, the hash tag a reply stream must carry: the jobs stream's,
    # so that the result and the acknowledgement share a Redis Cluster slot.
    reply_tag: Optional[str] = None


@dataclass
class JobRequest:
    """One parsed job; `error` set when it cannot be run (it still gets a result)."""

    entry_id: str
    job_id: str
    reply_to: str
    image: Optional[str] = None  # the resolved real path
    data: Optional[bytes] = None
    topk: Optional[int] = None
    deadline_ms: Optional[int] = None
    error: Optional[InputError] = None
    url: Optional[str] = None  # checked against the prefixes; fetched by a worker
    tta: Optional[str] = None  # test-time augmentation mode; None: the daemon's
    output: Optional[str] = None  # "logits", "embedding" or "both"; None: the daemon's


def parse_job(entry_id: str, fields: Mapping[bytes, bytes], rules: JobRules,
              now_ms: int) -> JobRequest:
    """Validate one stream entry against the contract and the daemon's rules."""
    job = JobRequest(entry_id, entry_id, rules.default_reply_to)
    try:
        _parse_into(job, fields, rules, now_ms)
    except InputError as exc:
        job.error = exc
    except Exception as exc:  # a backstop: one job must never take the daemon down
        job.error = internal_error(exc)
        log.exception("job entry %s could not be parsed", entry_id,
                      extra={"job_id": job.job_id})
    return job


def parse_address(entry_id: str, fields: Mapping[bytes, bytes], rules: JobRules) -> JobRequest:
    """Only who the job is and where its result goes: for a job that is not run
    (dead-lettered) and so must not be parsed further. Never raises."""
    job = JobRequest(entry_id, entry_id, rules.default_reply_to)
    with contextlib.suppress(Exception):  # a bad id or reply_to: the defaults stand
        _parse_address(job, _field_names(fields), rules)
    return job


def _parse_into(job: JobRequest, raw: Mapping[bytes, bytes], rules: JobRules,
                now_ms: int) -> None:
    fields = _field_names(raw)
    # Where the result goes first, so even a malformed job's error reaches its client.
    _parse_address(job, fields, rules)
    unknown = sorted(set(fields) - JOB_FIELDS)
    if unknown:
        raise InputError("unknown_field", f"unknown job field(s): {', '.join(unknown)[:200]} "
                         f"(known: {', '.join(sorted(JOB_FIELDS))})")
    if "v" in fields and _text(fields, "v") != str(VERSION):
        raise InputError("unsupported_version", f"field v: this daemon speaks version "
                         f"{VERSION} of the job contract")
    if "model" in fields and _text(fields, "model") != rules.model:
        raise InputError("unknown_model", f"field model: this daemon serves {rules.model!r}, "
                         f"not {_text(fields, 'model')!r}")
    if "topk" in fields:
        job.topk = _integer(fields, "topk", 1, rules.max_topk)
    if "deadline_ms" in fields:
        job.deadline_ms = _integer(fields, "deadline_ms", 0, 2**63 - 1)
    if "tta" in fields:
        job.tta = _tta(fields, rules.max_views)
    if "output" in fields:
        job.output = _output(fields, rules.outputs)
    _parse_image(job, fields, rules)
    if job.deadline_ms is not None and job.deadline_ms < now_ms:
        raise InputError(EXPIRED, f"the job's deadline passed {now_ms - job.deadline_ms} ms "
                         f"before it was read")


def _parse_address(job: JobRequest, fields: Mapping[str, bytes], rules: JobRules) -> None:
    if "id" in fields:
        job.job_id = _text(fields, "id")
    if "reply_to" in fields:
        job.reply_to = _reply_stream(_text(fields, "reply_to"), rules)


def _reply_stream(name: str, rules: JobRules) -> str:
    name = _stream_name(name, "reply_to")
    if name in rules.forbidden_reply_to or name.startswith(rules.forbidden_reply_prefixes):
        raise InputError("invalid_field", f"field reply_to: {name!r} is a key of imgpipe's "
                         f"own (the jobs or dead-letter stream, or the cache); results "
                         f"cannot be written there")
    if rules.reply_tag is not None and hash_tag(name) != rules.reply_tag:
        raise InputError("invalid_field", f"field reply_to: {name!r} is outside this job's "
                         f"shard: a reply stream must carry the shard's hash tag "
                         f"{{{rules.reply_tag}}}, as Client.reply_stream's names do")
    return name


def _parse_image(job: JobRequest, fields: Mapping[str, bytes], rules: JobRules) -> None:
    given = [name for name in ("image", "data", "url") if name in fields]
    if len(given) != 1:
        raise InputError("conflicting_fields" if given else "missing_field",
                         "a job needs exactly one of image (a file path), data "
                         "(the image's bytes) and url (an http(s) URL to fetch it from)")
    if "url" in fields:
        url = _text(fields, "url", limit=MAX_URL_CHARS)
        check_url(url, rules.url_prefixes)  # again by the worker, on every hop
        job.url = url
    elif "data" in fields:
        data = fields["data"]
        if len(data) > rules.max_inline_bytes:
            raise InputError("data_too_large", f"field data: {len(data):,} bytes; the limit "
                             f"is {rules.max_inline_bytes:,}")
        job.data = data
    else:
        job.image = resolve_allowed(_text(fields, "image", limit=4096), rules.allowed_roots)


def _tta(fields: Mapping[str, bytes], max_views: int) -> str:
    mode = _text(fields, "tta", limit=32)
    if mode not in TTA_VIEWS:
        raise InputError("invalid_field", f"field tta: {mode!r} is not one of "
                         f"{', '.join(TTA_VIEWS)}")
    if TTA_VIEWS[mode] > max_views:
        raise InputError("invalid_field", f"field tta: {mode} scores {TTA_VIEWS[mode]} views; "
                         f"this daemon allows at most {max_views} (serve.max_views)")
    return mode


def _output(fields: Mapping[str, bytes], allowed: tuple[str, ...]) -> str:
    kind = _text(fields, "output", limit=32)
    if kind not in OUTPUTS:
        raise InputError("invalid_field", f"field output: {kind!r} is not one of "
                         f"{', '.join(OUTPUTS)}")
    if kind not in allowed:
        raise InputError("invalid_field", f"field output: this daemon answers "
                         f"{' or '.join(allowed)} (embeddings need it started with "
                         f"model.output 'embedding' or 'both')")
    return kind


def _field_names(raw: Mapping[bytes, bytes]) -> dict[str, bytes]:
    fields = {}
    for name, value in raw.items():
        try:
            fields[name.decode("utf-8")] = value
        except UnicodeDecodeError:
            raise InputError("invalid_field", "job field names must be UTF-8 text") from None
    return fields


def _text(fields: Mapping[str, bytes], name: str, limit: int = MAX_TEXT_CHARS) -> str:
    try:
        text = fields[name].decode("utf-8")
    except UnicodeDecodeError:
        raise InputError("invalid_field", f"field {name}: not UTF-8 text") from None
    if not text or len(text) > limit:
        raise InputError("invalid_field", f"field {name}: must be 1 to {limit} characters")
    return text


def _integer(fields: Mapping[str, bytes], name: str, low: int, high: int) -> int:
    text = _text(fields, name, limit=32)
    if not re.fullmatch(r"-?[0-9]+", text):
        raise InputError("invalid_field", f"field {name}: {text!r} is not an integer")
    value = int(text)
    if not low <= value <= high:
        raise InputError("invalid_field", f"field {name}: {value} is outside {low}..{high}")
    return value


def _stream_name(name: str, field: str) -> str:
    if not STREAM_NAME.match(name):
        raise InputError("invalid_field", f"field {field}: not a valid stream name "
                         "(letters, digits and _.:{{}}- only)")
    return name


def job_fields(*, image: Optional[str] = None, data: Optional[bytes] = None,
               job_id: Optional[str] = None, topk: Optional[int] = None,
               reply_to: Optional[str] = None, deadline_ms: Optional[int] = None,
               model: Optional[str] = None, url: Optional[str] = None,
               tta: Optional[str] = None, output: Optional[str] = None
               ) -> dict[str, str | bytes]:
    """The fields of a job entry (client side); exactly one of image, data and url."""
    if [image, data, url].count(None) != 2:
        raise ValueError("give exactly one of image, data and url")
    fields: dict[str, str | bytes] = {"v": str(VERSION)}
    optional = {"image": image, "data": data, "url": url, "id": job_id, "topk": topk,
                "reply_to": reply_to, "deadline_ms": deadline_ms, "model": model, "tta": tta,
                "output": output}
    for name, value in optional.items():
        if value is not None:
            fields[name] = value if isinstance(value, bytes) else str(value)
    return fields


def result_fields(record: Record, job: JobRequest, model: str,
                  queue_wait_ms: float) -> dict[str, str]:
    """A result entry for `record`, the engine's outcome for `job`."""
    fields = {"v": str(VERSION), "job_id": job.job_id, "entry_id": job.entry_id,
              "status": record["status"], "model": record.get("model", model)}
    if record["status"] == "ok":
        if "predictions" in record:
            fields["predictions"] = json.dumps(record["predictions"], separators=(",", ":"))
        if "embedding" in record:
            fields["embedding"] = to_base64(record["embedding"])
            fields["dim"], fields["dtype"] = str(record["embedding"].size), DTYPE_NAME
        fields["cache"] = record.get("cache", "miss")
        if "views" in record:
            fields["views"] = str(record["views"])
    else:
        error = record["error"]
        fields["error"] = json.dumps(error, separators=(",", ":"))
        if error["code"] == EXPIRED:
            fields["status"] = "expired"
    timings = {"queue_wait": round(queue_wait_ms, 3), **record.get("timings_ms", {})}
    fields["timings_ms"] = json.dumps(timings, separators=(",", ":"))
    return fields


def reply_text(value: Any) -> str:
    """A value from a Redis reply (entry id, consumer name) as text."""
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def embedding_of(result: Mapping[str, Any]) -> np.ndarray:
    """The float16 vector of a decoded result (`decode_result`) with an embedding;
    ValueError when its fields do not hold one."""
    if result.get("dtype") != DTYPE_NAME:
        raise ValueError(f"embedding dtype {result.get('dtype')!r}, expected {DTYPE_NAME}")
    return from_base64(result["embedding"], int(result["dim"]))


def decode_result(fields: Mapping[bytes | str, bytes | str]) -> dict[str, Any]:
    """A result entry as a dict, JSON fields parsed (client side)."""
    result: dict[str, Any] = {}
    for name, value in fields.items():
        key = name.decode() if isinstance(name, bytes) else name
        text = value.decode("utf-8", "replace") if isinstance(value, bytes) else value
        result[key] = json.loads(text) if key in ("predictions", "error", "timings_ms") else text
    return result
