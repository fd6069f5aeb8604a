"""Request ids and the structured access log."""

import logging

import orjson
import pytest

from app import logs
from app.appkeys import STORAGE


async def test_request_id_is_echoed_or_generated(client):
    resp = await client.get("/health", headers={"X-Request-ID": "req-42.a:b"})
    assert resp.headers["X-Request-ID"] == "req-42.a:b"
    resp = await client.get("/health")
    generated = resp.headers["X-Request-ID"]
    assert len(generated) == 16
    # An id with characters a log line should not carry is replaced, not echoed.
    resp = await client.get("/health", headers={"X-Request-ID": "evil\tvalue"})
    assert resp.headers["X-Request-ID"] != "evil\tvalue"
    # Streamed responses carry it too.
    resp = await client.post("/api/v1/models", json={"name": "m", "algorithm": "a"})
    model_id = (await resp.json())["model_id"]
    await client.put(f"/api/v1/models/{model_id}/upload", data=b"x" * 1000)
    resp = await client.get(f"/api/v1/models/{model_id}/download", headers={"X-Request-ID": "dl-1"})
    assert resp.headers["X-Request-ID"] == "dl-1"
    await resp.read()


def test_json_formatter_carries_request_fields():
    record = logging.LogRecord("app.access", logging.INFO, __file__, 1, "GET %s", ("/x",), None)
    for k, v in {"request_id": "r1", "method": "GET", "route": "/api/v1/models/{id}", "status": 200,
                 "bytes": 10, "duration_ms": 1.5}.items():
        setattr(record, k, v)
    line = orjson.loads(logs.JsonFormatter().format(record))
    assert line["message"] == "GET /x" and line["level"] == "INFO" and line["time"].endswith("Z")
    assert line["request_id"] == "r1" and line["route"] == "/api/v1/models/{id}" and line["status"] == 200


@pytest.mark.parametrize("backend", ["embedded"])
async def test_internal_errors_hide_the_trace_from_clients(client, caplog, monkeypatch):
    async def broken(*args, **kwargs):
        raise RuntimeError("secret internals")

    monkeypatch.setattr(client.app[STORAGE], "find_models", broken)
    with caplog.at_level(logging.ERROR):
        resp = await client.get("/api/v1/models", headers={"X-Request-ID": "boom-1"})
    assert resp.status == 500
    body = await resp.json()
    assert body["error"]["code"] == "internal_error"
    assert "secret" not in str(body) and "Traceback" not in str(body)
    assert "boom-1" in body["error"]["message"]
    assert any("secret internals" in (r.exc_text or "") or r.exc_info for r in caplog.records)


def test_unparseable_requests_are_one_quiet_line(tmp_path):
    import socket

    from testkit.live_service import LiveService

    service = LiveService({"DATA_DIR": str(tmp_path / "d"), "MONGODB_URL": ""}, tmp_path / "log")
    service.start()
    try:
        with socket.create_connection(("127.0.0.1", service.port)) as s:
            s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nX-A: \x00\r\n\r\n")
            assert s.recv(100).split(b" ")[1] == b"400"
        with socket.create_connection(("127.0.0.1", service.port)) as s:
            s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
            assert s.recv(100).split(b" ")[1] == b"200"
    finally:
        service.stop()
    log = service.log()
    assert "Traceback" not in log and " ERROR " not in log, log
    assert "bad request: 400" in log
