"""Many replicas, one MongoDB (issue 16): three separate service processes on one database, nginx in front.

testkit.replicas starts them (each its own ``python -m app serve`` on its own
127.0.0.1 port, LEASE_TTL=3) and nginx as a round-robin balancer. Every case
runs through each replica directly (to say which one streams and which one
writes) and through the balancer (the way clients meet a deployment):

- a file replaced, or its model deleted, through one replica while another streams it to a slow
  reader: the download completes with the old bytes, the old content stays while it streams and is
  gone soon after;
- a replica SIGKILLed while it streams a file that was then replaced: its leases expire and
  ``python -m app gc`` removes the content it was holding;
- 20 concurrent uploads to one model spread over the replicas: the model points at one of them,
  nothing is left unreferenced, nothing referenced is gone;
- download counts and statistics exact across replicas;
- a resumable upload session started on one replica and finished on another;
- tests/test_load.py's client mix through the balancer for LOAD_SECONDS, zero 5xx.

A slow reader is a raw socket with a small receive buffer that the test reads
when it chooses, so the server is still sending while the test acts.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import os
import re
import socket
import subprocess
import sys
import time
import uuid
from collections import Counter
from datetime import datetime, timezone
from urllib.parse import urlsplit

import aiohttp
import pytest
from bson import ObjectId

from testkit.mongo_server import REPO
from testkit.replicas import BalancerUnavailable, Replicas
from tests.support.prerequisites import cannot_run
from tests.test_load import LOAD_SECONDS, PROFILES, check_load, mongo_orphans

pytestmark = [pytest.mark.slow, pytest.mark.mongo]

MODELS = "/api/v1/models"
UPLOADS = "/api/v1/uploads"
LEASE_TTL = 3
# Bigger than every buffer between the service and a reader that stopped reading, so the service is
# still reading it from GridFS: the service's socket send buffer (autotuned, at most net.ipv4.tcp_wmem's
# 4 MB here), the reader's 16 KB; through nginx also nginx's 64 KB towards the reader and its receive
# buffer from the service (autotuned to the rate nginx drains it, which is the stalled reader's).
BIG = 12 * 2**20
# How long anything that should happen "soon" may take, a few lease periods.
SOON = 5 * LEASE_TTL


@pytest.fixture(scope="module")
def module_cluster(request, tmp_path_factory):
    mongo = request.getfixturevalue("mongo")
    db_name = f"t_replicas_{uuid.uuid4().hex[:8]}"
    try:
        replicas = Replicas(3, mongo.url, db_name, tmp_path_factory.mktemp("replicas"), {"MAX_FILE_SIZE": "64MB"},
                            balancer_sndbuf="64k")
    except BalancerUnavailable as e:
        cannot_run(str(e))
    replicas.start()
    replicas.mongo, replicas.db_name = mongo, db_name
    try:
        yield replicas
    finally:
        replicas.stop()
        if mongo.server is None or mongo.server.running:
            with mongo.sync_client() as c:
                c.drop_database(db_name)


@pytest.fixture
def cluster(module_cluster):
    """The module's replicas, each running (a test that killed or stopped one and failed left it so)."""
    stopped = [i for i in range(len(module_cluster.replicas)) if not module_cluster.running(i)]
    module_cluster.restart(*stopped)
    return module_cluster


@pytest.fixture
def db(cluster):
    with cluster.mongo.sync_client() as c:
        yield c[cluster.db_name]


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def oid(file_id: str):
    return ObjectId(file_id) if ObjectId.is_valid(file_id) else file_id


def stored(db, file_id: str) -> tuple[bool, int]:
    """(the GridFS files document exists, how many chunks it has)."""
    key = oid(file_id)
    return db["models.files"].find_one({"_id": key}, {"_id": 1}) is not None, \
        db["models.chunks"].count_documents({"files_id": key})


