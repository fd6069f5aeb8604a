"""Load (issue 6): 200 concurrent clients against the service as a real process on 127.0.0.1.

Each client loops until the time is up, mixing metadata reads (list, search,
get, by-name), downloads (whole and ranged) and uploads (to fresh models, with
X-Checksum-Sha256; some as one multipart registration). Every status is
counted. Every downloaded body is checked against the content the test knows
(and its sha256 against X-File-Checksum); every upload's answer against what
was sent, and uploaded models join the pool later downloads draw from.

The run fails on any 5xx, any unexpected status, any checksum or content
mismatch, any connection error or timeout, or too few operations of a kind.

Duration: LOAD_SECONDS (default 60) on the embedded backend. The MongoDB run
is MONGO_LOAD_SECONDS (default 30, at most LOAD_SECONDS) with smaller files,
because the test server (FerretDB on SQLite) runs every chunk query as a scan
of the whole chunks collection; its speed says nothing about a real MongoDB.
Both together stay under about three minutes.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import random
import sqlite3
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import aiohttp
import pytest

from testkit.live_service import LiveService, service_on
from tests.conftest import BACKENDS

pytestmark = pytest.mark.slow

LOAD_SECONDS = float(os.environ.get("LOAD_SECONDS", "60"))
MONGO_LOAD_SECONDS = float(os.environ.get("MONGO_LOAD_SECONDS", str(min(30.0, LOAD_SECONDS))))
CLIENTS = 200
# Uploaded models join the download pool; only the latest this many, so the
# test's memory (it keeps every pooled file to compare against) stays bounded.
POOL_UPLOADS = 200
MODELS = "/api/v1/models"
KIB = 1024
MIB = 1024 * 1024


@dataclass(frozen=True)
class Profile:
    seconds: float
    seed_sizes: tuple[int, ...]  # files the run starts with
    upload_sizes: tuple[int, int]  # uploads draw a size in this range
    upload_share: float  # of all operations
    # Operations per second (of the run) that must at least have completed.
    min_rates: dict = field(default_factory=dict)


PROFILES = {
    "embedded": Profile(
        seconds=LOAD_SECONDS,
        seed_sizes=(0, 1, 1000, 255 * KIB, 255 * KIB + 1, MIB, 3 * MIB + 17, 8 * MIB),
        upload_sizes=(1, 256 * KIB),
        upload_share=0.15,
        min_rates={"metadata": 20, "download": 15, "upload": 5},
    ),
    "mongodb": Profile(
        seconds=MONGO_LOAD_SECONDS,
        seed_sizes=(0, 1, 1000, 64 * KIB, 255 * KIB + 1, 600 * KIB),
        upload_sizes=(1, 16 * KIB),
        upload_share=0.10,
        min_rates={"metadata": 4, "download": 3, "upload": 1},
    ),
}


@dataclass
class Known:
    model_id: str
    name: str
    version: str
    data: bytes
    sha256: str


@dataclass
class Tally:
    statuses: Counter = field(default_factory=Counter)  # (kind, operation, status)
    done: Counter = field(default_factory=Counter)  # kind -> completed operations
    connection_errors: Counter = field(default_factory=Counter)  # (operation, exception type)
    mismatches: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    bytes_checked: int = 0
    uploaded: int = 0


@dataclass
class Live:
    backend: str
    service: LiveService
    data_dir: Path
    mongo: object = None
    db_name: str | None = None

    def orphans(self) -> dict[str, set]:
        """Stored files no model refers to, models whose file is missing, and stray temp files or chunks."""
        if self.backend == "mongodb":
            return mongo_orphans(self.mongo, self.db_name)
        db = sqlite3.connect(f"file:{self.data_dir / 'registry.sqlite3'}?mode=ro", uri=True)
        try:
            referenced = {r[0] for r in db.execute("SELECT file_id FROM models WHERE file_id IS NOT NULL")}
            files = dict(db.execute("SELECT file_id, sha256 FROM files").fetchall())
        finally:
            db.close()
        blobs = {p.name for p in (self.data_dir / "blobs").rglob("*") if p.is_file()}
        return {"unreferenced files": set(files) - referenced, "missing files": referenced - set(files),
                "blobs without a files row": blobs - set(files.values()),
                "files rows without a blob": set(files.values()) - blobs,
                "temp files": {p.name for p in (self.data_dir / "tmp").iterdir()}}


def mongo_orphans(mongo, db_name: str) -> dict[str, set]:
    """Stored files no model refers to, models whose file is missing, and chunks without a files document."""
    with mongo.sync_client() as c:
        db = c[db_name]
        referenced = set(db["models"].distinct("file_metadata.file_id"))
        stored = set(db["models.files"].distinct("_id"))
        chunked = set(db["models.chunks"].distinct("files_id"))
    return {"unreferenced files": stored - referenced, "missing files": referenced - stored,
            "chunks without a file": chunked - stored}


@pytest.fixture(params=BACKENDS)
def live(request, tmp_path):
    backend = request.param
    # No upload caps: the 200 clients all come from 127.0.0.1 (one client to MAX_UPLOADS_PER_CLIENT),
    # and on the FerretDB test server uploads pile up past MAX_CONCURRENT_UPLOADS, whose 503s this
    # run would count as failures (the caps are tested in test_slow_clients.py).
    with service_on(request, backend, tmp_path, "t_load", LOG_LEVEL="WARNING", MAX_FILE_SIZE="64MB",
                    MONGODB_TIMEOUT_MS="5000", MAX_UPLOADS_PER_CLIENT="0", MAX_CONCURRENT_UPLOADS="0") \
            as (service, data_dir, mongo, db_name):
        yield Live(backend, service, data_dir, mongo, db_name)


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


async def _seed(session: aiohttp.ClientSession, base: str, sizes: tuple[int, ...]) -> list[Known]:
    pool = []
    for i, size in enumerate(sizes):
        name = f"load_seed_{i}"
        async with session.post(base + MODELS, json={"name": name, "algorithm": "load", "tags": ["seed"],
                                                     "metrics": {"accuracy": i / 10}}) as r:
            assert r.status == 201, await r.text()
            answer = await r.json()
        data = os.urandom(size)
        async with session.put(f"{base}{MODELS}/{answer['model_id']}/upload", data=data,
                               params={"filename": f"{name}.bin"}, headers={"X-Checksum-Sha256": sha(data)}) as r:
            assert r.status == 201, await r.text()
        pool.append(Known(answer["model_id"], name, answer["version"], data, sha(data)))
    return pool


class Client:
    """One of the concurrent clients; all share one session (one connection pool)."""

    def __init__(self, session: aiohttp.ClientSession, base: str, pool: list[Known], profile: Profile,
                 tally: Tally, rng: random.Random) -> None:
        self.session, self.base, self.pool, self.profile, self.tally, self.rng = \
            session, base, pool, profile, tally, rng

    def expect(self, kind: str, op: str, status: int, allowed: tuple[int, ...], detail: str = "") -> bool:
        self.tally.statuses[(kind, op, status)] += 1
        if status not in allowed:
            self.tally.unexpected.append(f"{op}: {status} {detail[:300]}")
            return False
        return True

    async def run(self, deadline: float) -> None:
        while time.monotonic() < deadline:
            r = self.rng.random()
            if r < self.profile.upload_share:
                kind, step = "upload", self.upload
            elif r < self.profile.upload_share + 0.40:
                kind, step = "download", self.download
            else:
                kind, step = "metadata", self.metadata
            try:
                await step()
                self.tally.done[kind] += 1
            except (aiohttp.ClientError, asyncio.TimeoutError, ConnectionError) as e:
                self.tally.connection_errors[(kind, type(e).__name__)] += 1

    # -- metadata ------------------------------------------------------------
    async def metadata(self) -> None:
        known = self.rng.choice(self.pool)
        choice = self.rng.randrange(4)
        if choice == 0:
            op, url, params = "list", self.base + MODELS, {"limit": "20", "sort": "-created_at"}
        elif choice == 1:
            op, url, params = "search", self.base + MODELS + "/search", {"q": "load_seed", "tags": "seed",
                                                                         "sort": "-metrics.accuracy"}
        elif choice == 2:
            op, url, params = "get", f"{self.base}{MODELS}/{known.model_id}", {}
        else:
            op, url, params = "by_name", f"{self.base}{MODELS}/by-name/{known.name}", {}
        async with self.session.get(url, params=params) as resp:
            body = await resp.read()
            if not self.expect("metadata", op, resp.status, (200,), body.decode(errors="replace")):
                return
            doc = await resp.json()
        if op in ("list", "search"):
            assert isinstance(doc["models"], list) and doc["pagination"]["total"] >= len(doc["models"])
            if op == "search" and len(doc["models"]) < min(len(self._seeds()), 10):
                self.tally.mismatches.append(f"search found {len(doc['models'])} of the seeded models")
        elif op == "get" and (doc["id"] != known.model_id or doc["file_metadata"]["checksum"] != "sha256:"
                              + known.sha256):
            self.tally.mismatches.append(f"get {known.model_id}: {doc['id']} {doc['file_metadata']}")
        elif op == "by_name" and doc["name"] != known.name:
            self.tally.mismatches.append(f"by-name {known.name}: got {doc['name']}")

    def _seeds(self) -> list[Known]:
        return [k for k in self.pool if k.name.startswith("load_seed_")]

    # -- downloads -----------------------------------------------------------
    async def download(self) -> None:
        known = self.rng.choice(self.pool)
        size = len(known.data)
        url = f"{self.base}{MODELS}/{known.model_id}/download"
        headers = {}
        span = None
        if size and self.rng.random() < 0.4:
            first = self.rng.randrange(size)
            last = min(size - 1, first + self.rng.randrange(1, 2 * MIB))
            span = (first, last)
            headers["Range"] = f"bytes={first}-{last}"
        op = "ranged" if span else "whole"
        async with self.session.get(url, headers=headers) as resp:
            h = hashlib.sha256()
            received = bytearray()
            async for block in resp.content.iter_chunked(256 * KIB):
                h.update(block)
                received += block
            if not self.expect("download", op, resp.status, (206,) if span else (200,), bytes(received[:300])
                               .decode(errors="replace")):
                return
            declared = resp.headers.get("X-File-Checksum")
            if declared != f"sha256:{known.sha256}":
                self.tally.mismatches.append(f"{known.model_id}: X-File-Checksum {declared}, uploaded {known.sha256}")
            if span is None:
                if h.hexdigest() != known.sha256 or len(received) != size:
                    self.tally.mismatches.append(
                        f"{known.model_id}: whole download has sha256 {h.hexdigest()} ({len(received)} bytes), "
                        f"X-File-Checksum {declared}")
            else:
                first, last = span
                expected_range = f"bytes {first}-{last}/{size}"
                if resp.headers.get("Content-Range") != expected_range or bytes(received) != known.data[first:last + 1]:
                    self.tally.mismatches.append(
                        f"{known.model_id}: range {first}-{last} answered {resp.headers.get('Content-Range')} "
                        f"with {len(received)} bytes that "
                        f"{'do not ' if bytes(received) != known.data[first:last + 1] else ''}match")
            self.tally.bytes_checked += len(received)

    # -- uploads -------------------------------------------------------------
    async def upload(self) -> None:
        lo, hi = self.profile.upload_sizes
        data = os.urandom(self.rng.randint(lo, hi))
        digest = sha(data)
        name = f"load_up_{uuid.uuid4().hex[:12]}"
        if self.rng.random() < 0.25:
            op = "register_with_file"
            form = aiohttp.FormData()
            form.add_field("metadata", f'{{"name": "{name}", "algorithm": "load", "tags": ["uploaded"]}}',
                           content_type="application/json")
            form.add_field("file", data, filename=f"{name}.bin", content_type="application/octet-stream")
            async with self.session.post(self.base + MODELS, data=form,
                                         headers={"X-Checksum-Sha256": digest}) as resp:
                text = await resp.text()
                if not self.expect("upload", op, resp.status, (201,), text):
                    return
                answer = await resp.json()
            model_id, version = answer["model_id"], answer["version"]
        else:
            op = "upload"
            async with self.session.post(self.base + MODELS, json={"name": name, "algorithm": "load",
                                                                   "tags": ["uploaded"]}) as resp:
                text = await resp.text()
                if not self.expect("upload", "register", resp.status, (201,), text):
                    return
                answer = await resp.json()
            model_id, version = answer["model_id"], answer["version"]
            async with self.session.put(f"{self.base}{MODELS}/{model_id}/upload", data=data,
                                        params={"filename": f"{name}.bin"},
                                        headers={"X-Checksum-Sha256": digest}) as resp:
                text = await resp.text()
                if not self.expect("upload", op, resp.status, (201,), text):
                    return
                fm = (await resp.json())["file_metadata"]
            if fm["checksum"] != f"sha256:{digest}" or fm["size_bytes"] != len(data):
                self.tally.mismatches.append(f"upload {model_id}: answered {fm['checksum']} {fm['size_bytes']}, "
                                             f"sent sha256:{digest} {len(data)}")
                return
        self.pool.append(Known(model_id, name, version, data, digest))
        self.tally.uploaded += 1
        seeds = len(self.profile.seed_sizes)
        if len(self.pool) > seeds + POOL_UPLOADS:
            del self.pool[seeds:seeds + len(self.pool) - seeds - POOL_UPLOADS]


async def _run_load(base: str, profile: Profile) -> tuple[Tally, float]:
    timeout = aiohttp.ClientTimeout(total=90, sock_connect=30)
    connector = aiohttp.TCPConnector(limit=CLIENTS, limit_per_host=CLIENTS)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        pool = await _seed(session, base, profile.seed_sizes)
        tally = Tally()
        started = time.monotonic()
        deadline = started + profile.seconds
        clients = [Client(session, base, pool, profile, tally, random.Random(i)) for i in range(CLIENTS)]
        await asyncio.gather(*(c.run(deadline) for c in clients))
        elapsed = time.monotonic() - started
        # Afterwards every model the run uploaded is still whole.
        for known in pool[-20:]:
            async with session.get(f"{base}{MODELS}/{known.model_id}/download") as resp:
                if resp.status != 200 or sha(await resp.read()) != known.sha256:
                    tally.mismatches.append(f"after the run, {known.model_id} is not what was uploaded")
        async with session.get(base + "/health") as resp:
            assert resp.status == 200, await resp.text()
    return tally, elapsed


def _report(tally: Tally, elapsed: float) -> str:
    lines = [f"{elapsed:.1f} s, {sum(tally.done.values())} operations, {tally.bytes_checked / 1e6:.1f} MB verified"]
    for kind in ("metadata", "download", "upload"):
        lines.append(f"  {kind}: {tally.done[kind]} ({tally.done[kind] / elapsed:.1f}/s)")
    for (kind, op, status), n in sorted(tally.statuses.items()):
        lines.append(f"    {kind}/{op} {status}: {n}")
    for (kind, exc), n in sorted(tally.connection_errors.items()):
        lines.append(f"  connection error {kind} {exc}: {n}")
    return "\n".join(lines)


def test_200_concurrent_clients_mixing_reads_downloads_and_uploads(live):
    check_load(live.service.url, PROFILES[live.backend], live.orphans, live.service.log)


def check_load(base: str, profile: Profile, orphans: Callable[[], dict[str, set]], logs: Callable[[], str]) -> None:
    """Run the load against ``base`` and check everything the load test checks.

    ``orphans`` reads the store's inconsistencies (see Live.orphans), ``logs`` the service's log(s).
    """
    tally, elapsed = asyncio.run(_run_load(base, profile))
    log = logs()
    report = _report(tally, elapsed)
    print("\n" + report)
    if " ERROR " in log:
        first = log.index(" ERROR ")
        report += "\nservice log from the first error:\n" + log[max(0, log.rfind("\n", 0, first)):][:8000]
    # The store is consistent afterwards: every stored file belongs to a model and every model's file is
    # there (checked whatever else failed, so a failed request that leaked its file shows up too).
    deadline = time.monotonic() + 30
    while any(orphans().values()) and time.monotonic() < deadline:
        time.sleep(0.5)
    inconsistent = {k: sorted(map(str, v))[:5] for k, v in orphans().items() if v}
    if inconsistent:
        report += f"\nstore inconsistent after the run: {inconsistent}"

    server_errors = {k: n for k, n in tally.statuses.items() if k[2] >= 500}
    assert not server_errors, f"5xx answers: {server_errors}\n{report}"
    assert not tally.unexpected, f"unexpected answers ({len(tally.unexpected)}): {tally.unexpected[:10]}\n{report}"
    assert not tally.connection_errors, f"connection errors: {dict(tally.connection_errors)}\n{report}"
    assert not tally.mismatches, f"checksum/content mismatches ({len(tally.mismatches)}): " \
                                 f"{tally.mismatches[:10]}\n{report}"
    for kind, rate in profile.min_rates.items():
        assert tally.done[kind] >= rate * profile.seconds, \
            f"only {tally.done[kind]} {kind} operations in {elapsed:.0f} s (want {rate}/s)\n{report}"
    for op in ("list", "search", "get", "by_name"):
        assert tally.statuses[("metadata", op, 200)] > 0, f"no successful {op}\n{report}"
    assert tally.statuses[("download", "whole", 200)] > 0 and tally.statuses[("download", "ranged", 206)] > 0, report
    assert tally.statuses[("upload", "upload", 201)] > 0 and tally.statuses[("upload", "register_with_file", 201)] > 0
    assert "Traceback" not in log and "unhandled error" not in log, log[-5000:]
    assert not inconsistent, f"the store is inconsistent after the run: {inconsistent}"
