"""Rate limits, the download cap, slow clients and size limits."""

import dataclasses
import os
import socket
import time

import pytest

from app.config import ConfigError, Rate, Settings, parse_rate
from app.limits import TokenBuckets
from app.server import create_app
from testkit.live_service import LiveService


def test_parse_rate():
    assert parse_rate("RATE_LIMIT", "100/minute") == Rate(100, 60)
    assert parse_rate("RATE_LIMIT", "5/s") == Rate(5, 1)
    assert parse_rate("RATE_LIMIT", "") is None
    for bad in ("100", "0/minute", "ten/minute", "5/day"):
        with pytest.raises(ConfigError, match="RATE_LIMIT"):
            parse_rate("RATE_LIMIT", bad)


def test_token_bucket_refills_evenly_and_forgets_old_clients():
    b = TokenBuckets(Rate(2, 10), max_clients=2)
    assert b.take("a", now=0) == 0 and b.take("a", now=0) == 0
    assert b.take("a", now=0) == pytest.approx(5)  # one token every 5 s
    assert b.take("a", now=5) == 0
    b.take("b", now=5)
    b.take("c", now=5)  # "a" is forgotten: the table stays bounded
    assert b.take("a", now=5) == 0


@pytest.mark.parametrize("backend", ["embedded"])
async def test_rate_limit_answers_429_with_retry_after(aiohttp_client, settings):
    s = dataclasses.replace(settings, rate_limit=Rate(3, 60), download_rate_limit=Rate(1, 60))
    client = await aiohttp_client(create_app(s))
    statuses = [(await client.get("/api/v1/models")).status for _ in range(3)]
    assert statuses == [200, 200, 200]
    resp = await client.get("/api/v1/models")
    assert resp.status == 429
    assert int(resp.headers["Retry-After"]) >= 1
    assert (await resp.json())["error"]["code"] == "rate_limited"
    # /health is not limited (load balancers poll it); /metrics is (test_security_requests).
    assert (await client.get("/health")).status == 200


@pytest.mark.parametrize("backend", ["embedded"])
async def test_download_rate_limit_is_separate(aiohttp_client, settings):
    s = dataclasses.replace(settings, download_rate_limit=Rate(1, 60))
    client = await aiohttp_client(create_app(s))
    resp = await client.post("/api/v1/models", json={"name": "m", "algorithm": "a"})
    model_id = (await resp.json())["model_id"]
    await client.put(f"/api/v1/models/{model_id}/upload", data=b"x" * 100)
    assert (await client.get(f"/api/v1/models/{model_id}/download")).status == 200
    resp = await client.get(f"/api/v1/models/{model_id}/download")
    assert resp.status == 429 and "DOWNLOAD_RATE_LIMIT" in (await resp.json())["error"]["message"]
    assert (await client.get(f"/api/v1/models/{model_id}")).status == 200  # metadata is not a download


@pytest.mark.parametrize("backend", ["embedded"])
async def test_download_cap_queues_then_answers_503(aiohttp_client, settings):
    s = dataclasses.replace(settings, max_concurrent_downloads=1, download_queue_seconds=1)
    client = await aiohttp_client(create_app(s))
    resp = await client.post("/api/v1/models", json={"name": "m", "algorithm": "a"})
    model_id = (await resp.json())["model_id"]
    data = os.urandom(48 * 1024 * 1024)  # more than socket buffers hold, so the first download stays busy
    await client.put(f"/api/v1/models/{model_id}/upload", data=data)
    first = await client.get(f"/api/v1/models/{model_id}/download")
    assert first.status == 200
    await first.content.readexactly(1024)
    second = await client.get(f"/api/v1/models/{model_id}/download")
    assert second.status == 503
    assert second.headers["Retry-After"] == "1"
    assert (await second.json())["error"]["code"] == "too_many_downloads"
    assert len(await first.read()) == len(data) - 1024
    # The slot is free again; a queued download gets it.
    third = await client.get(f"/api/v1/models/{model_id}/download")
    assert third.status == 200 and await third.read() == data