async def eventually(condition, timeout: float, interval: float = 0.1) -> bool:
    """Poll ``condition`` (sync, or a coroutine function) until it is truthy or ``timeout`` passes; whether it was."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return True
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(interval)


async def wait_for(condition, timeout: float, what, interval: float = 0.1) -> None:
    """``eventually``, or fail with ``what()`` (evaluated then)."""
    if not await eventually(condition, timeout, interval):
        pytest.fail(f"after {timeout:g} s: {what()}")


async def json_answer(resp: aiohttp.ClientResponse, status: int) -> dict:
    text = await resp.text()
    assert resp.status == status, f"{resp.method} {resp.url}: {resp.status} {text[:500]}"
    return await resp.json()


async def register(http: aiohttp.ClientSession, base: str, name: str) -> str:
    async with http.post(base + MODELS, json={"name": name, "algorithm": "replicas"}) as r:
        return (await json_answer(r, 201))["model_id"]


async def upload(http: aiohttp.ClientSession, base: str, model_id: str, data: bytes) -> dict:
    async with http.put(f"{base}{MODELS}/{model_id}/upload", data=data, params={"filename": "m.bin"},
                        headers={"X-Checksum-Sha256": sha(data)}) as r:
        return (await json_answer(r, 201))["file_metadata"]


async def model(http: aiohttp.ClientSession, base: str, model_id: str) -> dict:
    async with http.get(f"{base}{MODELS}/{model_id}") as r:
        return await json_answer(r, 200)


async def download(http: aiohttp.ClientSession, base: str, model_id: str) -> bytes:
    async with http.get(f"{base}{MODELS}/{model_id}/download") as r:
        body = await r.read()
        assert r.status == 200, f"download from {base}: {r.status} {body[:300]!r}"
        return body


class SlowReader:
    """A GET on a raw socket with a small receive buffer; the body is read only when the test says."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, status: int,
                 headers: dict[str, str]) -> None:
        self.reader, self.writer, self.status, self.headers = reader, writer, status, headers
        self.body = bytearray()

    @classmethod
    async def get(cls, base: str, path: str) -> "SlowReader":
        host, port = urlsplit(base).hostname, urlsplit(base).port
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16 * 1024)
        sock.setblocking(False)
        await asyncio.wait_for(asyncio.get_running_loop().sock_connect(sock, (host, port)), 10)
        reader, writer = await asyncio.open_connection(sock=sock, limit=16 * 1024)
        writer.write(f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nConnection: close\r\n\r\n".encode())
        head = (await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 30)).decode("latin-1")
        lines = head.split("\r\n")
        headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:] if line)}
        return cls(reader, writer, int(lines[0].split()[1]), headers)

    @property
    def length(self) -> int:
        return int(self.headers["content-length"])

    async def read(self, n: int) -> None:
        self.body += await asyncio.wait_for(self.reader.readexactly(n), 30)

    async def rest(self, timeout: float = 120) -> bytes:
        """Everything until the server closes (or resets) the connection."""
        async def drain():
            while block := await self.reader.read(256 * 1024):
                self.body += block
        try:
            await asyncio.wait_for(drain(), timeout)
        except ConnectionError:
            pass
        finally:
            self.writer.close()
        return bytes(self.body)


# -- (a) replaced or deleted on one replica while another streams it ------------------------------


