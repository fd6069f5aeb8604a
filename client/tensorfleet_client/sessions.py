"""Resumable uploads: a large file goes to the service through an upload session.

A file over ``SessionConfig.threshold`` is sent in chunks (``PATCH
/api/v1/uploads/<id>``, each with ``Content-Range`` and an RFC 9530
``Content-Digest``), then completed with ``PUT /api/v1/uploads/<id>?digest=``,
which stores it as a blob; the caller attaches the blob to its model (or names
it in a snapshot commit). The protocol follows the OCI distribution spec's
blob uploads.

The state of an upload (the session's URL, the file's size, mtime_ns and
sha256) is kept in ``<cache>/uploads/<key>.json``, ``key`` being the sha256 of
``<service url>|<absolute path>|<size>|<mtime_ns>``. A push killed mid-upload
and run again finds it, asks the service for the session's offset and sends
only the rest. The state is ignored (and replaced) when the file changed or
the service no longer knows the session (404: expired, or its store was
reset), and removed once the upload is complete.

Transient failures (connection refused or reset, 5xx, 429, 409 upload_busy)
are retried with the client's ``RetryPolicy`` backoff; after each one the
offset is asked for again, so a service restarted mid-push is survived. A
416 answer carries the service's offset: the upload continues from there.

Nothing the service answers is trusted: a session ``Location`` on another
origin or outside ``/api/v1/uploads/``, an offset outside the file, an answer
naming another digest or size are ``ProtocolError``; the upload's requests go
only to the client's own origin.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import os
import re
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import AsyncIterator, Callable

import aiohttp
import orjson
from yarl import URL

from .download import BLOCK, MiB, default_cache_dir
from .errors import (
    ChecksumMismatch,
    Conflict,
    ConnectionFailed,
    ModelServiceError,
    ProtocolError,
    RateLimited,
    ServerError,
)
from .transport import TRANSIENT_ERRORS, Transport, read_json_body, retry_after

UPLOADS = "/api/v1/uploads"
THRESHOLD_ENV = "MODEL_SERVICE_SESSION_THRESHOLD"
DEFAULT_THRESHOLD = 64 * MiB
DEFAULT_CHUNK = 32 * MiB
MIN_CHUNK = 1 * MiB  # the Client API's floor (tests use small chunks); the CLI asks for CLI_MIN_CHUNK
CLI_MIN_CHUNK = 16 * MiB
MAX_CHUNK = 64 * MiB
STATE_FORMAT = 1
STATE_MAX_AGE = 7 * 24 * 3600  # state files older than this are removed: their sessions expired long ago

_ID_RE = re.compile(r"^[0-9a-f]{24}$")
_SIZE_RE = re.compile(r"^\s*(\d+)\s*([kKmMgGtT]?)(i?[bB])?\s*$")
_RANGE_RE = re.compile(r"^(?:bytes[= ])?0-(\d+)$")

Advance = Callable[[int], None]  # the offset reached so far in one file


def parse_size(value: str, what: str) -> int:
    """A size in bytes: ``1048576``, ``512k``, ``64M``, ``64MiB``, ``64MB``.

    k, M, G, T and KiB, MiB, GiB, TiB are powers of 1024; KB, MB, GB, TB powers of
    1000, as the service's own settings (MAX_FILE_SIZE) and dd read them.
    """
    m = _SIZE_RE.match(value)
    if not m:
        raise ValueError(f"{what}: not a size: {value!r} (for example 64MiB, 512k, 1073741824)")
    letter, suffix = m[2].lower(), (m[3] or "").lower()
    base = 1000 if letter and suffix == "b" else 1024
    return int(m[1]) * base ** " kmgt".index(letter or " ")


def check_chunk_size(n: int, minimum: int = MIN_CHUNK) -> int:
    if not isinstance(n, int) or not minimum <= n <= MAX_CHUNK:
        raise ValueError(f"chunk_size must be from {minimum // MiB} MiB to {MAX_CHUNK // MiB} MiB, got {n!r}")
    return n


def default_threshold() -> int:
    value = os.environ.get(THRESHOLD_ENV)
    return DEFAULT_THRESHOLD if not value else parse_size(value, THRESHOLD_ENV)


@dataclass(frozen=True)
class SessionConfig:
    """When and how files are sent through upload sessions.

    ``threshold``: files larger than this many bytes use a session (default
    ``$MODEL_SERVICE_SESSION_THRESHOLD``, else 64 MiB). ``chunk_size``: bytes
    per PATCH (1 to 64 MiB; default 32 MiB). ``state_dir``: where the resume
    state lives (``<cache>/uploads``).
    """

    threshold: int = field(default_factory=default_threshold)
    chunk_size: int = DEFAULT_CHUNK
    state_dir: Path | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.threshold, int) or self.threshold < 0:
            raise ValueError(f"session_threshold must be a number of bytes >= 0, got {self.threshold!r}")
        check_chunk_size(self.chunk_size)

    def applies(self, size: int) -> bool:
        return size > self.threshold

    def states(self) -> Path:
        if self.state_dir is not None:
            return Path(self.state_dir)
        return default_cache_dir() / "uploads"


@dataclass
class SessionResult:
    digest: str
    size: int
    bytes_sent: int  # bytes of this file sent by this call (a chunk sent twice counts twice)
    resumed_bytes: int  # bytes the service already held from an earlier, interrupted run


class _Gone(Exception):
    """404: the service does not know the session (any more)."""


class _Moved(Exception):
    """416: the session's offset is not where the request started."""

    def __init__(self, offset: int) -> None:
        self.offset = offset


