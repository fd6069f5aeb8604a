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


async def test_every_kind_of_answer_echoes_the_request_id(client):
    """The middleware echoes the id on the answers it gets unsent, and a download's answer, which
    its handler starts itself, was given the id with its headers: between them every answer has it."""
    resp = await client.post("/api/v1/models", json={"name": "m", "algorithm": "a"})
    model_id = (await resp.json())["model_id"]
    await client.put(f"/api/v1/models/{model_id}/upload", data=b"x" * 1000)
    download = f"/api/v1/models/{model_id}/download"
    etag = (await client.head(download)).headers["ETag"]
    answers = [
        ("GET", "/health", {}, 200),
        ("GET", "/api/v1/models", {}, 200),
        ("GET", "/api/v1/models?limit=nope", {}, 400),
        ("GET", f"/api/v1/models/{model_id}", {}, 200),
        ("GET", "/api/v1/models/0123456789abcdef01234567", {}, 404),
        ("GET", "/no/such/route", {}, 404),
        ("DELETE", "/health", {}, 405),
        ("GET", "/", {}, 302),
        ("GET", download, {}, 200),
        ("HEAD", download, {}, 200),
        ("GET", download, {"Range": "bytes=0-9"}, 206),
        ("GET", download, {"Range": "bytes=0-9,20-29"}, 206),
        ("GET", download, {"Range": "bytes=5000-"}, 416),
        ("GET", download, {"If-None-Match": etag}, 304),
        ("GET", download, {"If-Match": '"other"'}, 412),
        ("GET", f"/api/v1/models/{model_id}/files", {}, 200),
    ]
    for n, (method, path, headers, status) in enumerate(answers):
        resp = await client.request(method, path, headers={**headers, "X-Request-ID": f"kind-{n}"},
                                    allow_redirects=False)
        await resp.read()
        assert (resp.status, resp.headers.get("X-Request-ID")) == (status, f"kind-{n}"), (method, path, headers)


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


@pytest.mark.parametrize("formatter", [logs.TextFormatter(), logs.JsonFormatter()], ids=["text", "json"])
def test_access_lines_written_directly_are_what_logging_would_write(formatter):
    fields = {"request_id": "r1", "method": "GET", "route": "/api/v1/models/{id}", "path": "/api/v1/models/x",
              "status": 200, "bytes": 10, "duration_ms": 1.5, "remote": None}
    args = ("127.0.0.1", "GET", "/api/v1/models/x?a=1", 200, 10, 1.5, "r1")
    record = logging.LogRecord(logs.ACCESS_LOGGER, logging.INFO, __file__, 1, logs._ACCESS_MESSAGE, args, None)
    record.__dict__.update(fields)
    for created in (record.created, 1_700_000_000.9996, 1_700_000_001.0):
        record.created, record.msecs = created, int((created - int(created)) * 1000) + 0.0
        assert formatter.access_line(created, logs._ACCESS_MESSAGE % args, fields) == formatter.format(record)


@pytest.mark.parametrize("fmt", ["text", "json"])
def test_a_live_service_writes_one_access_line_per_request(tmp_path, fmt):
    import urllib.request

    from testkit.live_service import LiveService

    service = LiveService({"DATA_DIR": str(tmp_path / "d"), "MONGODB_URL": "", "LOG_FORMAT": fmt,
                           "LOG_LEVEL": "INFO"}, tmp_path / "log")
    service.start()
    try:
        for n in range(3):
            req = urllib.request.Request(f"http://127.0.0.1:{service.port}/api/v1/models?limit={n + 1}",
                                         headers={"X-Request-ID": f"line-{n}"})
            with urllib.request.urlopen(req) as resp:
                assert resp.status == 200
    finally:
        service.stop()
    lines = [line for line in service.log().splitlines() if "line-" in line]
    assert len(lines) == 3, service.log()
    for n, line in enumerate(lines):
        if fmt == "json":
            entry = orjson.loads(line)
            assert entry["logger"] == "app.access" and entry["request_id"] == f"line-{n}"
            assert entry["route"] == "/api/v1/models" and entry["status"] == 200 and entry["time"].endswith("Z")
        else:
            assert f" INFO app.access: 127.0.0.1 GET /api/v1/models?limit={n + 1} 200 " in line
            assert line.endswith(f"id=line-{n}")
