"""Several service processes on one DATA_DIR (embedded backend): what one does, the others respect.

Three separate ``python -m app serve`` processes share a data folder, as
``--workers`` does (and a WORKERS=2 service at the end): a download streaming
through one keeps its content while another replaces or deletes the model,
the content goes once the download is done (not before), and downloads
through all of them are counted exactly.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import signal
import sqlite3
import subprocess
import sys
import time
from contextlib import closing
from datetime import datetime
from pathlib import Path

import aiohttp
import pytest

from testkit.live_service import processes_on_one_data_dir
from testkit.mongo_server import REPO, free_port
from tests.snapshot_helpers import file_list, tar_of
from tests.support import deadlines

MODELS = "/api/v1/models"
BIG = 32 * 1024 * 1024 + 11  # far beyond what socket buffers hold: the stream is mid-body while paused
TIMEOUT = aiohttp.ClientTimeout(total=120)


@pytest.fixture(scope="module")
def services(tmp_path_factory):
    """Three service processes on one DATA_DIR. BLOB_GRACE=0: a deleted snapshot's blobs are not kept."""
    work = tmp_path_factory.mktemp("shared")
    with processes_on_one_data_dir(work, 3, BLOB_GRACE="0") as started:
        yield started, work / "data"


async def _json(resp: aiohttp.ClientResponse, status: int):
    body = await resp.json()
    assert resp.status == status, body
    return body


async def _register(session, url: str, name: str) -> str:
    async with session.post(f"{url}{MODELS}", json={"name": name, "algorithm": "x"}) as resp:
        return (await _json(resp, 201))["model_id"]


async def _upload(session, url: str, model_id: str, data: bytes) -> None:
    async with session.put(f"{url}{MODELS}/{model_id}/upload?filename=m.bin", data=data) as resp:
        await _json(resp, 201)


async def _blob_stored(session, url: str, data: bytes) -> bool:
    async with session.head(f"{url}/api/v1/blobs/sha256:{hashlib.sha256(data).hexdigest()}") as resp:
        assert resp.status in (200, 404)
        return resp.status == 200


def _on_disk(data_dir: Path, data: bytes) -> bool:
    sha = hashlib.sha256(data).hexdigest()
    return (data_dir / "blobs" / sha[:2] / sha).exists()


async def _wait_gone(session, urls: list[str], data_dir: Path, data: bytes) -> None:
    deadline = time.monotonic() + 10
    while any([await _blob_stored(session, url, data) for url in urls]) or _on_disk(data_dir, data):
        assert time.monotonic() < deadline, "released content is still stored after its last reader finished"
        await asyncio.sleep(0.05)


async def _paused_download(session, url: str, expected_size: int):
    """Start a download, read its first MiB and stop reading (a slow client): the response, the bytes so far."""
    resp = await session.get(url, timeout=TIMEOUT)
    assert resp.status == 200
    assert int(resp.headers["Content-Length"]) == expected_size
    return resp, await resp.content.readexactly(1024 * 1024)


