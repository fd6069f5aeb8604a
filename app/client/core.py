"""The client's one implementation, on asyncio and aiohttp.

``AsyncModelServiceClient`` is that implementation; ``ModelServiceClient``
(sync.py) runs it on a private event loop, so both behave the same.

Requests are retried on transient failures: connection errors, 429 and 5xx,
with exponential backoff, honouring ``Retry-After``. A POST (registration) is
retried only when it certainly did not reach the service (the connection was
never made) or the service refused it with 429, so a retry can never register
a model twice.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Any, AsyncIterator, Mapping

import aiohttp
import orjson
from yarl import URL

from . import cache, rules
from . import download as dl
from .errors import ChecksumMismatch, ConnectionFailed, ModelServiceError, NotFound, ProtocolError, error_for
from .retry import TRANSIENT_ERRORS, TRANSIENT_STATUSES, RetryPolicy, retry_after

DEFAULT_URL = "http://localhost:8084"
API = "/api/v1/models"
USER_AGENT = "tensorfleet-model-client/0.1"
MAX_JSON = 64 * 1024 * 1024  # a JSON answer larger than this is not held in memory, whatever the server sends


def _origin(url: URL) -> tuple[str, str | None, int | None]:
    return url.scheme, url.host, url.port  # the port is the scheme's default when not given


def _query(filters: Mapping[str, Any]) -> dict[str, str]:
    """Listing filters as query parameters: lists become comma lists, None is left out."""
    out = {}
    for k, v in filters.items():
        if v is None:
            continue
        if k == "query":
            k = "q"
        if isinstance(v, (list, tuple, set)):
            v = ",".join(str(x) for x in v)
        elif isinstance(v, bool):
            v = "true" if v else "false"
        out[k] = str(v)
    return out


class AsyncModelServiceClient:
    """Client for the TensorFleet Model Service.

    ``base_url`` defaults to ``$MODEL_SERVICE_URL`` (else http://localhost:8084)
    and ``api_key`` to ``$MODEL_SERVICE_API_KEY``; the key is sent as
    ``X-API-Key``. ``request_count`` counts the HTTP requests sent, retries
    included. Use as ``async with AsyncModelServiceClient() as client: ...``
    or call ``close()``.

    Requests go only to the origin of ``base_url`` (scheme, host and port),
    and so does the API key. A redirect to the same origin is followed; a
    redirect to any other origin is refused with ``ProtocolError`` (nothing,
    key or not, is sent there): point ``base_url`` at the new place if the
    service has really moved.
    """

    def __init__(self, base_url: str | None = None, api_key: str | None = None, *,
                 retry: RetryPolicy | None = None, connect_timeout: float = 30.0,
                 read_timeout: float = 300.0, user_agent: str = USER_AGENT) -> None:
        base_url = base_url or os.environ.get("MODEL_SERVICE_URL") or DEFAULT_URL
        if "://" not in base_url:
            base_url = "http://" + base_url
        self.base_url = base_url.rstrip("/")
        self._origin = _origin(URL(self.base_url))
        self.api_key = api_key if api_key is not None else (os.environ.get("MODEL_SERVICE_API_KEY") or None)
        self.retry = retry or RetryPolicy()
        self.request_count = 0
        self._timeout = aiohttp.ClientTimeout(total=None, sock_connect=connect_timeout, sock_read=read_timeout)
        self._user_agent = user_agent
        self._session: aiohttp.ClientSession | None = None

    # -- plumbing ----------------------------------------------------------

    async def _get_session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            # Not a session header: aiohttp would carry it along a redirect to any host.
            self._session = aiohttp.ClientSession(headers={"User-Agent": self._user_agent}, timeout=self._timeout,
                                                  auto_decompress=False, middlewares=(self._own_origin_only,))
        return self._session

    async def _own_origin_only(self, req: aiohttp.ClientRequest, handler) -> aiohttp.ClientResponse:
        """Every request, redirects included, passes here: to the configured origin, with the key; else refused."""
        self._check_origin(req.url)
        if self.api_key:
            req.headers["X-API-Key"] = self.api_key
        return await handler(req)

    def _check_origin(self, url: URL) -> None:
        if _origin(url) != self._origin:
            raise ProtocolError(f"refused to send a request to {url}: this client talks only to {self.base_url} "
                                "(a redirect there, or a URL from the server, leads elsewhere); if the service "
                                "has moved, configure the client with its new URL")

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def __aenter__(self) -> "AsyncModelServiceClient":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    def _url(self, path: str) -> str:
        if "://" in path:
            self._check_origin(URL(path))
            return path
        return self.base_url + path

    async def _send(self, method: str, path: str, *, params: Mapping[str, str] | None = None,
                    headers: Mapping[str, str] | None = None, body: Any = None,
                    idempotent: bool | None = None, expect100: bool = False) -> aiohttp.ClientResponse:
        """Send a request, retrying transient failures; the caller reads and releases the response.

        ``body`` may be a callable that makes a fresh body for each attempt
        (a stream cannot be sent twice).
        """
        if idempotent is None:
            idempotent = method != "POST"
        session = await self._get_session()
        url = self._url(path)
        attempts = max(1, self.retry.attempts)
        for attempt in range(attempts):
            last = attempt == attempts - 1
            data = body() if callable(body) else body
            self.request_count += 1
            try:
                resp = await session.request(method, url, params=params, headers=headers, data=data,
                                             expect100=expect100)
            except TRANSIENT_ERRORS as e:
                never_connected = isinstance(e, aiohttp.ClientConnectorError)
                if last or not (idempotent or never_connected):
                    where = self.base_url if never_connected else f"{method} {url}"
                    raise ConnectionFailed(f"cannot reach the Model Service at {where}: "
                                           f"{type(e).__name__}: {e}") from e
                await asyncio.sleep(self.retry.delay(attempt))
                continue
            except aiohttp.ClientResponseError as e:
                # Not HTTP aiohttp will read (e.g. a NUL in a header), or endless redirects.
                raise ProtocolError(f"{method} {url}: {e.message}") from e
            if resp.status in TRANSIENT_STATUSES and not last and (idempotent or resp.status == 429):
                wait = self.retry.delay(attempt, retry_after(resp.headers))
                resp.release()
                await asyncio.sleep(wait)
                continue
            return resp
        raise AssertionError("unreachable")  # pragma: no cover

    async def _error(self, resp: aiohttp.ClientResponse) -> ModelServiceError:
        try:
            raw = await resp.content.read(64 * 1024)
            body = orjson.loads(raw) if raw else None
        except (orjson.JSONDecodeError, aiohttp.ClientError, asyncio.TimeoutError):
            body = None
        return error_for(resp.status, body, dict(resp.headers),
                         f"{resp.method} {resp.url.path} failed: {resp.status} {resp.reason}")

    async def _json(self, method: str, path: str, *, params: Mapping[str, str] | None = None,
                    json: Any = None, ok: tuple[int, ...] = (200, 201)) -> Any:
        headers = None
        body = None
        if json is not None:
            body = orjson.dumps(json)
            headers = {"Content-Type": "application/json"}
        resp = await self._send(method, path, params=params, headers=headers, body=body)
        async with resp:
            if resp.status not in ok:
                raise await self._error(resp)
            raw = await _read_json_body(resp)
        try:
            return orjson.loads(raw)
        except orjson.JSONDecodeError as e:
            raise ProtocolError(f"{method} {path}: the response is not JSON: {e}", status=resp.status) from None

    # -- the registry ------------------------------------------------------

    async def health(self) -> dict:
        """The /health document (its ``status`` says healthy or unhealthy)."""
        return await self._json("GET", "/health", ok=(200, 503))

    async def register_model(self, metadata: Mapping[str, Any] | None = None, **fields: Any) -> str:
        """Register a model (name, algorithm, metrics, ...) and return its id."""
        answer = await self._json("POST", API, json={**(metadata or {}), **fields})
        return rules.model_id(answer.get("model_id"), "model_id")

    async def upload(self, model_id: str, path: str | os.PathLike[str], *, filename: str | None = None,
                     progress: dl.Progress | None = None) -> dict:
        """Upload a model's file (streamed, with its sha256 for the service to check); its file metadata."""
        path = Path(path)
        size = path.stat().st_size
        sha256 = (await asyncio.to_thread(dl.sha256_file, path)).hexdigest()
        headers = {
            "Content-Type": "application/octet-stream",
            "Content-Length": str(size),
            "X-Checksum-Sha256": sha256,
        }
        resp = await self._send("PUT", f"{API}/{model_id}/upload", params={"filename": filename or path.name},
                                headers=headers, body=lambda: _file_body(path, size, progress), expect100=True)
        async with resp:
            if resp.status not in (200, 201):
                raise await self._error(resp)
            answer = orjson.loads(await _read_json_body(resp))
        fm = answer["file_metadata"]
        if fm.get("checksum") != f"sha256:{sha256}":
            raise ChecksumMismatch(f"the service stored checksum {fm.get('checksum')}, not sha256:{sha256}",
                                   expected=sha256, actual=fm.get("checksum"))
        return fm

    async def push(self, path: str | os.PathLike[str], *, progress: dl.Progress | None = None,
                   **metadata: Any) -> str:
        """Register a model and upload its file in one call; the new model's id.

        If the upload fails, the registration is deleted again.
        """
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no such file: {path}")
        model_id = await self.register_model(metadata)
        try:
            await self.upload(model_id, path, progress=progress)
        except BaseException:
            try:
                await self.delete_model(model_id)
            except Exception:
                pass
            raise
        return model_id

    async def get_model(self, model_id: str) -> dict:
        return await self._json("GET", f"{API}/{model_id}")

    async def get_by_name(self, name: str, version: str | None = None) -> dict:
        """The latest version of ``name``, or the given ``version``."""
        params = {"version": version} if version else None
        return await self._json("GET", f"{API}/by-name/{name}", params=params)

    async def latest(self, name: str) -> dict:
        return await self.get_by_name(name)

    async def list_models(self, **filters: Any) -> dict:
        """One page of the listing: ``{"models": [...], "pagination": {...}}``.

        Filters: algorithm, status, tags (list: any of), q (or query), min_accuracy,
        created_by, sort (e.g. ``-metrics.accuracy``), page, limit.
        """
        return await self._json("GET", API, params=_query(filters))

    async def search_models(self, **filters: Any) -> list[dict]:
        """The models of one page of the listing; see ``list_models`` for the filters."""
        return (await self.list_models(**filters))["models"]

    async def list_versions(self, name: str) -> list[dict]:
        """Every version of ``name``, newest first."""
        doc = await self.latest(name)
        model_id = rules.model_id(doc.get("id"), "id")
        return (await self._json("GET", f"{API}/{model_id}/versions"))["versions"]

    async def create_version(self, model_id: str, **changes: Any) -> str:
        """A new version from ``model_id`` with ``changes``; the new model's id."""
        answer = await self._json("POST", f"{API}/{model_id}/versions", json=changes)
        return rules.model_id(answer.get("model_id"), "model_id")

    async def update_model(self, model_id: str, **fields: Any) -> dict:
        """Change hyperparameters, metrics, dataset_info, tags, status or description; the updated model."""
        return (await self._json("PUT", f"{API}/{model_id}", json=fields))["model"]

    async def delete_model(self, model_id: str) -> dict:
        return await self._json("DELETE", f"{API}/{model_id}")

    async def file_info(self, model_id: str) -> dict:
        return await self._json("GET", f"{API}/{model_id}/info")

    async def statistics(self) -> dict:
        """GET /api/v1/models/statistics (NotFound if the service does not offer it)."""
        return await self._json("GET", f"{API}/statistics")

    # -- files -------------------------------------------------------------

    async def probe(self, id_or_name: str, version: str | None = None, *,
                    if_none_match: str | None = None) -> tuple[int, dl.RemoteFile | dl.Unchanged]:
        """HEAD the download of a model: ``(200, RemoteFile)``, or ``(304, Unchanged)`` if ``if_none_match``
        still holds.

        A 24-hex string is tried as an id first, then as a name.
        """
        candidates = []
        if version is None and rules.is_model_id(id_or_name):
            candidates.append((f"{API}/{id_or_name}", None))
        candidates.append((f"{API}/by-name/{id_or_name}", {"version": version} if version else None))
        headers = {"If-None-Match": if_none_match} if if_none_match else None
        for i, (meta_path, params) in enumerate(candidates):
            resp = await self._send("HEAD", meta_path + "/download", params=params, headers=headers)
            async with resp:
                if resp.status == 200:
                    return 200, dl.RemoteFile.from_response(resp, self.base_url)
                if resp.status == 304:
                    return 304, dl.Unchanged.from_response(resp)
            # HEAD answers carry no body: ask the metadata endpoint what is wrong.
            error = await self._explain(resp, meta_path, params)
            if isinstance(error, NotFound) and error.code == "not_found" and i + 1 < len(candidates):
                continue
            if len(candidates) > 1 and isinstance(error, NotFound) and error.code == "not_found":
                error = NotFound(f"no model with id or name {id_or_name}", status=404, code="not_found")
            raise error
        raise AssertionError("unreachable")  # pragma: no cover

    async def _explain(self, resp: aiohttp.ClientResponse, meta_path: str,
                       params: Mapping[str, str] | None) -> ModelServiceError:
        if resp.status in (400, 404):
            try:
                doc = await self._json("GET", meta_path, params=params)
            except ModelServiceError as e:
                return e
            if not doc.get("file_metadata"):
                return NotFound(f"model {doc.get('id')} ({doc.get('name')} {doc.get('version')}) "
                                "has no file uploaded yet", status=404, code="no_file")
        return error_for(resp.status, None, dict(resp.headers),
                         f"HEAD {resp.url.path} failed: {resp.status} {resp.reason}")

    async def download(self, id_or_name: str, path: str | os.PathLike[str], version: str | None = None, *,
                       parallel: int | None = None, limit_rate: float | None = None,
                       progress: dl.Progress | None = None, resume: bool = True,
                       overwrite: bool = False) -> dl.DownloadResult:
        """Download a model's file (by id, or the latest/``version`` of a name) to ``path``.

        ``path`` may be a directory: the file keeps the server's file name if
        that is a plain, visible file name, else it is ``<name>-<version>``. An
        existing file is never replaced unless ``overwrite`` (FileExistsError).
        The file appears at the target only once its sha256 matches the
        server's (else ChecksumMismatch). An interrupted download resumes from
        its ``.part`` file; files over 64 MB come in ``parallel`` ranges
        (default 4). ``limit_rate`` caps the speed in bytes per second. A file
        larger than the free space there is refused (InsufficientSpace).
        """
        _, remote = await self.probe(id_or_name, version)
        assert isinstance(remote, dl.RemoteFile)
        target = Path(path)
        if target.is_dir():
            target = rules.inside(target, remote.filename)
        elif not target.parent.is_dir():
            raise FileNotFoundError(f"no such directory: {target.parent}")

        async def reprobe() -> dl.RemoteFile:
            return (await self.probe(remote.model_id))[1]

        return await dl.download_file(self, remote, target, reprobe=reprobe, parallel=parallel,
                                      limit_rate=limit_rate, progress=progress, resume=resume, overwrite=overwrite)

    async def fetch_result(self, name: str, version: str | None = None,
                           cache_dir: str | os.PathLike[str] | None = None, *, parallel: int | None = None,
                           limit_rate: float | None = None, progress: dl.Progress | None = None,
                           allow_stale: bool = False) -> dl.DownloadResult:
        """``fetch``, with the details: whether it was cached, bytes transferred, ..."""
        return await cache.fetch(self, name, version, cache_dir, parallel=parallel, limit_rate=limit_rate,
                                 progress=progress, allow_stale=allow_stale)

    async def fetch(self, name: str, version: str | None = None, cache_dir: str | os.PathLike[str] | None = None,
                    *, parallel: int | None = None, limit_rate: float | None = None,
                    progress: dl.Progress | None = None, allow_stale: bool = False) -> Path:
        """The path of a verified local copy of the model, from the cache when it is still current.

        One conditional request (``If-None-Match``) revalidates a cached copy;
        only a changed or missing file is downloaded. Processes fetching the same
        model on one host take turns on a file lock, so it is downloaded once.
        ``cache_dir`` defaults to ``$MODEL_SERVICE_CACHE_DIR`` or
        ``~/.cache/tensorfleet/models``. With ``allow_stale``, a cached copy is
        returned when the service cannot be reached.
        """
        return (await self.fetch_result(name, version, cache_dir, parallel=parallel, limit_rate=limit_rate,
                                        progress=progress, allow_stale=allow_stale)).path


async def _read_json_body(resp: aiohttp.ClientResponse) -> bytes:
    """The body, or ProtocolError once it proves larger than MAX_JSON (declared or sent)."""
    too_big = ProtocolError(f"{resp.method} {resp.url}: the answer is larger than {MAX_JSON} bytes",
                            status=resp.status)
    if resp.content_length is not None and resp.content_length > MAX_JSON:
        raise too_big
    body = bytearray()
    async for block in resp.content.iter_any():
        body += block
        if len(body) > MAX_JSON:
            raise too_big
    return bytes(body)


async def _file_body(path: Path, size: int, progress: dl.Progress | None) -> AsyncIterator[bytes]:
    sent = 0
    if progress:
        progress(0, size)
    with open(path, "rb") as f:
        while True:
            block = await asyncio.to_thread(f.read, dl.BLOCK)
            if not block:
                return
            sent += len(block)
            yield block
            if progress:
                progress(sent, size)