@pytest.mark.parametrize("change", ["replace", "delete"])
@pytest.mark.parametrize("route", ["direct", "balancer"])
async def test_content_changed_on_one_replica_while_another_streams_it(cluster, db, change, route):
    # direct: replica 1 streams, replica 0 changes. balancer: both through nginx, round-robin.
    reader_base, writer_base = (cluster.urls[1], cluster.urls[0]) if route == "direct" else (cluster.url, cluster.url)
    old, new = os.urandom(BIG), os.urandom(300_000)
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as http:
        model_id = await register(http, cluster.url, f"stream-{change}-{route}")
        fm = await upload(http, cluster.url, model_id, old)
        file_id = fm["file_id"]
        whole = (True, -(-len(old) // fm["chunk_size"]))
        assert stored(db, file_id) == whole

        slow = await SlowReader.get(reader_base, f"{MODELS}/{model_id}/download")
        assert slow.status == 200 and slow.length == len(old), (slow.status, slow.headers)
        await slow.read(64 * 1024)
        if change == "replace":
            await upload(http, writer_base, model_id, new)
        else:
            async with http.delete(f"{writer_base}{MODELS}/{model_id}") as r:
                assert r.status in (200, 204), await r.text()

        # While the reader holds the stream (longer than a lease lives unrenewed), the old content stays.
        seen = []
        held_until = time.monotonic() + 1.5 * LEASE_TTL
        while time.monotonic() < held_until:
            seen.append(stored(db, file_id))
            await asyncio.sleep(0.2)
        body = await slow.rest()
        if route == "balancer":
            # Round-robin sent the stream and the change to different replicas (nginx logs a request when
            # it ends: the first download of the model logged is the slow one).
            await wait_for(lambda: any(r[3] == f"{MODELS}/{model_id}/download" for r in cluster.balancer.requests()),
                           10, lambda: "nginx did not log the stream")
            mine = [r for r in cluster.balancer.requests() if r[3].startswith(f"{MODELS}/{model_id}")]
            stream = next(r for r in mine if r[2] == "GET" and r[3].endswith("/download"))
            changes = [r for r in mine[:mine.index(stream)] if r[2] in ("PUT", "DELETE")]
            assert changes[-1][1] != stream[1], f"nginx sent the stream and the change to one replica: {mine}"

        assert len(body) == len(old) and sha(body) == sha(old), \
            f"the streaming replica's download broke off: {len(body)} of {len(old)} bytes" \
            f"{', matching' if old.startswith(body) else ', NOT matching'} the old content"
        assert all(s == whole for s in seen), \
            f"the old content was deleted while it streamed: (files doc, chunks) {sorted(Counter(seen).items())}"
        # Afterwards it goes (the last reader's lease dropped completes the release).
        await wait_for(lambda: stored(db, file_id) == (False, 0), SOON,
                       lambda: f"old content {file_id} still stored after its last reader finished: "
                               f"{stored(db, file_id)}")
        if change == "replace":
            for base in [*cluster.urls, cluster.url]:
                assert sha(await download(http, base, model_id)) == sha(new), base
        else:
            for base in [*cluster.urls, cluster.url]:
                async with http.get(f"{base}{MODELS}/{model_id}") as r:
                    assert r.status == 404, (base, r.status)


# -- (b) a replica killed while it streams ----------------------------------------------------------


async def test_a_killed_replicas_leases_expire_and_gc_removes_what_it_held(cluster, db):
    old, new = os.urandom(BIG), os.urandom(1000)

    def live_leases() -> int:
        return db["content_leases"].count_documents(
            {"file_id": {"$in": [file_id, oid(file_id)]}, "until": {"$gt": datetime.now(timezone.utc)}})

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as http:
        model_id = await register(http, cluster.url, "killed-while-streaming")
        file_id = (await upload(http, cluster.urls[0], model_id, old))["file_id"]
        slow = await SlowReader.get(cluster.urls[1], f"{MODELS}/{model_id}/download")
        assert slow.status == 200, slow.headers
        await slow.read(64 * 1024)
        await upload(http, cluster.urls[0], model_id, new)
        try:
            # The other replicas would complete the release once replica 1's lease lapses
            # (release_pending every LEASE_TTL); stopped first, only gc can: that is what this is about.
            cluster.stop_replica(0)
            cluster.stop_replica(2)
            held, leases = stored(db, file_id), live_leases()
            cluster.kill(1)
            after_kill = stored(db, file_id)
            body = await slow.rest(30)
            assert len(body) < len(old)  # it was killed mid-stream
            assert held[0] and after_kill[0], \
                f"the replaced content went while replica 1 streamed it: before the kill {held}, after {after_kill}"
            assert leases > 0, "no live lease document for the content replica 1 was streaming"
            # Replica 1's lease lapses within LEASE_TTL of its last renewal; nothing else removes the content.
            await wait_for(lambda: live_leases() == 0, 3 * LEASE_TTL, lambda: "replica 1's lease did not expire")
            assert stored(db, file_id)[0], "the content went before gc ran, with no replica running"
            env = {**os.environ, "MONGODB_URL": cluster.mongo.url, "MONGODB_DB": cluster.db_name, "LEASE_TTL": "3"}
            gc = subprocess.run([sys.executable, "-m", "app", "gc", "--min-age", "0s"], cwd=REPO, env=env,
                                capture_output=True, text=True, timeout=120)
            assert gc.returncode == 0, gc.stdout + gc.stderr
            assert stored(db, file_id) == (False, 0), f"gc left the killed replica's content: {gc.stdout}"
        finally:
            cluster.restart(*(i for i in range(3) if not cluster.running(i)))
        assert sha(await download(http, cluster.url, model_id)) == sha(new)


# -- (c) 20 concurrent uploads to one model ------------------------------------------------------------


async def test_concurrent_uploads_to_one_model_over_all_replicas_leave_one_and_nothing_stray(cluster, db):
    contents = [os.urandom(200_000 + i) for i in range(20)]
    by_sum = {sha(c): c for c in contents}
    bases = [*cluster.urls, cluster.url]
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=180)) as http:
        model_id = await register(http, cluster.url, "twenty-uploads")
        answers = await asyncio.wait_for(asyncio.gather(
            *(upload(http, bases[i % len(bases)], model_id, c) for i, c in enumerate(contents))), 180)
        assert {a["checksum"] for a in answers} == {f"sha256:{s}" for s in by_sum}
        final = {(await model(http, base, model_id))["file_metadata"]["checksum"] for base in bases}
        assert len(final) == 1, f"replicas disagree on the model's file: {final}"
        [checksum] = final
        assert checksum.removeprefix("sha256:") in by_sum
        for base in bases:
            assert sha(await download(http, base, model_id)) == checksum.removeprefix("sha256:"), base
        # The 19 replaced contents go once their claims settle; nothing a model refers to goes.
        await wait_for(lambda: not any(mongo_orphans(cluster.mongo, cluster.db_name).values()), SOON,
                       lambda: f"store inconsistent: {mongo_orphans(cluster.mongo, cluster.db_name)}", interval=0.5)
        # Every model in the database still downloads whole, from every replica.
        docs = list(db["models"].find({"file_metadata": {"$ne": None}}, {"_id": 1, "file_metadata.checksum": 1}))
        for doc in docs:
            for base in bases:
                body = await download(http, base, str(doc["_id"]))
                assert f"sha256:{sha(body)}" == doc["file_metadata"]["checksum"], (base, doc["_id"])
    env = {**os.environ, "MONGODB_URL": cluster.mongo.url, "MONGODB_DB": cluster.db_name, "LEASE_TTL": "3"}
    gc = subprocess.run([sys.executable, "-m", "app", "gc", "--min-age", "0s", "--dry-run"], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=120)
    assert gc.returncode == 0, gc.stdout + gc.stderr
    # Content only: expired leases and such bookkeeping may be gc's to remove too.
    content = [line for line in gc.stdout.splitlines() if re.match(r"would remove (file |\d+ orphan chunks)", line)]
    assert not content, f"gc would still remove content:\n{gc.stdout}"


