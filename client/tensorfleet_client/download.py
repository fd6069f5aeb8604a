"""Downloading one model file: resumable, optionally in parallel ranges, verified.

The bytes go to ``<target>.part`` beside the target; ``<target>.part.lock``
makes two downloads to one target take turns (on this host), and
``<target>.part.json`` is the resume state: the file's ETag and size, and how
far each range got, replaced whole at each save. Only
once the whole file hashes to the server's ``X-File-Checksum`` is it renamed
onto the target, so the target is either absent, the previous file, or the
complete verified new one, whenever the process dies. With ``durable`` the
file is also fsynced before the rename (and its folder after), so that this
holds through a power loss or a kernel crash too; see download_file. Only a
caller that asked for it (``overwrite``) has an existing target replaced: else
the new file is hard-linked into place, which fails rather than replace a file
that appeared meanwhile.

Every request is a ``Range`` request with ``If-Range: <etag>``: if the file
changes on the server between two requests, the server answers 200 instead of
206 and the download starts over on the new file rather than mixing the two.
The first range includes byte 0, so the service counts one download however
many ranges there are. A range that fails mid-body (reset, timeout, cut short)
is asked for again from where it stopped. A range's body of 4 MiB or more
over plain TCP goes from the socket to the file through the kernel (splice.py).

In parallel, the file is cut into pieces (16 MiB at most) that N connections
take in file order, so the completed prefix of the file grows steadily and a
thread hashes it while the rest arrives: when the last byte lands, all but
the last few pieces are hashed already.
"""

from __future__ import annotations

import asyncio
import errno
import hashlib
import logging
import math
import os
import re
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Awaitable, Callable, Mapping

import aiohttp
import orjson
from filelock import AsyncFileLock

from . import rules, splice
from .errors import (
    ChecksumMismatch,
    ConnectionFailed,
    InsufficientSpace,
    ModelServiceError,
    NotFound,
    ProtocolError,
    error_for,
)
from .fileio import write_at
from .transport import API, TRANSIENT_ERRORS, Transport

log = logging.getLogger("tensorfleet_client.download")

MiB = 1024 * 1024
PARALLEL_THRESHOLD = 64 * 1000 * 1000  # files over 64 MB are fetched in ranges by default
DEFAULT_PARALLEL = 4
MIN_SEGMENT = 1 * MiB
MAX_SEGMENT = 16 * MiB  # a piece of a parallel download, unless that would make more than MAX_PIECES
MAX_PIECES = 1024  # the resume state and the piece list stay small however large the file says it is
MAX_PARALLEL = 32
HASH_BLOCK = 8 * MiB
BLOCK = 1 * MiB
STATE_FORMAT = 1
SAVE_INTERVAL = 1.0  # seconds between saves of the resume state during a parallel download
RESTARTS = 3  # times a download starts over because the file changed on the server

Progress = Callable[[int, int], None]

_CONTENT_RANGE_RE = re.compile(r"^bytes (\d+)-(\d+)/(\d+)$")


@dataclass(frozen=True)
class RemoteFile:
    """A model's file as the download endpoint describes it (from a HEAD)."""

    model_id: str
    name: str
    version: str
    size: int
    sha256: str
    etag: str
    filename: str
    url: str  # the download URL by id: stays on this model whatever happens to the name

    @classmethod
    def from_response(cls, resp, base_url: str) -> "RemoteFile":
        h = resp.headers
        checksum = h.get("X-File-Checksum", "")
        etag = h.get("ETag", "")
        if not checksum.startswith("sha256:") or not etag or "X-Model-Id" not in h:
            raise ProtocolError(f"{resp.method} {resp.url} answered without ETag, X-File-Checksum or X-Model-Id")
        if resp.content_length is None or resp.content_length < 0:
            raise ProtocolError(f"{resp.method} {resp.url} answered without a valid Content-Length")
        # Each of these becomes part of a URL or a path: the service's own rules, or nothing.
        model_id = rules.model_id(h["X-Model-Id"], "X-Model-Id")
        name = rules.name(h.get("X-Model-Name"), "X-Model-Name")
        version = rules.version(h.get("X-Model-Version"), "X-Model-Version")
        cd = resp.content_disposition
        filename = rules.file_name(cd.filename if cd is not None else None, name, version)
        return cls(model_id=model_id, name=name, version=version, size=resp.content_length,
                   sha256=checksum.removeprefix("sha256:").lower(), etag=etag, filename=filename,
                   url=f"{base_url}{API}/{model_id}/download")


