"""Slow, stalled and idle clients against the service as a real process, over real sockets.

From the security issue: request heads that trickle in and bodies that stop
half-way held their connection (and an upload's temporary file) for as long
as the client liked, until the process ran out of descriptors; stalled uploads
were not capped; 40,000 empty multipart parts held the event loop for
seconds; a download to a client that does not read polled the socket in a
busy loop; and ``gc`` deleted the temporary file of an upload in progress.
Everything here is measured from outside the service: its answers, its CPU
time and resident memory (psutil), and what it leaves under DATA_DIR/tmp or in
GridFS.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import hashlib
import json
import os
import resource
import socket
import struct
import subprocess
import sys
import termios
import time
import urllib.request
from pathlib import Path

import psutil
import pytest

from tests.support.live_service import service_on
from tests.support.mongo_server import REPO
from tests.test_hostile_inputs import chunk, parse_responses, raw_multipart, request_bytes

pytestmark = pytest.mark.slow

MODELS = "/api/v1/models"
MIB = 1024 * 1024


# ---------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------

def api(svc, method: str, path: str, body: dict | None = None) -> tuple[int, dict]:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(svc.url + path, data=data, method=method,
                                 headers={"Content-Type": "application/json"} if data else {})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def register(svc, name: str = "slow") -> str:
    status, body = api(svc, "POST", MODELS, {"name": name, "algorithm": "a"})
    assert status == 201, body
    return body["model_id"]


def cpu_seconds(svc) -> float:
    t = psutil.Process(svc.pid).cpu_times()
    return t.user + t.system


def poll(condition, timeout: float, interval: float = 0.05) -> bool:
    """Whether ``condition()`` came true within ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)
    return True


def wait_for(condition, timeout: float, what: str, interval: float = 0.05) -> None:
    assert poll(condition, timeout, interval), f"timed out after {timeout} s waiting for {what}"


async def async_wait_for(condition, timeout: float, what: str, interval: float = 0.05):
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out after {timeout} s waiting for {what}"
        await asyncio.sleep(interval)


def temp_state(data_dir: Path, mongo, db_name: str | None) -> int:
    """Bytes an unfinished upload holds: temp files, or GridFS chunks without a files document."""
    if mongo is None:
        return sum(p.stat().st_size for p in (data_dir / "tmp").iterdir() if p.is_file())
    with mongo.sync_client() as c:
        db = c[db_name]
        committed = set(db["models.files"].distinct("_id"))
        return sum(len(ch["data"]) for ch in db["models.chunks"].find({"files_id": {"$nin": list(committed)}}))


def health_ok(svc, timeout: float = 5.0) -> bool:
    try:
        with urllib.request.urlopen(svc.url + "/health", timeout=timeout) as r:
            return r.status == 200
    except OSError:
        return False


async def read_until_closed(reader: asyncio.StreamReader, timeout: float) -> tuple[bytes, bool]:
    """What the service sent until it closed the connection; (data, closed within ``timeout``)."""
    data = bytearray()
    deadline = time.monotonic() + timeout
    while (left := deadline - time.monotonic()) > 0:
        try:
            piece = await asyncio.wait_for(reader.read(65536), left)
        except (ConnectionResetError, BrokenPipeError):
            return bytes(data), True
        except asyncio.TimeoutError:
            break
        if not piece:
            return bytes(data), True
        data += piece
    return bytes(data), False


def error_code(raw) -> str:
    assert (raw.header("content-type") or "").startswith("application/json"), raw
    body = json.loads(raw.body)
    assert set(body) == {"error"} and set(body["error"]) == {"code", "message"}, body
    return body["error"]["code"]


@contextlib.contextmanager
def fd_limit(soft: int):
    """Processes started inside inherit a soft RLIMIT_NOFILE of ``soft``."""
    old = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, old[1]))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, old)


# ---------------------------------------------------------------------------
# 7. Multipart bodies that cost unbounded parsing
# ---------------------------------------------------------------------------

def _empty_parts(n: int) -> tuple[bytes, bytes]:
    return raw_multipart([(b'Content-Disposition: form-data; name="x"', b"")] * n)