# -- (d) download counts and statistics -----------------------------------------------------------------


async def test_download_counts_and_statistics_are_exact_across_replicas(cluster):
    n = 90
    data = os.urandom(20_000)
    bases = [*cluster.urls, cluster.url]
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120),
                                     connector=aiohttp.TCPConnector(limit=60)) as http:
        model_id = await register(http, cluster.url, "counted")
        await upload(http, cluster.url, model_id, data)
        before = await settled_stats(http, cluster.urls)
        bodies = await asyncio.wait_for(asyncio.gather(
            *(download(http, bases[i % len(bases)], model_id) for i in range(n))), 120)
        assert all(b == data for b in bodies)

        async def counts():
            return [(await model(http, base, model_id))["download_count"] for base in cluster.urls]

        async def exact():
            return await counts() == [n] * len(cluster.urls)
        # Counted as a download ends: allow the last ones a moment, then it must be exact everywhere.
        await eventually(exact, SOON, interval=0.5)
        seen = await counts()
        assert seen == [n] * len(cluster.urls), f"{n} downloads over 3 replicas counted as {seen}"
        for base in cluster.urls:
            after = await stats(http, base)
            got = {k: after[k] - before[base][k] for k in after}
            assert got == {"total_downloads": n, "downloads_last_24_hours": n}, (base, got)


