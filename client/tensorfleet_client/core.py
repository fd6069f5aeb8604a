"""The client's one implementation, on asyncio and aiohttp.

``AsyncModelServiceClient`` is that implementation; ``ModelServiceClient``
(sync.py) runs it on a private event loop, so both behave the same. Sending,
retries and the origin rule are the transport's (transport.py); downloads and
the cache are download.py's and cache.py's.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, AsyncIterator, Mapping, Sequence

import orjson

from . import download as dl
from . import rules, sessions
from .errors import ChecksumMismatch, ProtocolError
from .manifest import Manifest
from .transport import API, USER_AGENT, RetryPolicy, Transport, read_json_body

if TYPE_CHECKING:
    from . import snapshot


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
    service has really moved. ``transport`` is the session all requests go
    through (for ``download.download_file`` and the like).

    Files larger than ``session_threshold`` bytes (default
    ``$MODEL_SERVICE_SESSION_THRESHOLD``, else 64 MiB) are pushed through a
    resumable upload session in chunks of ``chunk_size`` bytes (1 to 64 MiB,
    default 32 MiB; the CLI allows 16 to 64 MiB). A push interrupted and run
    again sends only what the service lacks; its state is kept under
    ``cache_dir/uploads`` (default: the model cache, ``$MODEL_SERVICE_CACHE_DIR``
    or ``~/.cache/tensorfleet/models``). See sessions.py.
    """

    def __init__(self, base_url: str | None = None, api_key: str | None = None, *,
                 retry: RetryPolicy | None = None, connect_timeout: float = 30.0,
                 read_timeout: float = 300.0, user_agent: str = USER_AGENT,
                 session_threshold: int | None = None, chunk_size: int = sessions.DEFAULT_CHUNK,
                 cache_dir: str | os.PathLike[str] | None = None) -> None:
        self.sessions = sessions.SessionConfig(
            threshold=sessions.default_threshold() if session_threshold is None else session_threshold,
            chunk_size=chunk_size, state_dir=None if cache_dir is None else Path(cache_dir) / "uploads")
        self.transport = Transport(base_url, api_key, retry=retry, connect_timeout=connect_timeout,
                                   read_timeout=read_timeout, user_agent=user_agent)

    @property
    def base_url(self) -> str:
        return self.transport.base_url

    @property
    def api_key(self) -> str | None:
        return self.transport.api_key

    @property
    def retry(self) -> RetryPolicy:
        return self.transport.retry

    @property
    def request_count(self) -> int:
        return self.transport.request_count

    async def close(self) -> None:
        await self.transport.close()

    async def __aenter__(self) -> "AsyncModelServiceClient":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    # -- the registry ------------------------------------------------------

    async def health(self) -> dict:
        """The /health document (its ``status`` says healthy or unhealthy)."""
        return await self.transport.json("GET", "/health", ok=(200, 503))

    async def register_model(self, metadata: Mapping[str, Any] | None = None, **fields: Any) -> str:
        """Register a model (name, algorithm, metrics, ...) and return its id."""
        answer = await self.transport.json("POST", API, json={**(metadata or {}), **fields})
        return rules.model_id(answer.get("model_id"), "model_id")

    async def upload(self, model_id: str, path: str | os.PathLike[str], *, filename: str | None = None,
                     progress: dl.Progress | None = None) -> dict:
        """Upload a model's file (streamed, with its sha256 for the service to check); its file metadata.

        A file over the session threshold goes through a resumable upload session, then is attached.
        """
        path = Path(path)
        size = path.stat().st_size
        sha256 = (await asyncio.to_thread(dl.sha256_file, path)).hexdigest()
        if self.sessions.applies(size):
            await self.upload_blob(path, sha256, size, progress=progress)
            return await self.attach(model_id, sha256, filename=filename or path.name)
        headers = {
            "Content-Type": "application/octet-stream",
            "Content-Length": str(size),
            "X-Checksum-Sha256": sha256,
        }
        resp = await self.transport.send("PUT", f"{API}/{model_id}/upload", params={"filename": filename or path.name},
                                headers=headers, body=lambda: _file_body(path, size, progress), expect100=True)
        async with resp:
            if resp.status not in (200, 201):
                raise await self.transport.error(resp)
            answer = orjson.loads(await read_json_body(resp))
        return _file_metadata(answer, sha256)

    async def upload_blob(self, path: str | os.PathLike[str], sha256: str, size: int, *,
                          progress: dl.Progress | None = None) -> sessions.SessionResult:
        """Store a file as a blob through a resumable upload session (see sessions.py); ``sha256`` and ``size``
        are the file's, as the caller computed them."""
        path = Path(path)
        report = (lambda done: progress(done, size)) if progress else None
        return await sessions.upload(self.transport, path, sha256, size, self.sessions, advance=report)

    async def attach(self, model_id: str, sha256: str, *, filename: str | None = None) -> dict:
        """Make a stored blob the file of a single-file model; its file metadata.

        PUT (the contract allows POST or PUT): attaching the same blob twice
        is harmless, so a lost answer is retried like any idempotent request.
        """
        params = {"digest": f"sha256:{sha256}"}
        if filename:
            params["filename"] = filename
        answer = await self.transport.json("PUT", f"{API}/{model_id}/upload", params=params)
        return _file_metadata(answer, sha256)

    async def push(self, path: str | os.PathLike[str], *, progress: dl.Progress | None = None,
                   **metadata: Any) -> str:
        """Register a model and upload its file in one call; the new model's id.

        If the upload fails, the registration is deleted again. A folder is
        pushed as a snapshot (``push_folder``). A file over the session
        threshold is stored first (resumably), then the model is registered
        and the file attached: a push killed mid-upload leaves no empty model.
        """
        path = Path(path)
        if path.is_dir():
            return (await self.push_folder(path, progress=progress, **metadata)).model_id
        if not path.is_file():
            raise FileNotFoundError(f"no such file: {path}")
        size = path.stat().st_size
        sha256 = None
        if self.sessions.applies(size):
            sha256 = (await asyncio.to_thread(dl.sha256_file, path)).hexdigest()
            await self.upload_blob(path, sha256, size, progress=progress)
        model_id = await self.register_model(metadata)
        try:
            if sha256 is None:
                await self.upload(model_id, path, progress=progress)
            else:
                await self.attach(model_id, sha256, filename=path.name)
        except BaseException:
            try:
                await self.delete_model(model_id)
            except Exception:
                pass
            raise
        return model_id

    async def push_folder(self, path: str | os.PathLike[str], *, progress: dl.Progress | None = None,
                          **metadata: Any) -> snapshot.PushResult:
        """Register a version made of every file under the folder ``path``: the files are hashed in threads,
        only the blobs the service lacks are uploaded (4 at once), then the version is committed with its
        list of files in one request (it exists whole or not at all). ``progress`` counts bytes sent."""
        path = Path(path)
        if not path.is_dir():
            raise NotADirectoryError(f"not a folder: {path}")
        from . import snapshot  # here, not at the top: a plain push or pull never loads it

        return await snapshot.push_folder(self.transport, path, metadata, progress=progress,
                                          sessions_config=self.sessions)

    async def manifest(self, id_or_name: str, version: str | None = None) -> Manifest:
        """A version's list of files (checked against the path rules) and snapshot digest."""
        from . import snapshot  # here, not at the top: a plain push or pull never loads it

        _, m, _ = await snapshot.get_manifest(self.transport, id_or_name, version)
        assert m is not None
        return m

    async def pull_folder(self, id_or_name: str, path: str | os.PathLike[str], version: str | None = None, *,
                          include: Sequence[str] = (), exclude: Sequence[str] = (), overwrite: bool = False,
                          parallel: int | None = None, limit_rate: float | None = None,
                          progress: dl.Progress | None = None) -> snapshot.PullResult:
        """Download a version's files (those matching any ``include`` glob and no ``exclude`` glob) into the
        folder ``path``, each verified; the folder appears complete or not at all, and a pull interrupted and
        run again keeps every file it verified. An existing non-empty folder is replaced only with
        ``overwrite`` (FileExistsError)."""
        from . import snapshot  # here, not at the top: a plain push or pull never loads it

        return await snapshot.pull_folder(self.transport, id_or_name, path, version, include=include,
                                          exclude=exclude, overwrite=overwrite, parallel=parallel,
                                          limit_rate=limit_rate, progress=progress)

    async def get_model(self, model_id: str) -> dict:
        return await self.transport.json("GET", f"{API}/{model_id}")

    async def get_by_name(self, name: str, version: str | None = None) -> dict:
        """The latest version of ``name``, or the given ``version``."""
        params = {"version": version} if version else None
        return await self.transport.json("GET", f"{API}/by-name/{name}", params=params)

    async def latest(self, name: str) -> dict:
        return await self.get_by_name(name)

    async def list_models(self, **filters: Any) -> dict:
        """One page of the listing: ``{"models": [...], "pagination": {...}}``.

        Filters: algorithm, status, tags (list: any of), q (or query), min_accuracy,
        created_by, sort (e.g. ``-metrics.accuracy``), page, limit.
        """
        return await self.transport.json("GET", API, params=_query(filters))

    async def search_models(self, **filters: Any) -> list[dict]:
        """The models of one page of the listing; see ``list_models`` for the filters."""
        return (await self.list_models(**filters))["models"]

    async def list_versions(self, name: str) -> list[dict]:
        """Every version of ``name``, newest first."""
        doc = await self.latest(name)
        model_id = rules.model_id(doc.get("id"), "id")
        return (await self.transport.json("GET", f"{API}/{model_id}/versions"))["versions"]

    async def create_version(self, model_id: str, **changes: Any) -> str:
        """A new version from ``model_id`` with ``changes``; the new model's id."""
        answer = await self.transport.json("POST", f"{API}/{model_id}/versions", json=changes)
        return rules.model_id(answer.get("model_id"), "model_id")

    async def update_model(self, model_id: str, **fields: Any) -> dict:
        """Change hyperparameters, metrics, dataset_info, tags, status or description; the updated model."""
        return (await self.transport.json("PUT", f"{API}/{model_id}", json=fields))["model"]

    async def delete_model(self, model_id: str) -> dict:
        return await self.transport.json("DELETE", f"{API}/{model_id}")

    async def file_info(self, model_id: str) -> dict:
        return await self.transport.json("GET", f"{API}/{model_id}/info")

    async def statistics(self) -> dict:
        """GET /api/v1/models/statistics (NotFound if the service does not offer it)."""
        return await self.transport.json("GET", f"{API}/statistics")

    # -- files -------------------------------------------------------------

    async def probe(self, id_or_name: str, version: str | None = None, *,
                    if_none_match: str | None = None) -> tuple[int, dl.RemoteFile | dl.Unchanged]:
        """HEAD the download of a model: ``(200, RemoteFile)``, or ``(304, Unchanged)`` if ``if_none_match``
        still holds.

        A 24-hex string is tried as an id first, then as a name.
        """
        return await dl.probe(self.transport, id_or_name, version, if_none_match=if_none_match)

    async def download(self, id_or_name: str, path: str | os.PathLike[str], version: str | None = None, *,
                       parallel: int | None = None, limit_rate: float | None = None,
                       progress: dl.Progress | None = None, resume: bool = True,
                       overwrite: bool = False, durable: bool = False) -> dl.DownloadResult:
        """Download a model's file (by id, or the latest/``version`` of a name) to ``path``.

        ``path`` may be a directory: the file keeps the server's file name if
        that is a plain, visible file name, else it is ``<name>-<version>``. An
        existing file is never replaced unless ``overwrite`` (FileExistsError).
        The file appears at the target only once its sha256 matches the
        server's (else ChecksumMismatch). An interrupted download resumes from
        its ``.part`` file; files over 64 MB come in ``parallel`` ranges
        (default 4). ``limit_rate`` caps the speed in bytes per second. A file
        larger than the free space there is refused (InsufficientSpace).
        ``durable`` fsyncs the file before it appears (``dl.download_file``):
        off by default, as with curl; ``fetch`` into the cache always does.
        """
        _, remote = await dl.probe(self.transport, id_or_name, version)
        assert isinstance(remote, dl.RemoteFile)
        target = Path(path)
        if target.is_dir():
            target = rules.inside(target, remote.filename)
        elif not target.parent.is_dir():
            raise FileNotFoundError(f"no such directory: {target.parent}")
        return await dl.download_file(self.transport, remote, target, parallel=parallel,
                                      limit_rate=limit_rate, progress=progress, resume=resume, overwrite=overwrite,
                                      durable=durable)

    async def fetch_result(self, name: str, version: str | None = None,
                           cache_dir: str | os.PathLike[str] | None = None, *, parallel: int | None = None,
                           limit_rate: float | None = None, progress: dl.Progress | None = None,
                           allow_stale: bool = False) -> dl.DownloadResult:
        """``fetch``, with the details: whether it was cached, bytes transferred, ..."""
        from . import cache  # here, not at the top: a plain push or pull never loads it

        return await cache.fetch(self.transport, name, version, cache_dir, parallel=parallel, limit_rate=limit_rate,
                                 progress=progress, allow_stale=allow_stale)

    async def fetch(self, name: str, version: str | None = None, cache_dir: str | os.PathLike[str] | None = None,
                    *, parallel: int | None = None, limit_rate: float | None = None,
                    progress: dl.Progress | None = None, allow_stale: bool = False) -> Path:
        """The path of a verified local copy of the model, from the cache when it is still current: a
        snapshot's folder, or a single-file model's file.

        A snapshot is revalidated with one conditional GET of its manifest; a
        new version downloads only the files the cache lacks; processes
        fetching at once download each file once. With ``MODEL_SERVICE_OFFLINE=1``
        the cache answers without the network, or ``NotCached``.

        One conditional request (``If-None-Match``) revalidates a cached copy;
        only a changed or missing file is downloaded. Processes fetching the same
        model on one host take turns on a file lock, so it is downloaded once.
        ``cache_dir`` defaults to ``$MODEL_SERVICE_CACHE_DIR`` or
        ``~/.cache/tensorfleet/models``. With ``allow_stale``, a cached copy is
        returned when the service cannot be reached.
        """
        return (await self.fetch_result(name, version, cache_dir, parallel=parallel, limit_rate=limit_rate,
                                        progress=progress, allow_stale=allow_stale)).path


def _file_metadata(answer: Any, sha256: str) -> dict:
    fm = answer.get("file_metadata") if isinstance(answer, dict) else None
    if not isinstance(fm, dict):
        raise ProtocolError(f"the upload answered {str(answer)[:200]}, without file_metadata")
    if fm.get("checksum") != f"sha256:{sha256}":
        raise ChecksumMismatch(f"the service stored checksum {fm.get('checksum')}, not sha256:{sha256}",
                               expected=sha256, actual=fm.get("checksum"))
    return fm


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
