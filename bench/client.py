"""The load-generating client: a separate process, one job per run.

``python -m bench.client RESULT_PATH`` reads one JSON job on stdin and writes
one JSON result to RESULT_PATH. The orchestrator (``python -m bench``) never drives load
itself, and the service never shares a process with its load. Each result
carries per-request records (status, bytes, time to first byte, completion
time, verification, error) plus the client's own CPU time and peak RSS, so a
reader can see whether the client was the bottleneck.

Jobs:
  get           N concurrent downloads (new connection each) of a path
  ranges        random fixed-size ranges from K keep-alive connections for D seconds
  ttfb_probe    alternate 1 MiB ranges at given offsets on one connection
  segmented     one file in P parallel ranges, assembled, then sha256-checked
  upload        N concurrent streaming PUTs (aiohttp client), distinct content each
  upload_session  the same through an upload session: POST, PATCH chunks with Content-Range, PUT ?digest=
  hash          hashlib.sha256 over the same bytes as an upload, in one thread (the ceiling an upload is held to)
  gridfs_*      the same shapes through PyMongo's async GridFS, no HTTP (the peer)
  mongo_query   list/search/get through the raw driver (metadata peer)
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import random
import resource
import sys
import time
import traceback
from collections.abc import Awaitable, Callable

from . import rawhttp

# -- helpers -------------------------------------------------------------------

_timing = {"cpu0": None, "cpu": None}


def _begin() -> float:
    """Start of the timed section; the client's CPU time is measured over the same span."""
    _timing["cpu0"] = time.process_time()
    return time.perf_counter()


def _end(t0: float) -> float:
    wall = time.perf_counter() - t0
    _timing["cpu"] = time.process_time() - _timing["cpu0"]
    return wall



def _source(spec: dict) -> rawhttp.Source:
    return rawhttp.Source(spec["path"], spec["size"], spec["sha256"])


def _sink(verify: str, source: rawhttp.Source, offset: int, length: int):
    if verify == "sha256":
        if offset == 0 and length == source.size:
            return rawhttp.Sha256Sink(source.sha256)
        # A part of the file: its expected digest is computed from the source.
        return rawhttp.Sha256Sink(hashlib.sha256(source.map[offset:offset + length]).hexdigest())
    return rawhttp.CompareSink(source, offset)


def _check_headers(rec: dict, r: rawhttp.Result, job: dict, expect_status: int, rng: tuple[int, int] | None,
                   size: int) -> None:
    """Status, Content-Range and (for the service) X-File-Checksum must be right."""
    problems = []
    if r.status != expect_status:
        problems.append(f"status {r.status}, expected {expect_status}")
    if rng is not None and r.status == 206:
        want = f"bytes {rng[0]}-{rng[1]}/{size}"
        if r.headers.get("content-range") != want:
            problems.append(f"Content-Range {r.headers.get('content-range')!r}, expected {want!r}")
    want_sum = job.get("expect_checksum_header")
    if want_sum and r.headers.get("x-file-checksum") != f"sha256:{want_sum}":
        problems.append(f"X-File-Checksum {r.headers.get('x-file-checksum')!r}")
    if problems and not rec["error"]:
        rec["error"] = "; ".join(problems)


def _finish(rec: dict, expected_bytes: int) -> dict:
    if rec["error"] is None and rec["bytes"] != expected_bytes:
        rec["error"] = f"{rec['bytes']} body bytes, expected {expected_bytes}"
    rec["ok"] = rec["error"] is None and rec["verified"]
    if rec["error"] is None and not rec["verified"]:
        rec["error"] = "content mismatch"
    return rec


# -- HTTP jobs ---------------------------------------------------------------------


async def _get_raw(job: dict, source: rawhttp.Source, start: asyncio.Event, rng=None) -> dict:
    conn = rawhttp.Connection(job["host"], job["port"])
    offset, length = (rng[0], rng[1] - rng[0] + 1) if rng else (0, source.size)
    sink = _sink(job.get("verify", "bytes"), source, offset, length)
    await start.wait()
    r = await conn.get(job["path"], sink, rng, timeout=job.get("timeout", 600))
    conn.close()
    rec = r.record()
    rec["verify"] = sink.method
    _check_headers(rec, r, job, 206 if rng else 200, rng, source.size)
    return _finish(rec, length)