@dataclass(frozen=True)
class Unchanged:
    """A 304 to a HEAD with If-None-Match: the file is the one asked about, and which model now serves it.

    By name, the latest version may be a newer model whose file is
    byte-identical to the cached one: same ETag, another id and version.
    """

    model_id: str | None
    version: str | None

    @classmethod
    def from_response(cls, resp) -> "Unchanged":
        h = resp.headers
        model_id, version = h.get("X-Model-Id"), h.get("X-Model-Version")
        return cls(model_id=None if model_id is None else rules.model_id(model_id, "X-Model-Id"),
                   version=None if version is None else rules.version(version, "X-Model-Version"))


@dataclass
class DownloadResult:
    path: Path
    model_id: str
    name: str
    version: str
    size: int
    sha256: str
    bytes_transferred: int = 0  # body bytes received from the network by this call
    resumed_bytes: int = 0  # bytes kept from an earlier, interrupted download
    parallel: int = 1  # ranges fetched at once
    seconds: float = 0.0
    cached: bool = False  # fetch(): the cached copy was still current (304)
    stale: bool = False  # served from the cache without revalidating (allow_stale, or MODEL_SERVICE_OFFLINE)
    files: int | None = None  # a snapshot: its folder is ``path``, ``size`` the total, ``sha256`` its digest

    def to_dict(self) -> dict:
        d = asdict(self)
        d["path"] = str(self.path)
        return d


@dataclass
class Segment:
    start: int
    end: int  # exclusive
    done: int = 0

    @property
    def pos(self) -> int:
        return self.start + self.done

    @property
    def remaining(self) -> int:
        return self.end - self.pos


def split(size: int, parallel: int) -> list[Segment]:
    """One segment for one connection; else pieces of at most MAX_SEGMENT (larger only to keep to
    MAX_PIECES), at least one per connection."""
    if size == 0:
        return []
    if parallel <= 1:
        return [Segment(0, size)]
    n = max(1, min(parallel, MAX_PARALLEL, math.ceil(size / MIN_SEGMENT)))
    step = max(min(MAX_SEGMENT, math.ceil(size / n)), math.ceil(size / MAX_PIECES))
    step = math.ceil(step / (64 * 1024)) * 64 * 1024  # boundaries on 64 KiB
    return [Segment(s, min(s + step, size)) for s in range(0, size, step)]


def connections(parallel: int | None, size: int, segments: list[Segment]) -> int:
    """How many ranges run at once: as asked, else the default for the size, or what a resumed download used."""
    if parallel is not None or len(segments) <= 1:
        return min(choose_parallel(size, parallel), MAX_PARALLEL)
    return min(len(segments), DEFAULT_PARALLEL)


def choose_parallel(size: int, parallel: int | None) -> int:
    if parallel is None:
        return DEFAULT_PARALLEL if size > PARALLEL_THRESHOLD else 1
    if parallel < 1:
        raise ValueError("parallel must be at least 1")
    return parallel


class RateLimiter:
    """At most ``rate`` bytes a second, shared by all the ranges of a download."""

    def __init__(self, rate: float) -> None:
        if rate <= 0:
            raise ValueError("rate must be positive")
        self.rate = rate
        self._next = time.monotonic()

    @property
    def block(self) -> int:
        # Small reads when slow, so the rate is smooth rather than bursty.
        return int(max(16 * 1024, min(BLOCK, self.rate / 10)))

    async def take(self, n: int) -> None:
        now = time.monotonic()
        self._next = max(self._next, now) + n / self.rate
        wait = self._next - now
        if wait > 0.001:
            await asyncio.sleep(wait)


