"""Sharded queues without a server: key names, spreading jobs, reply streams, settings."""

from __future__ import annotations

import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
from redis.crc import key_slot

from pipeline.config import load_settings
from pipeline.errors import ConfigError
from pipeline.transport import contract
from pipeline.transport.contract import JobRules, Keys
from pipeline.transport.sharded import shard_ref, split_ref
from pipeline.transport.shards import hash_tag, shard_of, stream_in_shard

NOW_MS = 1_800_000_000_000


def test_one_shard_keeps_the_plain_key_names() -> None:
    assert Keys.of_shards("imgpipe", 1) == [Keys("imgpipe")]
    keys = Keys.of_shard("imgpipe", 0, 1)
    assert (keys.jobs, keys.results, keys.dead) == \
        ("imgpipe:jobs", "imgpipe:results", "imgpipe:dead")


def test_each_shard_has_a_hash_tagged_prefix_and_one_cluster_slot() -> None:
    shards = Keys.of_shards("imgpipe", 3)
    assert [keys.jobs for keys in shards] == \
        ["imgpipe:{0}:jobs", "imgpipe:{1}:jobs", "imgpipe:{2}:jobs"]
    for keys in shards:
        # a private reply stream (Client.reply_stream's name) included
        names = (keys.jobs, keys.results, keys.dead, f"{keys.results}:ab12")
        assert len({key_slot(name.encode()) for name in names}) == 1
    assert len({key_slot(keys.jobs.encode()) for keys in shards}) == 3


def test_a_shard_that_does_not_exist_is_refused_by_name() -> None:
    with pytest.raises(ValueError, match="shard 2 does not exist: there are 2"):
        Keys.of_shard("imgpipe", 2, 2)


def test_hash_tags_follow_the_cluster_rule() -> None:
    assert hash_tag("imgpipe:{1}:jobs") == "1"
    assert hash_tag("{user1000}.following") == "user1000"
    assert hash_tag("foo{bar}{zap}") == "bar"  # the first tag only
    assert hash_tag("foo{}{bar}") is None  # an empty tag: the whole key is hashed
    assert hash_tag("foo{{bar}}") == "{bar"
    assert hash_tag("imgpipe:jobs") is None


def test_a_job_id_always_goes_to_the_same_shard_in_any_process() -> None:
    ids = [f"job-{n}" for n in range(50)]
    here = [shard_of(job_id, 4) for job_id in ids]
    # another interpreter with another string-hash seed agrees: no hash() in it
    code = ("from pipeline.transport.shards import shard_of; "
            f"print([shard_of(i, 4) for i in {ids!r}])")
    there = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                           check=True, env={"PYTHONHASHSEED": "12345"},
                           cwd=Path(__file__).resolve().parents[2]).stdout
    assert there.strip() == str(here)
    # CRC-32, as any other language computes it: the standard check value of
    # "123456789" is 0xCBF43926 = 3421780262
    assert shard_of("123456789", 1000) == 262


def test_job_ids_spread_evenly_over_the_shards() -> None:
    counts = Counter(shard_of(f"{n:032x}", 4) for n in range(8000))
    assert sorted(counts) == [0, 1, 2, 3]
    assert all(1800 <= count <= 2200 for count in counts.values()), counts


def test_a_name_under_the_prefix_without_a_tag_stands_for_one_stream_per_shard() -> None:
    assert stream_in_shard("imgpipe:results:ab12", "imgpipe", "imgpipe:{1}") == \
        "imgpipe:{1}:results:ab12"
    assert stream_in_shard("imgpipe:results", "imgpipe", "imgpipe:{0}") == "imgpipe:{0}:results"
    # already in a slot, someone else's, or one shard: as it is
    assert stream_in_shard("imgpipe:{0}:results:x", "imgpipe", "imgpipe:{1}") == \
        "imgpipe:{0}:results:x"
    assert stream_in_shard("mine:replies", "imgpipe", "imgpipe:{1}") == "mine:replies"
    assert stream_in_shard("imgpipe:results:x", "imgpipe", "imgpipe") == "imgpipe:results:x"


def test_a_ref_carries_its_shard_and_entry_id() -> None:
    assert split_ref(shard_ref(3, "1712345678901-7")) == (3, "1712345678901-7")


def shard_rules(index: int) -> JobRules:
    keys = Keys.of_shard("p", index, 2)
    return JobRules("m", max_topk=5, max_inline_bytes=100, allowed_roots=[],
                    default_reply_to=keys.results, forbidden_reply_to=keys.own_streams,
                    reply_tag=hash_tag(keys.prefix))


def test_a_reply_stream_outside_the_jobs_shard_is_refused() -> None:
    fields = {b"data": b"x", b"reply_to": b"p:{0}:results:ab"}
    job = contract.parse_job("1-0", fields, shard_rules(1), NOW_MS)
    assert job.error is not None and job.error.code == "invalid_field"
    assert "{1}" in job.error.message
    assert job.reply_to == "p:{1}:results"  # the error goes to the shard's own stream


def test_a_reply_stream_in_the_jobs_shard_is_taken() -> None:
    fields = {b"data": b"x", b"reply_to": b"p:{1}:results:ab"}
    job = contract.parse_job("1-0", fields, shard_rules(1), NOW_MS)
    assert job.error is None and job.reply_to == "p:{1}:results:ab"


def test_shard_settings_from_the_environment() -> None:
    settings = load_settings(environ={
        "IMGPIPE_REDIS__SHARDS": "2",
        "IMGPIPE_REDIS__SHARD_URLS": "redis://a:6379/0 redis://b:6380/0",
        "IMGPIPE_SERVE__SHARDS": "1"})
    assert settings.redis.for_shard(1).url == "redis://b:6380/0"
    assert settings.served_shards() == [1]
    assert load_settings(environ={"IMGPIPE_REDIS__SHARDS": "3"}).served_shards() == [0, 1, 2]


def test_shard_urls_must_name_one_server_per_shard_and_are_never_echoed() -> None:
    with pytest.raises(ConfigError) as refused:
        load_settings(environ={"IMGPIPE_REDIS__SHARDS": "3",
                               "IMGPIPE_REDIS__SHARD_URLS": "redis://:s3cret@a redis://b"})
    assert "names 2 servers but redis.shards is 3" in str(refused.value)
    assert "s3cret" not in str(refused.value)
    with pytest.raises(ConfigError) as bad:
        load_settings(environ={"IMGPIPE_REDIS__SHARDS": "2",
                               "IMGPIPE_REDIS__SHARD_URLS": "http://:s3cret@a redis://b"})
    assert "shard URL 0 must start with redis://" in str(bad.value)
    assert "s3cret" not in str(bad.value)


def test_a_served_shard_that_does_not_exist_is_refused() -> None:
    with pytest.raises(ConfigError, match="serve.shards names shard.s. 2, but redis.shards "
                                          "is 2"):
        load_settings(environ={"IMGPIPE_REDIS__SHARDS": "2", "IMGPIPE_SERVE__SHARDS": "0,2"})


def test_a_prefix_with_braces_is_refused_with_shards() -> None:
    with pytest.raises(ConfigError, match="drop the braces"):
        load_settings(environ={"IMGPIPE_REDIS__SHARDS": "2", "IMGPIPE_REDIS__PREFIX": "a{b}"})
    assert load_settings(environ={"IMGPIPE_REDIS__PREFIX": "a{b}"}).redis.prefix == "a{b}"