def test_a_client_that_stops_reading_is_dropped(tmp_path):
    service = LiveService({"DATA_DIR": str(tmp_path / "d"), "MONGODB_URL": "", "DOWNLOAD_TIMEOUT": "2"},
                          tmp_path / "log")
    service.start()
    try:
        import urllib.request

        import orjson

        req = urllib.request.Request(service.url + "/api/v1/models", method="POST",
                                     data=orjson.dumps({"name": "m", "algorithm": "a"}))
        model_id = orjson.loads(urllib.request.urlopen(req).read())["model_id"]
        size = 64 * 1024 * 1024
        req = urllib.request.Request(f"{service.url}/api/v1/models/{model_id}/upload", method="PUT",
                                     data=os.urandom(size))
        urllib.request.urlopen(req).read()
        with socket.create_connection(("127.0.0.1", service.port)) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            s.sendall(f"GET /api/v1/models/{model_id}/download HTTP/1.1\r\nHost: x\r\n\r\n".encode())
            received = len(s.recv(1024))  # headers arrive; then this client stops reading
            deadline = time.monotonic() + 30
            while "client made no progress" not in service.log() and time.monotonic() < deadline:
                time.sleep(0.2)
            assert "client made no progress for 2 s" in service.log()
            # Dropped for real: reading again meets the end of the connection at once,
            # not the rest of what the service had queued for it.
            s.settimeout(5)
            deadline = time.monotonic() + 5
            try:
                while (piece := s.recv(1024 * 1024)) and time.monotonic() < deadline:
                    received += len(piece)
                assert piece == b"", f"still receiving 5 s after the drop ({received} bytes so far)"
            except ConnectionResetError:
                pass
            except TimeoutError:
                pytest.fail(f"the connection is still open after {received} bytes")
            assert received < size // 2, f"{received} bytes arrived: the service kept sending"
    finally:
        service.stop()


@pytest.mark.parametrize("backend", ["embedded"])
async def test_json_size_limit_is_configurable(aiohttp_client, settings):
    client = await aiohttp_client(create_app(dataclasses.replace(settings, max_json_size=1000)))
    resp = await client.post("/api/v1/models", json={"name": "m", "algorithm": "a", "description": "x" * 2000})
    assert resp.status == 413
    resp = await client.post("/api/v1/models", json={"name": "m", "algorithm": "a", "description": "x" * 100})
    assert resp.status == 201


def test_header_and_url_limits(tmp_path):
    service = LiveService({"DATA_DIR": str(tmp_path / "d"), "MONGODB_URL": "", "MAX_HEADER_SIZE": "2048",
                           "MAX_URL_LENGTH": "1024"}, tmp_path / "log")
    service.start()
    try:
        def status_of(raw: bytes) -> int:
            with socket.create_connection(("127.0.0.1", service.port)) as s:
                s.sendall(raw)
                return int(s.recv(100).split(b" ")[1])

        assert status_of(b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 1000 + b"\r\n\r\n") == 200
        assert status_of(b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 4000 + b"\r\n\r\n") in (400, 431)
        assert status_of(b"GET /api/v1/models?q=" + b"a" * 2000 + b" HTTP/1.1\r\nHost: x\r\n\r\n") in (400, 414)
    finally:
        service.stop()


def test_limits_config_names_the_variable():
    for name, value in [("MAX_CONCURRENT_DOWNLOADS", "-1"), ("DOWNLOAD_TIMEOUT", "0"),
                        ("SHUTDOWN_GRACE_SECONDS", "x"), ("MAX_HEADER_SIZE", "10"), ("MAX_JSON_SIZE", "big"),
                        ("DOWNLOAD_RATE_LIMIT", "fast")]:
        with pytest.raises(ConfigError, match=name):
            Settings.from_env({name: value})