class _ContentChanged(Exception):
    """The file on the server is no longer the one this download started on."""


class _ResumedMismatch(Exception):
    """A download that reused bytes from an earlier attempt did not verify."""


def part_paths(target: Path) -> tuple[Path, Path, Path]:
    """The partial file, its resume state and the lock beside ``target``."""
    return (target.with_name(target.name + ".part"), target.with_name(target.name + ".part.json"),
            target.with_name(target.name + ".part.lock"))


def default_cache_dir() -> Path:
    """The client's cache: models (cache.py) and the state of resumable pushes (sessions.py)."""
    env = os.environ.get("MODEL_SERVICE_CACHE_DIR")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "tensorfleet" / "models"


def file_lock(path: Path) -> AsyncFileLock:
    """An inter-process lock on ``path`` (flock): the kernel drops it when its holder dies, however it dies.

    No soft-lock fallback where the file system has no flock: a marker file
    outlives a killed holder and would keep every later caller waiting.
    """
    return AsyncFileLock(path, fallback_to_soft=False)


def sha256_file(path: Path) -> "hashlib._Hash":
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(HASH_BLOCK):
            h.update(block)
    return h


def fsync_dir(path: Path) -> None:
    """Make a rename in ``path`` durable; a folder that cannot be opened or synced is left be."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def model_paths(id_or_name: str, version: str | None) -> list[tuple[str, dict[str, str] | None]]:
    """Where a model may be, in the order to try: ``(path, query)``.

    A 24-hex string is tried as an id first, then as a name (a name may be 24 hex digits).
    """
    candidates: list[tuple[str, dict[str, str] | None]] = []
    if version is None and rules.is_model_id(id_or_name):
        candidates.append((f"{API}/{id_or_name}", None))
    candidates.append((f"{API}/by-name/{id_or_name}", {"version": version} if version else None))
    return candidates


async def probe(transport: Transport, id_or_name: str, version: str | None = None, *,
                if_none_match: str | None = None) -> tuple[int, RemoteFile | Unchanged]:
    """HEAD the download of a model: ``(200, RemoteFile)``, or ``(304, Unchanged)`` if ``if_none_match`` still holds.

    A 24-hex string is tried as an id first, then as a name.
    """
    candidates = model_paths(id_or_name, version)
    headers = {"If-None-Match": if_none_match} if if_none_match else None
    for i, (meta_path, params) in enumerate(candidates):
        resp = await transport.send("HEAD", meta_path + "/download", params=params, headers=headers)
        async with resp:
            if resp.status == 200:
                return 200, RemoteFile.from_response(resp, transport.base_url)
            if resp.status == 304:
                return 304, Unchanged.from_response(resp)
        # HEAD answers carry no body: ask the metadata endpoint what is wrong.
        error = await _explain(transport, resp, meta_path, params)
        if isinstance(error, NotFound) and error.code == "not_found" and i + 1 < len(candidates):
            continue
        if len(candidates) > 1 and isinstance(error, NotFound) and error.code == "not_found":
            error = NotFound(f"no model with id or name {id_or_name}", status=404, code="not_found")
        raise error
    raise AssertionError("unreachable")  # pragma: no cover


async def _explain(transport: Transport, resp: aiohttp.ClientResponse, meta_path: str,
                   params: Mapping[str, str] | None) -> ModelServiceError:
    if resp.status in (400, 404):
        try:
            doc = await transport.json("GET", meta_path, params=params)
        except ModelServiceError as e:
            return e
        if not doc.get("file_metadata"):
            return NotFound(f"model {doc.get('id')} ({doc.get('name')} {doc.get('version')}) "
                            "has no file uploaded yet", status=404, code="no_file")
    return error_for(resp.status, None, dict(resp.headers),
                     f"HEAD {resp.url.path} failed: {resp.status} {resp.reason}")


async def download_file(
    transport: Transport,
    remote: RemoteFile,
    target: Path,
    *,
    reprobe: Callable[[], Awaitable[RemoteFile]] | None = None,
    parallel: int | None = None,
    limit_rate: float | None = None,
    progress: Progress | None = None,
    resume: bool = True,
    overwrite: bool = False,
    durable: bool = True,
) -> DownloadResult:
    """Download ``remote`` to ``target``; see the module docstring.

    ``durable`` fsyncs the verified file before the rename and the folder
    after it. The cache and snapshots keep it: their files are trusted later
    without being hashed again (a 304, a manifest), so one torn by a power
    loss would be served as verified. A plain download (``pull -o``) does not
    by default: the fsync waits for the whole file to reach the disk (0.4 s
    per GB here, a third of the transfer on loopback), which curl, wget,
    aria2c and huggingface_hub never wait for either.

    An existing ``target`` is replaced only with ``overwrite``; else, or if the
    file is larger than the free space there, nothing is written at all.
    ``reprobe`` describes the file anew once it changed on the server (by
    default: a probe of ``remote``'s model id, whatever became of its name).
    """
    target = Path(target)
    part, state_path, lock_path = part_paths(target)
    transport.url(remote.url)  # refuses a URL off the service's origin before anything is written
    if not overwrite:
        refuse_existing(target)
    check_space(target.parent, remote.size, part)
    lock = file_lock(lock_path)
    await lock.acquire()
    succeeded = False
    try:
        fresh_only = not resume
        for restart in range(RESTARTS + 1):
            job = _Job(transport, remote, target, part, state_path, parallel, limit_rate, progress, overwrite,
                       durable)
            try:
                result = await job.run(fresh_only)
                succeeded = True
                return result
            except _ContentChanged:
                if restart == RESTARTS:
                    raise ModelServiceError(f"{remote.url}: the file kept changing during the download",
                                            code="content_changed")
                log.info("file of model %s changed on the server; starting over", remote.model_id)
                if reprobe is None:
                    remote = (await probe(transport, remote.model_id))[1]
                else:
                    remote = await reprobe()
                fresh_only = True
            except _ResumedMismatch:
                log.warning("resumed download of %s did not verify; downloading it again from the start", target)
                fresh_only = True
        raise AssertionError("unreachable")  # pragma: no cover
    finally:
        # Keep the state (and the lock) beside a partial file so a later call resumes it. Removed while
        # still held: a download waiting on the lock finds its file unlinked and locks a new one.
        if succeeded or not part.exists():
            state_path.unlink(missing_ok=True)
            lock_path.unlink(missing_ok=True)
        await lock.release()


def refuse_existing(target: Path) -> None:
    if os.path.lexists(target):
        raise FileExistsError(errno.EEXIST, "exists already and was left as it is "
                              "(overwrite=True, or --force on the command line, replaces it)", str(target))


def check_space(folder: Path, size: int, part: Path | None = None) -> None:
    """Refuse a declared ``size`` larger than the free space in ``folder`` (counting a partial file there)."""
    free = shutil.disk_usage(folder).free
    try:
        free += part.stat().st_size if part is not None else 0
    except FileNotFoundError:
        pass
    if size > free:
        raise InsufficientSpace(f"the server says the file is {size} bytes, but {folder} has {free} bytes free; "
                                "nothing was downloaded")


def _place(part: Path, target: Path, overwrite: bool) -> None:
    """Rename the verified file onto ``target``; without ``overwrite``, never over a file that appeared meanwhile."""
    if overwrite:
        os.replace(part, target)
        return
    try:
        os.link(part, target)  # fails if target exists, atomically
    except FileExistsError:
        raise FileExistsError(errno.EEXIST, "appeared during the download and was left as it is; "
                              f"the download is in {part}", str(target)) from None
    except OSError:
        # No hard links on this file system: the check and the rename are two steps.
        refuse_existing(target)
        os.replace(part, target)
        return
    part.unlink()


class _Job:
    def __init__(self, transport: Transport, remote: RemoteFile, target: Path, part: Path, state_path: Path,
                 parallel: int | None, limit_rate: float | None, progress: Progress | None,
                 overwrite: bool, durable: bool) -> None:
        self.transport = transport
        self.overwrite = overwrite
        self.durable = durable
        self.remote = remote
        self.target = target
        self.part = part
        self.state_path = state_path
        self.parallel = parallel
        self.limiter = RateLimiter(limit_rate) if limit_rate else None
        self.progress = progress
        self.segments: list[Segment] = []
        self.transferred = 0
        self.fd: int | None = None
        self.arrived = asyncio.Event()  # set when bytes land: the hasher looks again
        self.complete = False  # every byte is in: the hasher finishes and returns the digest
        self.abandoned = False  # the download failed: the hasher stops
        self._hash_view = memoryview(bytearray(BLOCK))  # reused: the hasher is one task, one read at a time

    # -- resume state ------------------------------------------------------

    def _load_state(self) -> list[Segment] | None:
        """The segments of a matching earlier download of this file, if any."""
        try:
            state = orjson.loads(self.state_path.read_bytes())
        except (OSError, orjson.JSONDecodeError):
            return None
        if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
            return None
        r = self.remote
        if state.get("etag") != r.etag or state.get("size") != r.size or not self.part.exists():
            return None
        try:
            segments = [Segment(int(s), int(e), int(d)) for s, e, d in state["segments"]]
        except (KeyError, TypeError, ValueError):
            return None
        # The ranges must tile the file exactly, each no further than its end.
        pos = 0
        for seg in segments:
            if seg.start != pos or not 0 <= seg.done <= seg.end - seg.start:
                return None
            pos = seg.end
        if pos != r.size:
            return None
        part_size = self.part.stat().st_size
        if len(segments) == 1:
            # Written in order: the file's length is exactly how far it got,
            # even if the process died before saving the state again.
            segments[0].done = min(part_size, r.size)
        elif any(seg.pos > part_size for seg in segments if seg.done):
            return None
        return segments

    def _save_state(self) -> None:
        r = self.remote
        self._write_state(orjson.dumps({
            "format": STATE_FORMAT,
            "model_id": r.model_id,
            "url": r.url,
            "etag": r.etag,
            "size": r.size,
            "sha256": r.sha256,
            "segments": [[s.start, s.end, s.done] for s in self.segments],
        }))

    def _write_state(self, data: bytes) -> None:
        # Replaced whole, so a process killed mid-save leaves the previous state, not a torn one.
        tmp = self.state_path.with_name(self.state_path.name + ".tmp")
        tmp.write_bytes(data)
        os.replace(tmp, self.state_path)

    def _discard(self) -> None:
        self.part.unlink(missing_ok=True)
        self.state_path.unlink(missing_ok=True)

    # -- the download ------------------------------------------------------

    async def run(self, fresh_only: bool) -> DownloadResult:
        r = self.remote
        started = time.monotonic()
        segments = None if fresh_only else self._load_state()
        if segments is None:
            self._discard()
            segments = split(r.size, choose_parallel(r.size, self.parallel))
        self.segments = segments
        kept = sum(s.done for s in segments)
        if kept:
            log.info("resuming download of %s at %d of %d bytes", self.target, kept, r.size)
        self._save_state()

        self.fd = os.open(self.part, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        width = connections(self.parallel, r.size, segments)
        saver = None
        hasher = asyncio.create_task(self._hash_prefix())
        try:
            if self.progress:
                self.progress(kept, r.size)
            if r.size == 0:
                await self._fetch_empty()
            else:
                if len(segments) > 1:
                    saver = asyncio.create_task(self._save_periodically())
                await self._fetch_all(width)
            if os.fstat(self.fd).st_size != r.size:
                raise ProtocolError(f"downloaded {os.fstat(self.fd).st_size} bytes of a {r.size}-byte file")
            self.complete = True
            self.arrived.set()
            digest = await hasher
        except BaseException:
            if saver is not None:
                saver.cancel()
            await self._stop_hasher(hasher)
            os.close(self.fd)
            self.fd = None
            try:
                self._save_state()
            except OSError:
                pass
            raise
        if saver is not None:
            saver.cancel()

        try:
            if digest != r.sha256:
                self._discard()
                if kept:
                    raise _ResumedMismatch()
                raise ChecksumMismatch(
                    f"downloaded file has sha256 {digest}, but the server says {r.sha256}; nothing was saved",
                    expected=r.sha256, actual=digest)
            if self.durable:
                await asyncio.to_thread(os.fsync, self.fd)
        finally:
            os.close(self.fd)
            self.fd = None
        _place(self.part, self.target, self.overwrite)
        if self.durable:
            await asyncio.to_thread(fsync_dir, self.target.parent)
        return DownloadResult(
            path=self.target, model_id=r.model_id, name=r.name, version=r.version, size=r.size,
            sha256=r.sha256, bytes_transferred=self.transferred, resumed_bytes=kept,
            parallel=max(1, min(width, len(segments))), seconds=time.monotonic() - started)

    # -- the hash, computed as the file arrives ------------------------------

    def _prefix(self) -> int:
        """Bytes from the start of the file that have all arrived."""
        for seg in self.segments:
            if seg.remaining > 0:
                return seg.pos
        return self.remote.size

    async def _hash_prefix(self) -> str:
        """sha256 of the part file up to the prefix that has arrived, read back (from the page cache) in
        a thread while the rest arrives; the digest once ``complete``, "" if ``abandoned``."""
        h = hashlib.sha256()
        hashed = 0
        while not self.abandoned:
            prefix = self._prefix()
            # Whole blocks only until the last byte is in: a thread hop per piece received (1158 hops of
            # 0.9 MB for 1 GB in one stream) cost more in wake-ups of both threads than the hop moved.
            if prefix - hashed >= HASH_BLOCK or (self.complete and hashed < prefix):
                # One bounded block per hop, so that abandoning never waits long.
                end = min(prefix, hashed + HASH_BLOCK)
                await asyncio.to_thread(self._hash_block, h, hashed, end)
                hashed = end
            elif self.complete:
                return h.hexdigest()
            else:
                self.arrived.clear()
                await self.arrived.wait()
        return ""

    def _hash_block(self, h, start: int, end: int) -> None:
        # Into one reused 1 MiB buffer, which stays in the CPU's cache: a fresh 8 MiB bytes per read
        # cost an mmap, 2048 page faults and a munmap, and was evicted before it was hashed.
        view = self._hash_view
        while start < end:
            n = os.preadv(self.fd, [view[:min(len(view), end - start)]], start)
            if not n:
                raise ProtocolError(f"{self.part} is shorter than the bytes recorded as downloaded")
            h.update(view[:n])
            start += n

    async def _stop_hasher(self, hasher: asyncio.Task) -> None:
        # Not cancelled: a thread reading the descriptor must finish before it is closed.
        self.abandoned = True
        self.arrived.set()
        try:
            await asyncio.shield(hasher)
        except Exception:  # noqa: BLE001 - the download failed already; its half-done hash does not matter
            pass

    async def _save_periodically(self) -> None:
        while True:
            await asyncio.sleep(SAVE_INTERVAL)
            self._save_state()

    async def _fetch_all(self, width: int) -> None:
        pending = [s for s in self.segments if s.remaining > 0]
        if len(pending) == 1:
            await self._fetch_segment(pending[0])
            return
        # One iterator shared by the workers: each takes the next piece in file order.
        queue = iter(pending)

        async def worker() -> None:
            for seg in queue:
                await self._fetch_segment(seg)

        try:
            async with asyncio.TaskGroup() as tg:
                for _ in range(min(width, len(pending))):
                    tg.create_task(worker())
        except BaseExceptionGroup as eg:
            # One range failing cancels the others; report the failure, not the cancellations.
            first = next((e for e in eg.exceptions if isinstance(e, _ContentChanged)), eg.exceptions[0])
            raise first from None

    async def _fetch_empty(self) -> None:
        resp = await self.transport.send("GET", self.remote.url, headers={"If-Match": self.remote.etag})
        async with resp:
            if resp.status == 412:
                raise _ContentChanged()
            if resp.status != 200:
                raise await self.transport.error(resp)
            # One byte is enough to know the file is not empty; more is for nobody.
            body = await resp.content.read(1)
            self.transferred += len(body)
            if body:
                raise _ContentChanged()

    async def _fetch_segment(self, seg: Segment) -> None:
        policy = self.transport.retry
        failures = 0
        while seg.remaining > 0:
            before = seg.done
            try:
                await self._fetch_range(seg)
            except TRANSIENT_ERRORS as e:
                failures = 1 if seg.done > before else failures + 1
                if failures >= policy.attempts:
                    raise ConnectionFailed(f"download of {self.remote.url} kept failing at byte {seg.pos}: "
                                           f"{type(e).__name__}: {e}") from e
                delay = policy.delay(failures - 1)
                log.info("range at byte %d of %s failed (%s: %s); retrying in %.1f s",
                         seg.pos, self.remote.url, type(e).__name__, e, delay)
                await asyncio.sleep(delay)

    async def _fetch_range(self, seg: Segment) -> None:
        r = self.remote
        headers = {"Range": f"bytes={seg.pos}-{seg.end - 1}", "If-Range": r.etag}
        resp = await self.transport.send("GET", r.url, headers=headers)
        async with resp:
            if resp.status in (200, 416):
                raise _ContentChanged()  # If-Range did not match: a different file now
            if resp.status != 206:
                raise await self.transport.error(resp)
            if resp.headers.get("ETag") != r.etag:
                raise _ContentChanged()
            m = _CONTENT_RANGE_RE.match(resp.headers.get("Content-Range", ""))
            if not m or int(m[1]) != seg.pos or int(m[2]) != seg.end - 1 or int(m[3]) != r.size:
                raise ProtocolError(f"asked for bytes {seg.pos}-{seg.end - 1}/{r.size}, "
                                    f"got Content-Range {resp.headers.get('Content-Range')!r}")
            if self.limiter is None and splice.usable(resp, seg.remaining):
                await splice.receive(resp, self.fd, seg.pos, seg.remaining, timeout=self.transport.read_timeout,
                                     received=lambda n: self._received(seg, n))
                return
            content = resp.content
            block = self.limiter.block if self.limiter else 0
            while seg.remaining > 0:
                if block:
                    data = await content.read(min(block, seg.remaining))
                else:
                    # Each piece as the socket delivered it: read(n) joined pieces into a copy of every byte.
                    data, _ = await content.readchunk()
                    if len(data) > seg.remaining:  # a body longer than the range asked for: the rest is not ours
                        data = memoryview(data)[:seg.remaining]
                if not data:
                    # A complete-looking end before the promised length: treat as cut off.
                    raise aiohttp.ClientPayloadError(f"response ended at byte {seg.pos} of {seg.end}")
                write_at(self.fd, data, seg.pos)
                self._received(seg, len(data))
                if self.limiter:
                    await self.limiter.take(len(data))

    def _received(self, seg: Segment, n: int) -> None:
        """``n`` more bytes of ``seg`` are in the part file."""
        seg.done += n
        self.arrived.set()
        self.transferred += n
        if self.progress:
            self.progress(sum(s.done for s in self.segments), self.remote.size)