def _long_preamble() -> tuple[bytes, bytes]:
    body, ctype = raw_multipart([(b'Content-Disposition: form-data; name="file"; filename="m"', b"x")])
    return b"\r\n" * 1_150_000 + body, ctype


def _nested() -> tuple[bytes, bytes]:
    inner, inner_type = raw_multipart([(b'Content-Disposition: form-data; name="x"', b"")] * 3, b"inner")
    return raw_multipart([(b"Content-Type: " + inner_type, inner)])


@pytest.mark.parametrize("body, code", [
    (_empty_parts(40_000), "too_many_parts"),
    (_long_preamble(), "invalid_multipart"),
    (_nested(), "invalid_multipart"),
], ids=["40000 empty parts", "2 MB preamble", "nested multipart"])
async def test_costly_multipart_bodies_are_400_without_holding_the_loop(request, tmp_path, body, code):
    body, ctype = body
    with service_on(request, "embedded", tmp_path, "parts") as (svc, data_dir, _, _):
        model_id = register(svc)
        for path in (MODELS, f"{MODELS}/{model_id}/upload"):
            before = cpu_seconds(svc)
            reader, writer = await asyncio.open_connection("127.0.0.1", svc.port)
            writer.write(request_bytes("POST", path, [("Content-Type", ctype)], body))
            health = asyncio.create_task(asyncio.to_thread(_timed_health, svc))
            data, _ = await read_until_closed(reader, 30)
            writer.transport.abort()
            health_seconds = await health
            used = cpu_seconds(svc) - before
            print(f"\n{path}: {len(body)} bytes cost {used:.2f} CPU s; /health took {health_seconds:.3f} s")
            assert used < 1.0
            assert health_seconds < 0.5
            (answer,) = parse_responses(data)
            assert answer.status == 400 and error_code(answer) == code, answer
        assert not list((data_dir / "tmp").iterdir())


def _timed_health(svc) -> float:
    t = time.monotonic()
    assert health_ok(svc, timeout=30)
    return time.monotonic() - t


# ---------------------------------------------------------------------------
# 8. Downloads to clients that do not read: no busy wait, no 500 when they leave
# ---------------------------------------------------------------------------

def _unread_bytes(s: socket.socket) -> int:
    return struct.unpack("i", fcntl.ioctl(s.fileno(), termios.FIONREAD, b"\0\0\0\0"))[0]


def _send_queues(port: int) -> list[int]:
    """Bytes queued for sending in each established IPv4 socket on ``port``, from /proc/net/tcp."""
    queues = []
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if fields[1].endswith(f":{port:04X}") and fields[3] == "01":
            queues.append(int(fields[4].split(":")[0], 16))
    return sorted(queues)