# -- the state file ------------------------------------------------------------------


class _State:
    def __init__(self, folder: Path, base_url: str, path: Path, size: int, mtime_ns: int) -> None:
        self.folder = folder
        self.base_url = base_url
        self.size, self.mtime_ns = size, mtime_ns
        key = hashlib.sha256(f"{base_url}|{path.resolve()}|{size}|{mtime_ns}".encode()).hexdigest()
        self.path = folder / f"{key}.json"

    def load(self, sha256: str) -> str | None:
        """The session id an earlier run of this upload saved, if it was saved for this very file."""
        try:
            data = orjson.loads(self.path.read_bytes())
        except (OSError, orjson.JSONDecodeError):
            return None
        if not isinstance(data, dict) or data.get("format") != STATE_FORMAT:
            return None
        url = data.get("session")
        prefix = f"{self.base_url}{UPLOADS}/"
        if (data.get("size") != self.size or data.get("mtime_ns") != self.mtime_ns or data.get("sha256") != sha256
                or not isinstance(url, str) or not url.startswith(prefix) or not _ID_RE.match(url[len(prefix):])):
            return None
        return url[len(prefix):]

    def save(self, session_id: str, sha256: str) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        data = {"format": STATE_FORMAT, "session": f"{self.base_url}{UPLOADS}/{session_id}", "size": self.size,
                "mtime_ns": self.mtime_ns, "sha256": sha256}
        tmp = self.path.with_name(f"{self.path.name}.{uuid.uuid4().hex[:8]}.tmp")
        tmp.write_bytes(orjson.dumps(data))
        os.replace(tmp, self.path)

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)

    def prune(self) -> None:
        """Remove state files nobody finished long ago (and temp files a kill left behind)."""
        try:
            entries = list(os.scandir(self.folder))
        except OSError:
            return
        now = time.time()
        for entry in entries:
            try:
                if now - entry.stat().st_mtime > STATE_MAX_AGE:
                    os.unlink(entry.path)
            except OSError:
                pass


# -- answers -------------------------------------------------------------------------


async def _json(resp: aiohttp.ClientResponse, what: str) -> dict:
    raw = await read_json_body(resp)
    try:
        doc = orjson.loads(raw)
    except orjson.JSONDecodeError as e:
        raise ProtocolError(f"{what} answered {resp.status} with a body that is not JSON: {e}",
                            status=resp.status) from None
    if not isinstance(doc, dict):
        raise ProtocolError(f"{what} answered {resp.status} with {str(doc)[:200]}, not an object", status=resp.status)
    return doc


def _offset(doc: dict, size: int, what: str) -> int:
    offset = doc.get("offset")
    if isinstance(offset, bool) or not isinstance(offset, int) or not 0 <= offset <= size:
        raise ProtocolError(f"{what}: the service says the offset is {str(offset)[:50]}, which is not within the "
                            f"file's {size} bytes")
    return offset


def _check_blob(doc: dict, digest: str, size: int, what: str) -> None:
    if doc.get("digest") != digest or doc.get("size_bytes") != size:
        raise ProtocolError(f"{what}: the service stored {str(doc.get('digest'))[:80]} "
                            f"({str(doc.get('size_bytes'))[:20]} bytes), not {digest} ({size} bytes)")


def _session_id(transport: Transport, resp: aiohttp.ClientResponse, doc: dict) -> str:
    """The new session's id from its ``Location``, which must name a session on this service."""
    location = resp.headers.get("Location")
    if not location:
        raise ProtocolError(f"POST {UPLOADS} answered 202 without a Location")
    try:
        url = resp.url.join(URL(location))
    except ValueError:
        raise ProtocolError(f"POST {UPLOADS} answered with Location {location[:200]!r}, not a URL") from None
    base = URL(transport.base_url)
    prefixes = {UPLOADS + "/", base.path.rstrip("/") + UPLOADS + "/"}
    session_id = next((url.path[len(p):] for p in prefixes if url.path.startswith(p)), "")
    if (url.scheme, url.host, url.port) != (base.scheme, base.host, base.port) or not _ID_RE.match(session_id) \
            or url.query_string or url.fragment:
        raise ProtocolError(f"POST {UPLOADS} answered with Location {location[:200]!r}: not an upload session "
                            f"of {transport.base_url}; nothing was sent there")
    if doc.get("id") != session_id:
        raise ProtocolError(f"POST {UPLOADS}: the Location names session {session_id}, the body "
                            f"{str(doc.get('id'))[:40]}")
    return session_id


