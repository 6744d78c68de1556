"""Metrics and the status server, scraped over a real socket like Prometheus would."""

from __future__ import annotations

import urllib.error
import urllib.request
from collections.abc import Iterator

import pytest
from prometheus_client.parser import text_string_to_metric_families

from pipeline.metrics import Metrics
from pipeline.status_server import Health, StatusServer, start

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


@pytest.fixture
def metrics() -> Metrics:
    return Metrics()


@pytest.fixture
def health() -> Health:
    return Health()


@pytest.fixture
def server(metrics: Metrics, health: Health) -> Iterator[StatusServer]:
    server = start("127.0.0.1", 0, metrics, health)
    yield server
    server.stop()


def get(server: StatusServer, path: str) -> tuple[int, str, str]:
    """(status, content type, body) of GET `path`, error statuses included."""
    try:
        with urllib.request.urlopen(server.url + path, timeout=5) as reply:
            return reply.status, reply.headers["Content-Type"], reply.read().decode()
    except urllib.error.HTTPError as error:
        with error:
            return error.code, error.headers["Content-Type"], error.read().decode()


def scrape(server: StatusServer) -> Samples:
    status, content_type, body = get(server, "/metrics")
    assert status == 200
    assert content_type.startswith("text/plain; version=")
    return {(sample.name, frozenset(sample.labels.items())): sample.value
            for family in text_string_to_metric_families(body) for sample in family.samples}


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, frozenset(labels.items()))]


def ok_record(cache: str = "miss") -> dict[str, object]:
    return {"path": "a.jpg", "status": "ok", "cache": cache, "predictions": [],
            "timings_ms": {"queue_wait": 3.0, "cache_lookup": 1.0, "decode": 12.0,
                           "preprocess": 13.0, "inference": 40.0}}


def error_record(code: str) -> dict[str, object]:
    return {"path": "b.jpg", "status": "error", "error": {"code": code, "message": "..."}}


def test_counters_move_as_records_pass(server: StatusServer, metrics: Metrics) -> None:
    # given a fresh daemon: the job series exist at zero before any job
    before = scrape(server)
    assert value(before, "imgpipe_jobs_total", status="ok") == 0
    assert value(before, "imgpipe_jobs_total", status="expired") == 0

    # when two scored, one failed and one expired job pass
    metrics.observe_records([ok_record("result:local"), ok_record("miss"),
                             error_record("not_an_image"), error_record("deadline_exceeded")])

    # then each counter moved by its share
    after = scrape(server)
    assert value(after, "imgpipe_jobs_total", status="ok") == 2
    assert value(after, "imgpipe_jobs_total", status="error") == 1
    assert value(after, "imgpipe_jobs_total", status="expired") == 1
    assert value(after, "imgpipe_errors_total", code="not_an_image") == 1
    assert value(after, "imgpipe_errors_total", code="deadline_exceeded") == 1
    assert value(after, "imgpipe_cache_hits_total", tier="local", kind="result") == 1
    assert value(after, "imgpipe_cache_misses_total") == 1


def test_timings_become_stage_seconds(server: StatusServer, metrics: Metrics) -> None:
    # when one record passes (its "preprocess" total is not a stage) and a publish is timed
    metrics.observe_records([ok_record()])
    metrics.observe_stage("publish", 0.002)

    # then the histograms hold seconds, one observation each
    samples = scrape(server)
    assert value(samples, "imgpipe_stage_seconds_count", stage="decode") == 1
    assert value(samples, "imgpipe_stage_seconds_sum", stage="decode") == pytest.approx(0.012)
    assert value(samples, "imgpipe_stage_seconds_count", stage="cache_lookup") == 1
    assert value(samples, "imgpipe_stage_seconds_bucket", stage="inference", le="0.05") == 1
    assert value(samples, "imgpipe_stage_seconds_bucket", stage="inference", le="0.025") == 0
    assert value(samples, "imgpipe_stage_seconds_count", stage="publish") == 1
    assert value(samples, "imgpipe_stage_seconds_count", stage="h2d") == 0


def test_batches_gauges_and_info(server: StatusServer, metrics: Metrics) -> None:
    # when the daemon reports its state
    for size in (1, 3, 64):
        metrics.observe_batch(size)
    metrics.set_in_flight(7)
    metrics.set_queue_depth("jobs", 12)
    metrics.dead_lettered(2)
    metrics.decode_fell_back()
    metrics.model_loaded(1.5)
    metrics.set_info(version="0.1.0", model="efficientnet_lite0", device="cpu")

    # then a scrape shows it
    samples = scrape(server)
    assert value(samples, "imgpipe_batch_size_bucket", le="4.0") == 2
    assert value(samples, "imgpipe_batch_size_bucket", le="1024.0") == 3
    assert value(samples, "imgpipe_in_flight_jobs") == 7
    assert value(samples, "imgpipe_queue_depth", queue="jobs") == 12
    assert value(samples, "imgpipe_dead_letters_total") == 2
    assert value(samples, "imgpipe_decode_fallbacks_total") == 1
    assert value(samples, "imgpipe_model_load_seconds") == 1.5
    assert value(samples, "imgpipe_info", version="0.1.0", model="efficientnet_lite0",
                 device="cpu") == 1


def test_unknown_stage_is_refused(metrics: Metrics) -> None:
    with pytest.raises(ValueError, match="unknown stage 'gpu'"):
        metrics.observe_stage("gpu", 0.1)


def test_engines_do_not_share_counters() -> None:
    first, second = Metrics(), Metrics()
    first.observe_records([ok_record()])
    ok = {"status": "ok"}
    assert first.registry.get_sample_value("imgpipe_jobs_total", ok) == 1
    assert second.registry.get_sample_value("imgpipe_jobs_total", ok) == 0


def test_readiness_follows_the_lifecycle(server: StatusServer, health: Health) -> None:
    # given a daemon still warming up: alive, not ready
    assert get(server, "/healthz")[::2] == (200, "ok")
    assert get(server, "/readyz")[::2] == (503, "starting")
    assert value(scrape(server), "imgpipe_ready") == 0

    # when warm-up is done
    health.ready()
    assert get(server, "/readyz")[::2] == (200, "ready")
    assert value(scrape(server), "imgpipe_ready") == 1

    # when a drain begins, a late ready() does not undo it
    health.draining()
    health.ready()
    assert get(server, "/readyz")[::2] == (503, "draining")
    assert value(scrape(server), "imgpipe_ready") == 0
    assert get(server, "/healthz")[0] == 200


def test_healthz_reports_a_stall(metrics: Metrics) -> None:
    # given a liveness check that fails
    server = start("127.0.0.1", 0, metrics, Health(alive=lambda: False))
    try:
        assert get(server, "/healthz")[::2] == (503, "stalled")
        assert get(server, "/nothing-here")[0] == 404
    finally:
        server.stop()


def test_port_zero_binds_a_free_port(server: StatusServer) -> None:
    assert server.port > 0
    assert server.url == f"http://127.0.0.1:{server.port}"
