"""GET /metrics after real requests: values move as they should, labels stay bounded."""

import asyncio
import os

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.support import deadlines


async def scrape(client) -> dict:
    resp = await client.get("/metrics")
    assert resp.status == 200
    assert resp.headers["Content-Type"].startswith("text/plain")
    samples = {}
    for family in text_string_to_metric_families(await resp.text()):
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return samples


def value(samples, name, **labels):
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


async def test_metrics_follow_real_requests(client):
    before = await scrape(client)
    resp = await client.post("/api/v1/models", json={"name": "m", "algorithm": "XGBoost"})
    model_id = (await resp.json())["model_id"]
    data = os.urandom(300_000)
    resp = await client.put(f"/api/v1/models/{model_id}/upload", data=data)
    assert resp.status == 201
    resp = await client.get(f"/api/v1/models/{model_id}/download")
    assert await resp.read() == data
    resp = await client.get(f"/api/v1/models/{model_id}/download", headers={"Range": "bytes=100-199"})
    assert resp.status == 206 and len(await resp.read()) == 100
    resp = await client.get("/api/v1/models/0123456789abcdef01234567")
    assert resp.status == 404
    resp = await client.get("/no/such/path")
    assert resp.status == 404
    after = await scrape(client)

    def delta(name, **labels):
        return value(after, name, **labels) - value(before, name, **labels)

    assert delta("model_registrations_total", algorithm="xgboost") == 1
    assert delta("model_uploads_total", algorithm="xgboost") == 1
    assert delta("model_upload_bytes_total") == 300_000
    assert delta("model_downloads_total", algorithm="xgboost") == 1  # the range does not count
    assert delta("model_download_bytes_total") == 300_100
    assert value(after, "active_models_total") == 1
    assert value(after, "storage_usage_bytes") == 300_000
    assert value(after, "active_downloads") == 0
    assert value(after, "api_requests_in_flight") == 1  # the scrape itself
    assert delta("api_request_duration_seconds_count", endpoint="/api/v1/models/{id}/download",
                 method="GET", status="206") == 1
    assert delta("api_request_duration_seconds_count", endpoint="/api/v1/models/{id}",
                 method="GET", status="404") == 1
    assert delta("api_request_duration_seconds_count", endpoint="unmatched", method="GET", status="404") == 1

    # No label ever carries an id or a raw path.
    for (_, labels) in after:
        for _, v in labels:
            assert model_id not in v and "0123456789abcdef01234567" not in v and "/no/such" not in v


@pytest.mark.parametrize("backend", ["mongodb"])
async def test_storage_errors_are_counted(client, mongo_server):
    before = await scrape(client)
    mongo_server.stop()
    try:
        resp = await client.get("/api/v1/models")
        assert resp.status == 503
    finally:
        mongo_server.start()
    after = await scrape(client)
    assert value(after, "storage_operation_errors_total", operation="request") - \
        value(before, "storage_operation_errors_total", operation="request") >= 1


def test_cached_children_are_prometheus_own_and_stay_bounded():
    """The hot path's cached label children are the ones labels() gives, and hostile input
    (any method token, any algorithm text) cannot grow the caches without bound."""
    from app import metrics

    before = len(metrics._durations)
    children = {metrics.request_duration(None, f"X-{i}", 404) for i in range(200)}
    assert children == {metrics.REQUEST_DURATION.labels("unmatched", "other", "404")}
    assert len(metrics._durations) <= before + 1
    assert metrics.request_duration(None, "GET", 404) is metrics.REQUEST_DURATION.labels("unmatched", "GET", "404")
    assert metrics.downloads("Random Forest!") is metrics.DOWNLOADS.labels(metrics.algorithm_label("Random Forest!"))
    for i in range(metrics._MAX_CACHED + 50):
        metrics.downloads(f"algo-{i}")
    assert len(metrics._downloads) <= metrics._MAX_CACHED


def _count(endpoint: str, method: str, status: int) -> float:
    from prometheus_client import REGISTRY

    return REGISTRY.get_sample_value("api_request_duration_seconds_count",
                                     {"endpoint": endpoint, "method": method, "status": str(status)}) or 0.0


@deadlines.bounded(10)
async def test_the_tally_reaches_prometheus_every_interval_without_a_scrape(aiohttp_client, settings, monkeypatch):
    """With --workers, the worker answering /metrics reads the others' values from their files:
    each process applies its tally every FLUSH_SECONDS, not only when it is scraped itself."""
    from app import metrics
    from app.server import create_app

    monkeypatch.setattr(metrics, "FLUSH_SECONDS", 0.05)
    client = await aiohttp_client(create_app(settings))
    before = _count("/health", "GET", 200)
    for _ in range(3):
        assert (await client.get("/health")).status == 200
    while _count("/health", "GET", 200) < before + 3:
        await asyncio.sleep(0.02)
    assert _count("/health", "GET", 200) == before + 3


def test_flush_applies_exactly_what_was_tallied():
    from prometheus_client import REGISTRY

    from app import metrics

    tally = metrics.Tally()
    labels = {"endpoint": "unmatched", "method": "PATCH", "status": "418"}

    def sample(suffix, **extra):
        return REGISTRY.get_sample_value("api_request_duration_seconds" + suffix, {**labels, **extra}) or 0.0

    before = {s: sample(s) for s in ("_count", "_sum")}
    le_001 = sample("_bucket", le="0.01")
    tally.request(None, "PATCH", 418, 0.003)
    tally.request(None, "PATCH", 418, 0.02)
    tally.add(metrics.DOWNLOAD_BYTES, 5)
    tally.active_downloads = 2
    downloaded = REGISTRY.get_sample_value("model_download_bytes_total")
    assert sample("_count") == before["_count"]  # nothing applied yet
    tally.flush(in_flight=7)
    assert sample("_count") == before["_count"] + 2
    assert sample("_sum") == pytest.approx(before["_sum"] + 0.023)
    assert sample("_bucket", le="0.01") == le_001 + 1
    assert REGISTRY.get_sample_value("model_download_bytes_total") == downloaded + 5
    assert REGISTRY.get_sample_value("api_requests_in_flight") == 7
    assert REGISTRY.get_sample_value("active_downloads") == 2
    tally.active_downloads = 0
    tally.flush(in_flight=0)
    assert sample("_count") == before["_count"] + 2  # applied once


def test_the_tally_stays_bounded_between_flushes():
    """Hostile method tokens share one key, and a key applies its durations itself once it holds
    _MAX_PENDING of them, so no number of requests between two flushes grows memory without bound."""
    from app import metrics

    tally = metrics.Tally()
    for i in range(100):
        tally.request(None, f"X-{i}", 404, 0.001)
    assert len(tally._durations) == 1
    before = _count("unmatched", "other", 404)
    for _ in range(metrics._MAX_PENDING):
        tally.request(None, "NOPE", 404, 0.001)
    # 100 + _MAX_PENDING durations of the one key: the first _MAX_PENDING were applied without a flush.
    assert _count("unmatched", "other", 404) == before + metrics._MAX_PENDING
    assert sum(len(d) for d in tally._durations.values()) == 100