def test_unread_pipelined_range_requests_cost_no_cpu(request, tmp_path):
    """8 clients pipeline 1,500 multi-range requests and never read: once the socket buffers are
    full the service must sit idle (under 5% of a core), and answer no 500 when the clients leave."""
    with service_on(request, "embedded", tmp_path, "unread") as (svc, data_dir, _, _):
        model_id = register(svc)
        size = MIB
        req = urllib.request.Request(f"{svc.url}{MODELS}/{model_id}/upload", data=os.urandom(size), method="PUT")
        with urllib.request.urlopen(req, timeout=30) as r:
            assert r.status == 201
        # 100 parts of 300 bytes: about a third of what is sent is part headers, which wait in the
        # transport's buffer when the client stops reading; the rest waits for sendfile.
        ranges = "bytes=" + ",".join(f"{i * 10_000}-{i * 10_000 + 299}" for i in range(100))
        with urllib.request.urlopen(urllib.request.Request(f"{svc.url}{MODELS}/{model_id}/download",
                                                           headers={"Range": ranges}), timeout=30) as r:
            assert r.status == 206
            response_size = len(r.read()) + 300  # and a head
        one = request_bytes("GET", f"{MODELS}/{model_id}/download", [("Range", ranges)]
                            ).replace(b"Connection: close\r\n", b"")
        socks = []
        try:
            for i in range(8):
                s = socket.create_connection(("127.0.0.1", svc.port))
                s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
                s.setblocking(False)
                socks.append(s)
            backlog = {s: one * (1500 // 8 + (i < 1500 % 8)) for i, s in enumerate(socks)}
            last: list = []
            steady = 0

            def stalled() -> bool:
                nonlocal steady, last
                for s, left in list(backlog.items()):
                    with contextlib.suppress(BlockingIOError):
                        backlog[s] = left[s.send(left):]
                now = [[_unread_bytes(s) for s in socks], _send_queues(svc.port)]
                steady = steady + 1 if now == last and len(now[1]) == 8 else 0
                last = now
                return steady >= 10  # no byte moved for a second

            wait_for(stalled, 60, "the service to stop sending to clients that do not read", interval=0.1)
            # Stuck half-way, not done: every client has far less than its 187 answers.
            assert sum(last[0]) + sum(last[1]) < 8 * 187 * response_size / 2
            before, t0 = cpu_seconds(svc), time.monotonic()
            wait_for(lambda: time.monotonic() - t0 >= 3, 4, "a 3 s measurement window")
            share = (cpu_seconds(svc) - before) / (time.monotonic() - t0)
            print(f"\nservice CPU with 8 clients holding unread range requests: {share * 100:.1f}% of a core")
            assert share < 0.05
        finally:
            for s in socks:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                s.close()
        wait_for(lambda: not [c for c in psutil.Process(svc.pid).net_connections("tcp")
                              if c.status == psutil.CONN_ESTABLISHED], 15, "the service to see the clients gone")
        assert health_ok(svc)
        log = svc.log()
        assert "Traceback" not in log and "unhandled error" not in log, log[-3000:]


# ---------------------------------------------------------------------------
# 14. gc never collects an upload in progress
# ---------------------------------------------------------------------------

def _gc(svc_env: dict[str, str], *args: str) -> str:
    proc = subprocess.run([sys.executable, "-m", "app", "gc", *args], cwd=REPO, env={**os.environ, **svc_env},
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


async def test_gc_leaves_a_live_stalled_upload_alone(request, backend, tmp_path):
    with service_on(request, backend, tmp_path, "gclive", BODY_TIMEOUT="300") as (svc, data_dir, mongo, db):
        env = {"DATA_DIR": str(data_dir), "MONGODB_URL": mongo.url if mongo else "", "MONGODB_DB": db or "x"}
        model_id = register(svc)
        data = os.urandom(10 * MIB)
        reader, writer = await asyncio.open_connection("127.0.0.1", svc.port)
        try:
            writer.write(request_bytes("PUT", f"{MODELS}/{model_id}/upload", [], content_length=len(data))
                         + data[:5 * MIB])
            await writer.drain()
            await async_wait_for(lambda: temp_state(data_dir, mongo, db) >= 4 * MIB, 20, "the upload's temp state")
            held = temp_state(data_dir, mongo, db)
            # An age of 0 makes every temp file and chunk old enough: only liveness can spare them.
            report = await asyncio.to_thread(_gc, env, "--min-age", "0s")
            assert temp_state(data_dir, mongo, db) >= held, f"gc removed a live upload's data:\n{report}"
            writer.write(data[5 * MIB:])
            await writer.drain()
            got, _ = await read_until_closed(reader, 30)
        finally:
            writer.transport.abort()
        (answer,) = parse_responses(got)
        assert answer.status == 201, answer
        with urllib.request.urlopen(f"{svc.url}{MODELS}/{model_id}/download", timeout=30) as r:
            assert hashlib.sha256(r.read()).hexdigest() == hashlib.sha256(data).hexdigest()
        # What a crashed upload leaves is still collected.
        if mongo is None:
            stray = data_dir / "tmp" / "crashed.part"
            stray.write_bytes(b"x" * 1000)
        else:
            from bson import ObjectId
            with mongo.sync_client() as c:
                c[db]["models.chunks"].insert_one({"files_id": ObjectId(), "n": 0, "data": b"x" * 1000})
        assert temp_state(data_dir, mongo, db) == 1000
        await asyncio.to_thread(_gc, env, "--min-age", "0s")
        assert temp_state(data_dir, mongo, db) == 0