async def settled_stats(http: aiohttp.ClientSession, bases: list[str]) -> dict[str, dict]:
    """Each replica's statistics once every replica shows the same and they stay so for a second (the
    downloads of earlier tests may still be being counted)."""
    last: dict[str, dict] = {}

    async def steady():
        nonlocal last
        now = {base: await stats(http, base) for base in bases}
        same = len({tuple(v.items()) for v in now.values()}) == 1 and now == last
        last = now
        return same
    await wait_for(steady, SOON, lambda: f"statistics keep changing or differ between replicas: {last}", interval=1.0)
    return last


async def stats(http: aiohttp.ClientSession, base: str) -> dict:
    async with http.get(base + "/api/v1/statistics") as r:
        s = await json_answer(r, 200)
    return {"total_downloads": s["total_downloads"],
            "downloads_last_24_hours": s["recent_activity"]["downloads_last_24_hours"]}


# -- (e) an upload session over several replicas -----------------------------------------------------------


async def test_an_upload_session_started_on_one_replica_finishes_on_another(cluster):
    data = os.urandom(3 * 2**20 + 11)
    parts = [(0, 2**20), (2**20, 2 * 2**20), (2 * 2**20, len(data))]
    a, b, c = cluster.urls
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as http:
        async with http.post(a + UPLOADS, json={"size_bytes": len(data), "checksum": f"sha256:{sha(data)}"}) as r:
            sid = (await json_answer(r, 202))["id"]
        for base, (start, end) in [(b, parts[0]), (cluster.url, parts[1])]:
            async with http.patch(f"{base}{UPLOADS}/{sid}", data=data[start:end],
                                  headers={"Content-Range": f"bytes {start}-{end - 1}/{len(data)}"}) as r:
                assert (await json_answer(r, 202))["offset"] == end, base
        for base in (a, b, c):
            async with http.get(f"{base}{UPLOADS}/{sid}") as r:
                assert (await json_answer(r, 200))["offset"] == parts[1][1], base
        start, end = parts[2]
        async with http.put(f"{c}{UPLOADS}/{sid}", params={"digest": f"sha256:{sha(data)}"}, data=data[start:],
                            headers={"Content-Range": f"bytes {start}-{end - 1}/{len(data)}"}) as r:
            assert await json_answer(r, 201) == {"digest": f"sha256:{sha(data)}", "size_bytes": len(data)}
        for base in (a, b, c):
            async with http.get(f"{base}{UPLOADS}/{sid}") as r:
                assert r.status == 404, (base, r.status)
        model_id = await register(http, a, "from-a-session")
        async with http.post(f"{b}{MODELS}/{model_id}/upload", params={"digest": f"sha256:{sha(data)}"}) as r:
            assert (await json_answer(r, 201))["file_metadata"]["checksum"] == f"sha256:{sha(data)}"
        for base in [*cluster.urls, cluster.url]:
            assert sha(await download(http, base, model_id)) == sha(data), base


# -- (f) the seed-style load through the balancer ------------------------------------------------------------


def test_seed_style_load_through_the_balancer(cluster):
    profile = dataclasses.replace(PROFILES["mongodb"], seconds=LOAD_SECONDS)
    before = len(cluster.balancer.requests())
    # What the tests before it left behind (each of those checks its own) is not this run's doing.
    left = mongo_orphans(cluster.mongo, cluster.db_name)

    logged = [len(r.log()) for r in cluster.replicas]

    def orphans():
        return {k: v - left[k] for k, v in mongo_orphans(cluster.mongo, cluster.db_name).items()}

    def logs():
        return "\n".join(f"--- replica {i} ---\n{r.log()[logged[i]:]}" for i, r in enumerate(cluster.replicas))
    check_load(cluster.url, profile, orphans, logs)
    spread = Counter(r[1] for r in cluster.balancer.requests()[before:])
    assert len(spread) == 3 and min(spread.values()) > 0.2 * sum(spread.values()), \
        f"the balancer did not spread the load over the replicas: {dict(spread)}"