async def _get_aiohttp(job: dict, session, source: rawhttp.Source, start: asyncio.Event) -> dict:
    sink = _sink(job.get("verify", "bytes"), source, 0, source.size)
    rec = {"status": 0, "bytes": 0, "ttfb_headers": None, "ttfb": None, "total": None, "verified": False,
           "error": None, "verify": sink.method}
    await start.wait()
    t0 = time.perf_counter()
    url = f"http://{job['host']}:{job['port']}{job['path']}"
    try:
        async with session.get(url) as resp:
            rec["status"] = resp.status
            rec["ttfb_headers"] = time.perf_counter() - t0
            async for piece in resp.content.iter_any():
                if rec["ttfb"] is None:
                    rec["ttfb"] = time.perf_counter() - t0
                sink.feed(piece, memoryview(piece), len(piece))
                rec["bytes"] += len(piece)
            want_sum = job.get("expect_checksum_header")
            if want_sum and resp.headers.get("X-File-Checksum") != f"sha256:{want_sum}":
                rec["error"] = f"X-File-Checksum {resp.headers.get('X-File-Checksum')!r}"
            if resp.status != 200:
                rec["error"] = f"status {resp.status}"
    except Exception as e:  # noqa: BLE001 - every failure is a recorded error
        rec["error"] = f"{type(e).__name__}: {e}"
    rec["total"] = time.perf_counter() - t0
    rec["verified"] = sink.finish()
    return _finish(rec, source.size)


async def _batches(job: dict, one: Callable[[asyncio.Event], Awaitable[dict]]) -> dict:
    """`repeat` batches back to back, each of `concurrency` downloads started together, in one timed section.

    A 256 MB file crosses loopback in about 0.1 s, where a scheduler hiccup
    is a large part of the figure; repeating it measures the stream, not the hiccup.
    """
    records: list[dict] = []
    t0 = None
    for _ in range(job.get("repeat", 1)):
        start = asyncio.Event()
        tasks = [asyncio.create_task(one(start)) for _ in range(job["concurrency"])]
        await asyncio.sleep(0)
        if t0 is None:
            t0 = _begin()
        start.set()
        records += await asyncio.gather(*tasks)
    return {"wall": _end(t0), "records": records}


async def job_get(job: dict) -> dict:
    source = _source(job["expect"])
    if job.get("client", "raw") == "aiohttp":
        import aiohttp

        connector = aiohttp.TCPConnector(limit=0, force_close=True)
        async with aiohttp.ClientSession(connector=connector, auto_decompress=False,
                                         timeout=aiohttp.ClientTimeout(total=job.get("timeout", 600))) as s:
            return await _batches(job, lambda start: _get_aiohttp(job, s, source, start))
    return await _batches(job, lambda start: _get_raw(job, source, start))


async def job_ranges(job: dict) -> dict:
    """Random ranges of range_size bytes for `duration` seconds from `concurrency` connections."""
    source = _source(job["expect"])
    size, length = source.size, min(job["range_size"], source.size)
    deadline = time.perf_counter() + job["duration"]
    min_requests = job.get("min_requests", 0)
    records: list[dict] = []

    async def worker(i: int) -> None:
        rnd = random.Random(job.get("seed", 0) * 1000 + i)
        conn = rawhttp.Connection(job["host"], job["port"])
        try:
            while time.perf_counter() < deadline or len(records) < min_requests:
                start = rnd.randrange(0, size - length + 1)
                rng = (start, start + length - 1)
                sink = _sink(job.get("verify", "bytes"), source, start, length)
                r = await conn.get(job["path"], sink, rng, timeout=job.get("timeout", 120))
                rec = r.record()
                rec["offset"] = start
                _check_headers(rec, r, job, 206, rng, size)
                records.append(_finish(rec, length))
                if rec["error"]:
                    conn.close()
        finally:
            conn.close()

    t0 = _begin()
    await asyncio.gather(*(worker(i) for i in range(job["concurrency"])))
    return {"wall": _end(t0), "records": records}