async def _replace_while_streaming(services, data_dir: Path) -> None:
    (a, b, c), urls = services, [s.url for s in services]
    old, new = os.urandom(BIG), os.urandom(BIG // 2)
    async with aiohttp.ClientSession(timeout=TIMEOUT) as session:
        model_id = await _register(session, a.url, "replaced")
        await _upload(session, a.url, model_id, old)
        resp, first = await _paused_download(session, f"{b.url}{MODELS}/{model_id}/download", len(old))
        try:
            await _upload(session, a.url, model_id, new)  # replaced through A while B streams
            # Not before: B's reader holds the old content, whichever process looks.
            held = [await _blob_stored(session, url, old) for url in urls] + [_on_disk(data_dir, old)]
            rest = await resp.read()
        finally:
            resp.release()
        assert hashlib.sha256(first + rest).digest() == hashlib.sha256(old).digest()
        assert held == [True] * 4
        # Gone afterwards: B's last reader dropped its lease, which completed A's release.
        await _wait_gone(session, urls, data_dir, old)
        async with session.get(f"{c.url}{MODELS}/{model_id}/download") as fresh:
            assert fresh.status == 200 and await fresh.read() == new


def test_replaced_through_one_process_while_another_streams(services):
    started, data_dir = services
    asyncio.run(_replace_while_streaming(started, data_dir))


def test_snapshot_deleted_through_one_process_while_another_streams_its_tar(services):
    """The tar reads each file when its turn comes: the deleted version's later files must still be there."""
    (a, b, c), data_dir = services
    files = {"a.bin": os.urandom(12 * 1024 * 1024), "b.bin": os.urandom(12 * 1024 * 1024 + 5),
             "c.bin": os.urandom(12 * 1024 * 1024 + 9)}

    async def scenario():
        async with aiohttp.ClientSession(timeout=TIMEOUT) as session:
            for data in files.values():
                sha = hashlib.sha256(data).hexdigest()
                async with session.put(f"{a.url}/api/v1/blobs/sha256:{sha}", data=data) as resp:
                    await _json(resp, 201)
            async with session.post(f"{a.url}{MODELS}", json={"name": "snap", "algorithm": "x",
                                                               "files": file_list(files)}) as resp:
                model_id = (await _json(resp, 201))["model_id"]
            async with session.get(f"{a.url}{MODELS}/{model_id}") as resp:
                created = (await _json(resp, 200))["created_at"]
            # The tar's mtime: the version's creation, in whole seconds.
            expected = tar_of(files, int(datetime.fromisoformat(created).timestamp()))
            resp, first = await _paused_download(session, f"{b.url}{MODELS}/{model_id}/download", len(expected))
            try:
                async with session.delete(f"{a.url}{MODELS}/{model_id}") as deleted:
                    await _json(deleted, 200)
                held = [await _blob_stored(session, c.url, data) for data in files.values()]
                rest = await resp.read()
            finally:
                resp.release()
            assert hashlib.sha256(first + rest).digest() == hashlib.sha256(expected).digest()
            assert held == [True] * 3
            for data in files.values():
                await _wait_gone(session, [a.url, b.url, c.url], data_dir, data)
            async with session.get(f"{b.url}{MODELS}/{model_id}/download") as gone:
                assert gone.status == 404

    asyncio.run(scenario())


def _leases_on(data_dir: Path, data: bytes) -> int:
    """Lease records on this content, whichever process holds them."""
    with closing(sqlite3.connect(data_dir / "registry.sqlite3")) as db:
        return db.execute("SELECT count(*) FROM content_leases l JOIN files f ON f.file_id = l.file_id"
                          " WHERE f.sha256 = ?", (hashlib.sha256(data).hexdigest(),)).fetchone()[0]


def test_released_through_one_process_just_after_another_downloaded_it_goes_when_its_linger_ends(services):
    """B's back-to-back downloads share one lease, which lingers (1 s) after the last: A's release right
    after is held back by it, and completed by B's drop when the linger ends."""
    (a, b, c), data_dir = services
    old = os.urandom(2 * 1024 * 1024 + 3)

    async def scenario():
        async with aiohttp.ClientSession(timeout=TIMEOUT) as session:
            model_id = await _register(session, a.url, "lingered")
            await _upload(session, a.url, model_id, old)
            for _ in range(5):
                async with session.get(f"{b.url}{MODELS}/{model_id}/download") as resp:
                    assert resp.status == 200 and await resp.read() == old
            # These checks follow the last download within milliseconds, far inside its 1 s linger.
            leases_after_downloads = _leases_on(data_dir, old)
            await _upload(session, a.url, model_id, os.urandom(1000))  # A releases the old content
            held = [_on_disk(data_dir, old), await _blob_stored(session, c.url, old)]
            released = time.monotonic()
            await _wait_gone(session, [a.url, b.url, c.url], data_dir, old)
            return leases_after_downloads, held, time.monotonic() - released

    leases_after_downloads, held, waited = asyncio.run(scenario())
    assert leases_after_downloads == 1, "B's downloads did not share one lingering lease"
    assert held == [True, True], "A's release did not wait for B's lingering lease"
    assert waited < 5


async def _download_everywhere(urls: list[str], model_id: str, data: bytes, per_url: int) -> None:
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(timeout=TIMEOUT, connector=connector) as session:
        async def one(url: str) -> None:
            async with session.get(f"{url}{MODELS}/{model_id}/download") as resp:
                assert resp.status == 200 and await resp.read() == data

        await asyncio.gather(*(one(url) for url in urls for _ in range(per_url)))


async def _counts(session, url: str, model_id: str) -> tuple[int, int, int]:
    async with session.get(f"{url}{MODELS}/{model_id}") as resp:
        model = await _json(resp, 200)
    async with session.get(f"{url}/api/v1/statistics") as resp:
        stats = await _json(resp, 200)
    return model["download_count"], stats["total_downloads"], stats["recent_activity"]["downloads_last_24_hours"]


# Each process writes its counts every COUNT_FLUSH_INTERVAL (1 s by default, app/counts.py);
# a process answering shows its own at once, the others' within the interval.
COUNTS_SOON = 15.0


async def _counts_seen(session, url: str, model_id: str, downloads: int) -> tuple[int, int, int]:
    """``_counts`` once the model shows ``downloads`` downloads, or its last reading at the deadline."""
    deadline = time.monotonic() + COUNTS_SOON
    while True:
        counts = await _counts(session, url, model_id)
        if counts[0] == downloads or time.monotonic() > deadline:
            return counts
        await asyncio.sleep(0.05)


def test_concurrent_downloads_through_every_process_are_counted_exactly(services):
    started, _ = services
    urls = [s.url for s in started]
    data = os.urandom(16 * 1024)

    async def scenario():
        async with aiohttp.ClientSession(timeout=TIMEOUT) as session:
            model_id = await _register(session, urls[0], "counted")
            await _upload(session, urls[0], model_id, data)
            # Each process writes its pending counts (earlier tests' downloads) as it answers.
            for url in urls:
                await _counts(session, url, model_id)
            before = await _counts(session, urls[0], model_id)
            await _download_everywhere(urls, model_id, data, per_url=60)
            return before, [await _counts_seen(session, url, model_id, 180) for url in urls]

    (count, total, hourly), after = asyncio.run(scenario())
    assert count == 0
    assert after == [(180, total + 180, hourly + 180)] * 3


def test_two_workers_on_one_data_dir(tmp_path):
    """WORKERS=2 on a new DATA_DIR: both start, a replacement while one streams keeps the old bytes
    (whichever worker each connection landed on), and downloads through both are counted exactly."""
    port = free_port()
    env = {**os.environ, "DATA_DIR": str(tmp_path / "data"), "HOST": "127.0.0.1", "PORT": str(port),
           "MONGODB_URL": "", "WORKERS": "2"}
    log = open(tmp_path / "service.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "app", "serve"], cwd=REPO, env=env, stdout=log,
                            stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadlines.listening_children(proc.pid, port, 2)

        class Both:  # one URL, two workers behind it
            def __init__(self) -> None:
                self.url = url

        asyncio.run(_replace_while_streaming([Both(), Both(), Both()], tmp_path / "data"))

        async def counting():
            data = os.urandom(16 * 1024)
            async with aiohttp.ClientSession(timeout=TIMEOUT) as session:
                model_id = await _register(session, url, "counted")
                await _upload(session, url, model_id, data)
                await _download_everywhere([url], model_id, data, per_url=100)
                return await _counts_seen(session, url, model_id, 100)

        count, _, _ = asyncio.run(counting())
        assert count == 100
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        log.close()