def _offset_of_416(error: ModelServiceError, body: dict | None, size: int, what: str) -> int:
    """The offset a 416 tells: the error's ``offset``, else its ``Range: 0-<offset-1>`` (none: 0)."""
    err = body.get("error") if isinstance(body, dict) else None
    if isinstance(err, dict) and "offset" in err:
        return _offset(err, size, what)
    rng = error.headers.get("Range")
    if rng is None:
        return 0
    m = _RANGE_RE.match(rng.strip())
    if not m:
        raise ProtocolError(f"{what} answered 416 with Range {rng[:80]!r}")
    return _offset({"offset": int(m[1]) + 1}, size, what)


def _transient(e: BaseException) -> bool:
    if isinstance(e, (ConnectionFailed, ServerError, RateLimited, *TRANSIENT_ERRORS)):
        return True
    return isinstance(e, Conflict) and e.code == "upload_busy"


# -- the requests --------------------------------------------------------------------


def _chunk_digest(path: Path, start: int, length: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        f.seek(start)
        left = length
        while left > 0:
            block = f.read(min(8 * MiB, left))
            if not block:
                raise ModelServiceError(f"{path} got shorter while it was being sent", code="file_changed")
            h.update(block)
            left -= len(block)
    return "sha-256=:" + base64.b64encode(h.digest()).decode() + ":"


async def file_range_body(path: Path, start: int, length: int, advance: Callable[[int], None]) -> AsyncIterator[bytes]:
    """Bytes [start, start+length) of the file as a request body, read in a thread; ``advance`` is told each block."""
    with open(path, "rb") as f:
        f.seek(start)
        left = length
        while left > 0:
            block = await asyncio.to_thread(f.read, min(BLOCK, left))
            if not block:
                raise ModelServiceError(f"{path} got shorter while it was being sent", code="file_changed")
            left -= len(block)
            advance(len(block))
            yield block


class _Upload:
    def __init__(self, transport: Transport, path: Path, sha256: str, size: int, config: SessionConfig,
                 advance: Advance | None) -> None:
        self.transport, self.path, self.size, self.config = transport, path, size, config
        self.digest = f"sha256:{sha256}"
        self.sha256 = sha256
        self._advance = advance
        self.bytes_sent = 0

    def report(self, offset: int) -> None:
        if self._advance:
            self._advance(offset)

    async def open(self) -> tuple[str, int] | None:
        """POST a new session: (its id, offset 0), or None when the service holds the content already."""
        what = f"POST {UPLOADS}"
        resp = await self.transport.send("POST", UPLOADS, body=orjson.dumps({"size_bytes": self.size,
                                                                               "checksum": self.digest}),
                                         headers={"Content-Type": "application/json"})
        async with resp:
            if resp.status == 201:
                _check_blob(await _json(resp, what), self.digest, self.size, what)
                return None
            if resp.status != 202:
                raise await self.transport.error(resp)
            doc = await _json(resp, what)
            session_id = _session_id(self.transport, resp, doc)
        return session_id, _offset(doc, self.size, what)

    async def offset(self, session_id: str) -> int:
        what = f"GET {UPLOADS}/{session_id}"
        resp = await self.transport.send("GET", f"{UPLOADS}/{session_id}")
        async with resp:
            if resp.status == 404:
                raise _Gone()
            if resp.status != 200:
                raise await self.transport.error(resp)
            doc = await _json(resp, what)
        for key, mine in (("size_bytes", self.size), ("checksum", self.digest)):
            if doc.get(key) is not None and doc.get(key) != mine:
                raise ProtocolError(f"{what}: the session is for {key} {str(doc.get(key))[:80]}, not {mine}")
        return _offset(doc, self.size, what)

    async def patch(self, session_id: str, start: int) -> int:
        """Send the chunk at ``start``; the new offset."""
        length = min(self.config.chunk_size, self.size - start)
        end = start + length - 1
        what = f"PATCH {UPLOADS}/{session_id}"
        content_digest = await asyncio.to_thread(_chunk_digest, self.path, start, length)
        headers = {"Content-Type": "application/octet-stream", "Content-Length": str(length),
                   "Content-Range": f"bytes {start}-{end}/{self.size}", "Content-Digest": content_digest}
        done = start

        def advance(n: int) -> None:
            nonlocal done
            done += n
            self.bytes_sent += n
            self.report(done)

        def body() -> AsyncIterator[bytes]:
            nonlocal done
            done = start
            return file_range_body(self.path, start, length, advance)

        resp = await self.transport.send("PATCH", f"{UPLOADS}/{session_id}", headers=headers, body=body,
                                         idempotent=False)
        async with resp:
            if resp.status == 202:
                offset = _offset(await _json(resp, what), self.size, what)
                if offset != end + 1:
                    raise ProtocolError(f"{what}: bytes {start}-{end} accepted, but the service says the offset "
                                        f"is now {offset}")
                return offset
            await self._raise(resp, session_id, what, start)
        raise AssertionError("unreachable")  # pragma: no cover

    async def finish(self, session_id: str) -> None:
        what = f"PUT {UPLOADS}/{session_id}"
        resp = await self.transport.send("PUT", f"{UPLOADS}/{session_id}", params={"digest": self.digest},
                                         headers={"Content-Length": "0"}, idempotent=False)
        async with resp:
            if resp.status in (200, 201):
                _check_blob(await _json(resp, what), self.digest, self.size, what)
                return
            await self._raise(resp, session_id, what, self.size)

    async def _raise(self, resp: aiohttp.ClientResponse, session_id: str, what: str, start: int) -> None:
        if resp.status == 404:
            raise _Gone()
        error, body = await self.transport.error_and_body(resp)
        if resp.status == 416:
            offset = _offset_of_416(error, body, self.size, what)
            if offset == start:
                raise ProtocolError(f"{what} answered 416 with offset {offset}, where the request started")
            raise _Moved(offset)
        if resp.status == 422 and error.code in ("digest_mismatch", "size_mismatch"):
            # The bytes read differ from the bytes hashed: the file is changing under us.
            await self.cancel(session_id)
            raise ChecksumMismatch(f"{self.path}: the service received other bytes than the file's sha256 "
                                   f"{self.sha256} says ({error.message}); did the file change while it was sent?",
                                   expected=self.sha256, status=422, code=error.code)
        raise error

    async def cancel(self, session_id: str) -> None:
        try:
            resp = await self.transport.send("DELETE", f"{UPLOADS}/{session_id}")
            resp.release()
        except ModelServiceError:
            pass


async def upload(transport: Transport, path: Path, sha256: str, size: int, config: SessionConfig, *,
                 advance: Advance | None = None) -> SessionResult:
    """Store the file ``path`` (whose sha256 and size the caller computed) as a blob through an upload session,
    resuming the one an earlier run left; ``advance(offset)`` follows the bytes the service holds."""
    st = path.stat()
    if st.st_size != size:
        raise ModelServiceError(f"{path} changed size while it was being pushed", code="file_changed")
    job = _Upload(transport, path, sha256, size, config, advance)
    state = _State(config.states(), transport.base_url, path, size, st.st_mtime_ns)
    state.prune()
    session_id = state.load(sha256)
    offset: int | None = None
    resumed: int | None = None
    failures = 0  # in a row, without progress
    policy = transport.retry
    while True:
        try:
            if session_id is None:
                opened = await job.open()
                if opened is None:
                    state.remove()
                    job.report(size)
                    return SessionResult(job.digest, size, job.bytes_sent, size if resumed is None else resumed)
                session_id, offset = opened
                state.save(session_id, sha256)
            if offset is None:
                offset = await job.offset(session_id)
            if resumed is None:
                resumed = offset
            job.report(offset)
            while offset < size:
                offset = await job.patch(session_id, offset)
                failures = 0
            await job.finish(session_id)
            state.remove()
            return SessionResult(job.digest, size, job.bytes_sent, resumed)
        except _Gone:
            # Expired, or the service lost it: a new session (the POST finds the blob if a lost answer stored it).
            state.remove()
            session_id = offset = None
            failures += 1
            if failures >= max(1, policy.attempts):
                raise ProtocolError(f"{path}: the service keeps forgetting its upload sessions") from None
        except _Moved as moved:
            offset = moved.offset
            failures += 1
            if failures >= max(1, policy.attempts):
                raise ProtocolError(f"{path}: the service's offset keeps moving ({offset})") from None
        except Exception as e:
            if not _transient(e):
                raise
            failures += 1
            if failures >= max(1, policy.attempts):
                if isinstance(e, ModelServiceError):
                    raise
                raise ConnectionFailed(f"uploading {path} kept failing: {type(e).__name__}: {e}") from e
            headers = e.headers if isinstance(e, ModelServiceError) else {}
            await asyncio.sleep(policy.delay(failures - 1, retry_after(headers)))
            offset = None  # ask again: the failed request may have counted, or not