async def job_ttfb_probe(job: dict) -> dict:
    """Alternating requests at each offset on one keep-alive connection (after one warm-up each)."""
    source = _source(job["expect"])
    length = job["length"]
    conn = rawhttp.Connection(job["host"], job["port"])
    records = []
    t0 = _begin()
    try:
        for rep in range(job["repeats"] + 1):
            order = job["offsets"] if rep % 2 == 0 else list(reversed(job["offsets"]))
            for off in order:
                off = min(off, source.size - length)
                rng = (off, off + length - 1)
                r = await conn.get(job["path"], _sink(job.get("verify", "bytes"), source, off, length), rng,
                                   timeout=job.get("timeout", 120))
                rec = r.record()
                rec["offset"] = off
                rec["warmup"] = rep == 0
                _check_headers(rec, r, job, 206, rng, source.size)
                records.append(_finish(rec, length))
                if rec["error"]:
                    conn.close()
    finally:
        conn.close()
    return {"wall": _end(t0), "records": records}


async def job_segmented(job: dict) -> dict:
    """The whole file in `parts` parallel ranges into one buffer; then sha256 of the buffer."""
    source = _source(job["expect"])
    size, parts = source.size, job["parts"]
    dest = bytearray(size)
    view = memoryview(dest)
    bounds = [(size * i // parts, size * (i + 1) // parts - 1) for i in range(parts)]
    start = asyncio.Event()

    async def segment(rng):
        conn = rawhttp.Connection(job["host"], job["port"])
        await start.wait()
        r = await conn.get(job["path"], rawhttp.AssembleSink(view, rng[0]), rng, timeout=job.get("timeout", 600))
        conn.close()
        rec = r.record()
        rec["offset"] = rng[0]
        _check_headers(rec, r, job, 206, rng, size)
        rec["verified"] = True  # checked below, on the assembled file
        return _finish(rec, rng[1] - rng[0] + 1)

    tasks = [asyncio.create_task(segment(b)) for b in bounds]
    await asyncio.sleep(0)
    t0 = _begin()
    start.set()
    records = await asyncio.gather(*tasks)
    return _assembled(source, view, records, _end(t0))


def _assembled(source: rawhttp.Source, view: memoryview, records: list[dict], wall: float) -> dict:
    """A segmented download's result: the assembled file's sha256 decides every segment's verification."""
    t1 = time.perf_counter()
    digest = hashlib.sha256(view).hexdigest()
    hash_time = time.perf_counter() - t1
    view.release()
    ok = digest == source.sha256
    for rec in records:
        rec["verify"] = "sha256 of assembled file"
        if not ok:
            rec["verified"], rec["ok"] = False, False
            rec["error"] = rec["error"] or f"assembled sha256 {digest} != {source.sha256}"
    return {"wall": wall, "records": records, "sha256": digest, "sha256_ok": ok, "hash_time": hash_time}


async def _stream_variant(source: rawhttp.Source, prefix: bytes, piece: int, lo: int = 0, hi: int | None = None):
    """Bytes [lo, hi) of the source file with its first bytes replaced by `prefix`: distinct content per upload."""
    mv = memoryview(source.map)
    hi = source.size if hi is None else hi
    try:
        pos = lo
        if pos < len(prefix):
            yield prefix[pos:min(hi, len(prefix))]
            pos = len(prefix)
        while pos < hi:
            yield mv[pos:min(hi, pos + piece)]
            pos += piece
    finally:
        mv.release()


async def job_upload(job: dict) -> dict:
    """Concurrent PUTs of distinct variants of the source (aiohttp client, streamed, Content-Length)."""
    import aiohttp

    source = _source(job["expect"])
    start = asyncio.Event()

    async def one(session, up: dict) -> dict:
        prefix = bytes.fromhex(up["prefix"])
        rec = {"status": 0, "bytes": source.size, "total": None, "verified": False, "error": None,
               "verify": up.get("verify", "service sha256")}
        headers = {"Content-Length": str(source.size), "Content-Type": "application/octet-stream"}
        if up.get("sha256"):
            headers["X-Checksum-Sha256"] = up["sha256"]
        await start.wait()
        t0 = time.perf_counter()
        try:
            async with session.put(up["url"], data=_stream_variant(source, prefix, 1 << 20), headers=headers) as resp:
                rec["status"] = resp.status
                body = await resp.read()
                rec["total"] = time.perf_counter() - t0
                if resp.status not in up.get("expect_status", [201]):
                    rec["error"] = f"status {resp.status}: {body[:300]!r}"
                elif up.get("sha256") and up.get("check_response", True):
                    fm = json.loads(body).get("file_metadata", {})
                    if fm.get("checksum") != f"sha256:{up['sha256']}" or fm.get("size_bytes") != source.size:
                        rec["error"] = f"stored {fm.get('checksum')} / {fm.get('size_bytes')} bytes"
                    else:
                        rec["verified"] = True
                    rec["chunk_size"] = fm.get("chunk_size")
                    rec["file_id"] = fm.get("file_id")
                else:
                    rec["verified"] = True  # checked afterwards by the orchestrator
        except Exception as e:  # noqa: BLE001
            rec["error"] = f"{type(e).__name__}: {e}"
            rec["total"] = time.perf_counter() - t0
        rec["ok"] = rec["error"] is None and rec["verified"]
        return rec

    connector = aiohttp.TCPConnector(limit=0, force_close=True)
    timeout = aiohttp.ClientTimeout(total=job.get("timeout", 900))
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as s:
        tasks = [asyncio.create_task(one(s, up)) for up in job["uploads"]]
        await asyncio.sleep(0)
        t0 = _begin()
        start.set()
        records = await asyncio.gather(*tasks)
    return {"wall": _end(t0), "records": records}


async def job_upload_session(job: dict) -> dict:
    """Concurrent uploads of distinct variants through upload sessions: POST /api/v1/uploads, PATCH
    chunks of ``chunk`` bytes (Content-Range, streamed), PUT ?digest= (no body); the 201's digest checked."""
    import aiohttp

    source = _source(job["expect"])
    start = asyncio.Event()
    chunk = job["chunk"]

    async def one(session, up: dict) -> dict:
        prefix = bytes.fromhex(up["prefix"])
        rec = {"status": 0, "bytes": source.size, "total": None, "verified": False, "error": None,
               "verify": "service sha256 (PUT ?digest=)"}
        await start.wait()
        t0 = time.perf_counter()
        try:
            async with session.post(job["url"], json={"size_bytes": source.size}) as resp:
                if resp.status != 202:
                    raise RuntimeError(f"POST: status {resp.status}: {(await resp.read())[:300]!r}")
                location = resp.headers["Location"]
            url = job["url"].split("/api/")[0] + location
            for lo in range(0, source.size, chunk):
                hi = min(lo + chunk, source.size)
                headers = {"Content-Range": f"bytes {lo}-{hi - 1}/{source.size}", "Content-Length": str(hi - lo),
                           "Content-Type": "application/octet-stream"}
                async with session.patch(url, data=_stream_variant(source, prefix, 1 << 20, lo, hi),
                                         headers=headers) as resp:
                    body = await resp.read()
                    if resp.status != 202:
                        raise RuntimeError(f"PATCH {lo}-{hi - 1}: status {resp.status}: {body[:300]!r}")
            async with session.put(url, params={"digest": f"sha256:{up['sha256']}"}) as resp:
                rec["status"] = resp.status
                body = await resp.read()
            rec["total"] = time.perf_counter() - t0
            if resp.status != 201:
                rec["error"] = f"PUT: status {resp.status}: {body[:300]!r}"
            elif json.loads(body) != {"digest": f"sha256:{up['sha256']}", "size_bytes": source.size}:
                rec["error"] = f"PUT answered {body[:300]!r}"
            else:
                rec["verified"] = True
        except Exception as e:  # noqa: BLE001
            rec["error"] = f"{type(e).__name__}: {e}"
            rec["total"] = time.perf_counter() - t0
        rec["ok"] = rec["error"] is None and rec["verified"]
        return rec

    connector = aiohttp.TCPConnector(limit=0)
    timeout = aiohttp.ClientTimeout(total=job.get("timeout", 900))
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as s:
        tasks = [asyncio.create_task(one(s, up)) for up in job["uploads"]]
        await asyncio.sleep(0)
        t0 = _begin()
        start.set()
        records = await asyncio.gather(*tasks)
    return {"wall": _end(t0), "records": records}


async def job_hash(job: dict) -> dict:
    """hashlib.sha256 over the bytes an upload of this variant sends, in one thread (one update of
    the whole mapped file after its prefix: no copy, nothing else)."""
    source = _source(job["expect"])
    prefix = bytes.fromhex(job["prefix"])
    mv = memoryview(source.map)
    try:
        t0 = _begin()
        running = hashlib.sha256(prefix)
        running.update(mv[len(prefix):])
        digest = running.hexdigest()
        wall = _end(t0)
    finally:
        mv.release()
    ok = digest == job["sha256"]
    return {"wall": wall, "records": [{"status": 200, "bytes": source.size, "total": wall, "verified": ok, "ok": ok,
                                       "verify": "sha256 of the variant", "error": None if ok else
                                       f"sha256 {digest}, expected {job['sha256']}"}]}


class _VariantReader:
    """A file-like view of the source with its first bytes replaced by `prefix` (for upload_from_stream)."""

    def __init__(self, source: rawhttp.Source, prefix: bytes) -> None:
        self._view, self._prefix, self._pos = memoryview(source.map), prefix, 0

    def read(self, n: int = -1) -> bytes:
        end = len(self._view) if n < 0 else min(len(self._view), self._pos + n)
        pos, self._pos = self._pos, end
        if pos < len(self._prefix):
            return self._prefix[pos:end] + bytes(self._view[len(self._prefix):end])
        return bytes(self._view[pos:end])

    def close(self) -> None:
        self._view.release()


# -- GridFS peer jobs (raw PyMongo async, no HTTP) ---------------------------------


def _bucket(job: dict):
    from gridfs import AsyncGridFSBucket
    from pymongo import AsyncMongoClient

    client = AsyncMongoClient(job["url"], serverSelectionTimeoutMS=10000)
    return client, AsyncGridFSBucket(client[job["db"]], bucket_name=job["bucket"])


async def _gridfs_read(bucket, file_id, source, offset: int, length: int, verify: str, dest=None) -> dict:
    from bson import ObjectId

    rec = {"status": 0, "bytes": 0, "ttfb_headers": None, "ttfb": None, "total": None, "verified": False,
           "error": None, "offset": offset}
    sink = rawhttp.AssembleSink(dest, offset) if dest is not None else _sink(verify, source, offset, length)
    rec["verify"] = sink.method
    t0 = time.perf_counter()
    try:
        stream = await bucket.open_download_stream(ObjectId(file_id))
        rec["ttfb_headers"] = time.perf_counter() - t0
        if offset == 0 and length == source.size:
            # The driver's own chunk-by-chunk iteration: the canonical full read.
            async for chunk in stream:
                if rec["ttfb"] is None:
                    rec["ttfb"] = time.perf_counter() - t0
                sink.feed(chunk, memoryview(chunk), len(chunk))
                rec["bytes"] += len(chunk)
        else:
            await stream.seek(offset)
            data = await stream.read(length)
            rec["ttfb"] = time.perf_counter() - t0
            sink.feed(data, memoryview(data), len(data))
            rec["bytes"] = len(data)
        await stream.close()
    except Exception as e:  # noqa: BLE001
        rec["error"] = f"{type(e).__name__}: {e}"
    rec["total"] = time.perf_counter() - t0
    rec["status"] = 200 if rec["error"] is None else 0
    rec["verified"] = sink.finish()
    return _finish(rec, length)


async def job_gridfs_read(job: dict) -> dict:
    source = _source(job["expect"])
    client, bucket = _bucket(job)
    try:
        await client.admin.command("ping")

        async def one(start: asyncio.Event) -> dict:
            await start.wait()
            return await _gridfs_read(bucket, job["file_id"], source, 0, source.size, job.get("verify", "bytes"))

        return await _batches(job, one)
    finally:
        await client.close()


async def job_gridfs_ranges(job: dict) -> dict:
    source = _source(job["expect"])
    size, length = source.size, min(job["range_size"], source.size)
    client, bucket = _bucket(job)
    records: list[dict] = []
    try:
        await client.admin.command("ping")
        deadline = time.perf_counter() + job["duration"]
        min_requests = job.get("min_requests", 0)

        async def worker(i: int) -> None:
            rnd = random.Random(job.get("seed", 0) * 1000 + i)
            while time.perf_counter() < deadline or len(records) < min_requests:
                start = rnd.randrange(0, size - length + 1)
                records.append(await _gridfs_read(bucket, job["file_id"], source, start, length,
                                                  job.get("verify", "bytes")))

        t0 = _begin()
        await asyncio.gather(*(worker(i) for i in range(job["concurrency"])))
        return {"wall": _end(t0), "records": records}
    finally:
        await client.close()


async def job_gridfs_ttfb_probe(job: dict) -> dict:
    source = _source(job["expect"])
    length = job["length"]
    client, bucket = _bucket(job)
    records = []
    try:
        await client.admin.command("ping")
        t0 = _begin()
        for rep in range(job["repeats"] + 1):
            order = job["offsets"] if rep % 2 == 0 else list(reversed(job["offsets"]))
            for off in order:
                off = min(off, source.size - length)
                rec = await _gridfs_read(bucket, job["file_id"], source, off, length, job.get("verify", "bytes"))
                rec["warmup"] = rep == 0
                records.append(rec)
        return {"wall": _end(t0), "records": records}
    finally:
        await client.close()


async def job_gridfs_segmented(job: dict) -> dict:
    source = _source(job["expect"])
    size, parts = source.size, job["parts"]
    dest = bytearray(size)
    view = memoryview(dest)
    bounds = [(size * i // parts, size * (i + 1) // parts) for i in range(parts)]
    client, bucket = _bucket(job)
    try:
        await client.admin.command("ping")
        t0 = _begin()
        records = await asyncio.gather(*(
            _gridfs_read(bucket, job["file_id"], source, lo, hi - lo, "bytes", dest=view) for lo, hi in bounds))
        wall = _end(t0)
    finally:
        await client.close()
    return _assembled(source, view, records, wall)


async def job_gridfs_write(job: dict) -> dict:
    """Concurrent raw GridFS uploads (upload_from_stream of a file-like view) of distinct variants; then checked
    and deleted."""
    from bson import ObjectId

    source = _source(job["expect"])
    client, bucket = _bucket(job)
    start = asyncio.Event()

    async def one(up: dict) -> dict:
        rec = {"status": 0, "bytes": source.size, "total": None, "verified": False, "error": None,
               "verify": "files.length and chunk count"}
        reader = _VariantReader(source, bytes.fromhex(up["prefix"]))
        await start.wait()
        t0 = time.perf_counter()
        try:
            file_id = await bucket.upload_from_stream(up["name"], reader, chunk_size_bytes=job["chunk_size"])
            rec["total"] = time.perf_counter() - t0
            rec["file_id"] = str(file_id)
            rec["status"] = 200
        except Exception as e:  # noqa: BLE001
            rec["error"] = f"{type(e).__name__}: {e}"
            rec["total"] = time.perf_counter() - t0
        finally:
            reader.close()
        return rec

    try:
        await client.admin.command("ping")
        tasks = [asyncio.create_task(one(up)) for up in job["uploads"]]
        await asyncio.sleep(0)
        t0 = _begin()
        start.set()
        records = await asyncio.gather(*tasks)
        wall = _end(t0)
        db = client[job["db"]]
        for rec in records:
            if rec.get("file_id") and rec["error"] is None:
                oid = ObjectId(rec["file_id"])
                doc = await db[f"{job['bucket']}.files"].find_one({"_id": oid})
                chunks = await db[f"{job['bucket']}.chunks"].count_documents({"files_id": oid})
                want_chunks = -(-source.size // job["chunk_size"])
                if doc is None or doc["length"] != source.size or chunks != want_chunks:
                    rec["error"] = f"stored length {doc and doc['length']}, {chunks} chunks"
                else:
                    rec["verified"] = True
                await bucket.delete(oid)
            rec["ok"] = rec["error"] is None and rec["verified"]
        return {"wall": wall, "records": records}
    finally:
        await client.close()


async def job_mongo_query(job: dict) -> dict:
    """The metadata peer: the same query the service runs, through the raw driver, for `duration` s."""
    from bson import ObjectId
    from pymongo import ASCENDING, DESCENDING, AsyncMongoClient

    client = AsyncMongoClient(job["url"], serverSelectionTimeoutMS=10000)
    models = client[job["db"]]["models"]
    q = job["query"]
    records: list[dict] = []
    try:
        await client.admin.command("ping")
        deadline = time.perf_counter() + job["duration"]

        async def one_op(i: int, rnd: random.Random) -> None:
            t0 = time.perf_counter()
            rec = {"status": 200, "error": None}
            try:
                if q["op"] == "get":
                    doc = await models.find_one({"_id": ObjectId(rnd.choice(job["ids"]))})
                    if doc is None:
                        rec["error"] = "not found"
                else:
                    direction = DESCENDING if q["sort_desc"] else ASCENDING
                    cursor = models.find(q["filter"], sort=[(q["sort_field"], direction), ("_id", direction)],
                                         skip=q.get("skip", 0), limit=q["limit"])
                    docs = [d async for d in cursor]
                    await models.count_documents(q["filter"])
                    if len(docs) != q["expect_count"]:
                        rec["error"] = f"{len(docs)} documents, expected {q['expect_count']}"
            except Exception as e:  # noqa: BLE001
                rec["error"] = f"{type(e).__name__}: {e}"
            rec["total"] = time.perf_counter() - t0
            rec["ok"] = rec["verified"] = rec["error"] is None
            rec["verify"] = "document count"
            records.append(rec)

        async def worker(i: int) -> None:
            rnd = random.Random(i)
            while True:
                await one_op(i, rnd)

        # Like wrk: only requests completed within the window count; the rest are cancelled.
        t0 = _begin()
        tasks = [asyncio.create_task(worker(i)) for i in range(job["concurrency"])]
        await asyncio.sleep(max(0.0, deadline - time.perf_counter()))
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        wall = _end(t0)
        return {"wall": job["duration"], "records": records, "measured_wall": wall}
    finally:
        await client.close()


async def job_seed(job: dict) -> dict:
    """Setup, not a measurement: register models through the API (aiohttp, `concurrency` at a time)."""
    import aiohttp

    bodies = job["models"]
    ids: list[str | None] = [None] * len(bodies)
    errors: list[str] = []
    queue = list(range(len(bodies)))

    async def worker(session) -> None:
        while queue:
            i = queue.pop()
            async with session.post(job["url"] + "/api/v1/models", json=bodies[i]) as resp:
                body = await resp.json(content_type=None)
                if resp.status == 201:
                    ids[i] = body["model_id"]
                elif len(errors) < 5:
                    errors.append(f"{resp.status}: {str(body)[:200]}")

    t0 = time.perf_counter()
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=600)) as s:
        await asyncio.gather(*(worker(s) for _ in range(job["concurrency"])))
    return {"wall": time.perf_counter() - t0, "records": [], "ids": ids, "errors": errors}


JOBS = {
    "get": job_get,
    "ranges": job_ranges,
    "ttfb_probe": job_ttfb_probe,
    "segmented": job_segmented,
    "upload": job_upload,
    "upload_session": job_upload_session,
    "hash": job_hash,
    "gridfs_read": job_gridfs_read,
    "gridfs_ranges": job_gridfs_ranges,
    "gridfs_ttfb_probe": job_gridfs_ttfb_probe,
    "gridfs_segmented": job_gridfs_segmented,
    "gridfs_write": job_gridfs_write,
    "mongo_query": job_mongo_query,
    "seed": job_seed,
}


def main() -> int:
    job = json.loads(sys.stdin.read())
    try:
        import uvloop

        runner = uvloop.run
    except ImportError:  # pragma: no cover
        runner = asyncio.run
    cpu0 = time.process_time()
    try:
        result = runner(JOBS[job["job"]](job))
    except Exception as e:  # noqa: BLE001 - reported to the orchestrator as a failed job
        result = {"wall": 0.0, "records": [], "job_error": f"{type(e).__name__}: {e}",
                  "traceback": traceback.format_exc()}
    result["client_cpu_s"] = _timing["cpu"] if _timing["cpu"] is not None else time.process_time() - cpu0
    result["client_maxrss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    with open(sys.argv[1], "w") as out:
        json.dump(result, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
