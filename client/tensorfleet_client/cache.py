"""A local cache of models for inference start-up: snapshots, and single-file models as before.

Snapshots (versions committed as a list of files; ``SnapshotCache``)::

    blobs/sha256/<hex>                   each file's bytes, once, verified
    snapshots/<name>/<version>/<path>    hard links to the blobs (copies where links fail)
    refs/<name>                          the latest version, and each cached version's manifest ETag
    manifests/<name>/<version>.json      the manifest a folder was made from
    locks/<name>.lock, blobs/sha256/<hex>.lock

A warm fetch is one conditional GET of the manifest (304). A new version
downloads only the blobs the cache lacks; a blob is downloaded under its own
lock, so processes fetching at once download it once. With
``MODEL_SERVICE_OFFLINE=1`` the cache answers alone, or ``NotCached``.

Single-file models (made by an upload), under the cache directory::

    <name>/.lock                  flock: one fetch of <name> at a time on this host
    <name>/refs/<version>.json    what is cached for a version (etag, file name, size, mtime)
    <name>/refs/latest.json       the same for "the latest version", as last seen
    <name>/<version>/<filename>   the verified file

A fetch holds the name's lock from the revalidation to the end of any
download, so when several worker processes start at once, one downloads and
the others wait, then revalidate (304) and reuse its copy. Revalidation is a
single ``HEAD`` with ``If-None-Match``: 304 when the server's file is still
the cached one. A cached file whose size or modification time changed since
it was verified is treated as missing.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import stat
import time
import uuid
from pathlib import Path
from typing import Any

import orjson

from . import rules
from .download import (
    DownloadResult,
    RemoteFile,
    Unchanged,
    check_space,
    default_cache_dir,
    download_file,
    file_lock,
    probe,
)
from .errors import ConnectionFailed, NotCached, NotFound, ProtocolError, ServerError
from .manifest import FileEntry, Manifest
from .snapshot import Tally, fetch_files, get_manifest, verified
from .transport import API, Transport

log = logging.getLogger("tensorfleet_client.cache")

LATEST = "latest"
OFFLINE_ENV = "MODEL_SERVICE_OFFLINE"


class _Ref:
    def __init__(self, root: Path, key: str) -> None:
        self.path = root / "refs" / f"{key}.json"

    def load(self) -> dict[str, Any] | None:
        try:
            data = orjson.loads(self.path.read_bytes())
        except (OSError, orjson.JSONDecodeError):
            return None
        return data if isinstance(data, dict) else None

    def save(self, data: dict[str, Any]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_bytes(orjson.dumps(data))
        os.replace(tmp, self.path)


def _ref_path(root: Path, ref: dict[str, Any] | None) -> Path | None:
    """Where a ref says its file is, if its version and file name pass the rules (else it was not written
    by this client, and its parts are not made into a path)."""
    if not ref or not rules.is_version(ref.get("version")) or not rules.is_file_name(ref.get("filename")):
        return None
    try:
        return rules.inside(rules.inside(root, ref["version"]), ref["filename"])
    except ProtocolError:
        return None


def _cached_file(root: Path, ref: dict[str, Any] | None) -> Path | None:
    """The file a ref points to, if it is still exactly as it was when verified."""
    path = _ref_path(root, ref)
    if path is None:
        return None
    try:
        st = path.stat()
    except OSError:
        return None
    if st.st_size != ref.get("size") or st.st_mtime_ns != ref.get("mtime_ns"):
        return None
    return path


def _result_from_ref(path: Path, ref: dict[str, Any], **flags: Any) -> DownloadResult:
    return DownloadResult(path=path, model_id=ref["model_id"], name=ref["name"], version=ref["version"],
                          size=ref["size"], sha256=ref["sha256"], **flags)


def _ref_for(remote: RemoteFile, path: Path) -> dict[str, Any]:
    return {
        "model_id": remote.model_id,
        "name": remote.name,
        "version": remote.version,
        "etag": remote.etag,
        "sha256": remote.sha256,
        "size": remote.size,
        "filename": path.name,
        "mtime_ns": path.stat().st_mtime_ns,
    }


async def fetch_file(transport: Transport, name: str, version: str | None, cache: Path, *,
                     parallel: int | None = None, limit_rate: float | None = None, progress=None,
                     allow_stale: bool = False) -> DownloadResult:
    """A single-file model's file, cached under ``<cache>/<name>/`` (see the module docstring)."""
    if name in SnapshotCache.FOLDERS:
        raise ValueError(f"a single-file model named {name!r} cannot be cached in {cache}: the snapshot cache "
                         "uses that folder; fetch it into another cache_dir")
    root = cache / name
    root.mkdir(parents=True, exist_ok=True)

    async with file_lock(root / ".lock"):
        wanted = _Ref(root, version or LATEST)
        ref = wanted.load()
        cached = _cached_file(root, ref)
        try:
            _, remote = await probe(transport, name, version, if_none_match=ref["etag"] if cached else None)
        except (ConnectionFailed, ServerError) as e:
            if allow_stale and cached is not None:
                log.warning("cannot revalidate %s (%s); using the cached copy %s", name, e, cached)
                return _result_from_ref(cached, ref, cached=True, stale=True)
            raise
        if isinstance(remote, Unchanged):
            if version is None and remote.version and remote.version != ref["version"]:
                return _adopt(root, wanted, ref, cached, remote)
            return _result_from_ref(cached, ref, cached=True)

        # The latest version may already be cached under its own version number.
        by_version = _Ref(root, remote.version)
        other = by_version.load() if by_version.path != wanted.path else None
        if other and other.get("etag") == remote.etag and (path := _cached_file(root, other)):
            wanted.save(other)
            return _result_from_ref(path, other, cached=True)

        check_space(root, remote.size)
        folder = rules.inside(root, remote.version)
        folder.mkdir(exist_ok=True)
        previous = _ref_path(root, by_version.load())
        # The cache's own file: replaced when it changed on the server or on disk.
        result = await download_file(transport, remote, rules.inside(folder, remote.filename), parallel=parallel,
                                     limit_rate=limit_rate, progress=progress, overwrite=True)
        # A re-uploaded file may have had another name: remove the one this cache put there, nothing else.
        if previous is not None and previous != result.path:
            previous.unlink(missing_ok=True)
        new_ref = _ref_for(remote, result.path)
        by_version.save(new_ref)
        if version is None:
            wanted.save(new_ref)
        return result


def _adopt(root: Path, latest: _Ref, ref: dict[str, Any], cached: Path, now: Unchanged) -> DownloadResult:
    """The latest version is new but its file is the cached one: file it under the new version, no download."""
    folder = rules.inside(root, now.version)  # checked against the version rule when the 304 was read
    folder.mkdir(exist_ok=True)
    path = rules.inside(folder, cached.name)
    if not (path.exists() and path.samefile(cached)):
        tmp = folder / (cached.name + ".part")
        tmp.unlink(missing_ok=True)
        try:
            os.link(cached, tmp)  # the verified bytes, not a second copy of them
        except OSError:
            shutil.copy2(cached, tmp)
        os.replace(tmp, path)
    new_ref = {**ref, "model_id": now.model_id or ref["model_id"], "version": now.version,
               "mtime_ns": path.stat().st_mtime_ns}
    _Ref(root, now.version).save(new_ref)
    latest.save(new_ref)
    return _result_from_ref(path, new_ref, cached=True)


# -- snapshots -----------------------------------------------------------------------


def offline() -> bool:
    """``MODEL_SERVICE_OFFLINE`` set (to anything but 0 or false): answer from the cache, never the network."""
    return os.environ.get(OFFLINE_ENV, "").strip().lower() not in ("", "0", "false", "no")


class SnapshotCache:
    """Snapshots in the cache: blobs stored once by sha256, each version's folder made of links to them.

    ``refs/<name>`` names the latest version and, for every version cached,
    the manifest's ETag (for the one-request revalidation) and model id;
    ``manifests/<name>/<version>.json`` is the manifest the folder was made
    from, so a warm start checks the folder without the network.
    """

    FOLDERS = frozenset({"blobs", "snapshots", "refs", "manifests", "locks", "uploads"})  # uploads: sessions.py

    def __init__(self, root: Path) -> None:
        self.root = root

    def blob(self, sha256: str) -> Path:
        return self.root / "blobs" / "sha256" / sha256

    def folder(self, name: str, version: str) -> Path:
        return self.root / "snapshots" / name / version

    def _refs_path(self, name: str) -> Path:
        return self.root / "refs" / name

    def _manifest_path(self, name: str, version: str) -> Path:
        return self.root / "manifests" / name / f"{version}.json"

    def refs(self, name: str) -> dict[str, Any]:
        try:
            data = orjson.loads(self._refs_path(name).read_bytes())
        except (OSError, orjson.JSONDecodeError):
            return {}
        return data if isinstance(data, dict) else {}

    def _save_refs(self, name: str, refs: dict[str, Any]) -> None:
        path = self._refs_path(name)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_bytes(orjson.dumps(refs))
        os.replace(tmp, path)

    def version_ref(self, name: str, version: str) -> dict[str, Any]:
        """What ``refs/<name>`` says of ``version``: its manifest's ``etag`` and ``model_id`` ({} if nothing)."""
        versions = self.refs(name).get("versions")
        ref = versions.get(version) if isinstance(versions, dict) else None
        return ref if isinstance(ref, dict) else {}

    def cached_version(self, name: str, version: str | None) -> str | None:
        """The version ``version`` (None: the latest) means in the cache, if the cache knows it."""
        if version is None:
            latest = self.refs(name).get("latest")
            return latest if rules.is_version(latest) else None
        return version if self.version_ref(name, version) else None

    def manifest(self, name: str, version: str) -> Manifest | None:
        try:
            doc = orjson.loads(self._manifest_path(name, version).read_bytes())
        except (OSError, orjson.JSONDecodeError):
            return None
        m = Manifest.from_cache(doc)
        return m if m is not None and (m.name, m.version) == (name, version) else None

    def intact(self, m: Manifest) -> Path | None:
        """The version's folder if every file of ``m`` is there with its size (no network, no hashing)."""
        folder = self.folder(m.name, m.version)
        try:
            for f in m.files:
                path = rules.within(folder, f.path)
                st = path.lstat()
                if not stat.S_ISREG(st.st_mode) or st.st_size != f.size:
                    return None
        except (OSError, ProtocolError):
            return None
        return folder

    def result(self, m: Manifest, folder: Path, **flags: Any) -> DownloadResult:
        return DownloadResult(path=folder, model_id=m.model_id, name=m.name, version=m.version, size=m.total_size,
                              sha256=m.snapshot_digest.removeprefix("sha256:"), files=len(m.files), **flags)

    def cached(self, name: str, version: str | None) -> tuple[Manifest, Path] | None:
        v = self.cached_version(name, version)
        m = self.manifest(name, v) if v else None
        folder = self.intact(m) if m else None
        return (m, folder) if m and folder else None

    def knows(self, name: str, version: str | None) -> bool:
        return self.cached_version(name, version) is not None

    async def fetch(self, transport: Transport, name: str, version: str | None, *, parallel: int | None = None,
                    limit_rate: float | None = None, progress=None, allow_stale: bool = False) -> DownloadResult:
        (self.root / "locks").mkdir(parents=True, exist_ok=True)
        async with file_lock(self.root / "locks" / f"{name}.lock"):
            return await self._fetch(transport, name, version, parallel=parallel, limit_rate=limit_rate,
                                     progress=progress, allow_stale=allow_stale)

    async def _fetch(self, transport: Transport, name: str, version: str | None, **options: Any) -> DownloadResult:
        started = time.monotonic()
        allow_stale = options.pop("allow_stale")
        have = self.cached(name, version)
        etag = self.version_ref(name, have[0].version).get("etag") if have else None
        if not isinstance(etag, str):
            have = etag = None
        try:
            status, manifest, headers = await get_manifest(transport, name, version, if_none_match=etag)
        except (ConnectionFailed, ServerError) as e:
            if allow_stale and have is not None:
                log.warning("cannot revalidate %s (%s); using the cached copy %s", name, e, have[1])
                return self.result(*have, cached=True, stale=True)
            raise
        if status == 304:
            if have is None:
                raise ProtocolError(f"GET the manifest of {name}: 304 Not Modified to a request without "
                                    "If-None-Match")
            m, folder = have
            now = headers.get("X-Model-Version")
            if version is None and rules.is_version(now) and now != m.version:
                # The latest is a new version with the same files: a folder for it, no download.
                new_id = headers.get("X-Model-Id")
                m = dataclasses.replace(m, version=now, model_id=new_id if rules.is_model_id(new_id) else m.model_id)
                folder = self._materialize(m)
                self._remember(m, latest=True)
            return self.result(m, folder, cached=True, seconds=time.monotonic() - started)
        assert manifest is not None
        if version is not None and manifest.version != version:
            raise ProtocolError(f"asked for {name} {version}, the service answered {manifest.version}")
        if manifest.name != name:
            raise ProtocolError(f"asked for {name}, the service answered {manifest.name}")
        tally = await self._download(transport, manifest, **options)
        folder = self._materialize(manifest)
        self._remember(manifest, latest=version is None)
        return self.result(manifest, folder, bytes_transferred=tally.bytes_transferred,
                           resumed_bytes=tally.resumed_bytes, seconds=time.monotonic() - started)

    async def _download(self, transport: Transport, m: Manifest, *, parallel: int | None,
                        limit_rate: float | None, progress) -> Any:
        unique: dict[str, FileEntry] = {}
        for f in m.files:
            unique.setdefault(f.sha256, f)
        needed = [f for f in unique.values() if not verified(self.blob(f.sha256), f)]
        blobs = self.blob("0").parent
        blobs.mkdir(parents=True, exist_ok=True)
        check_space(blobs, sum(f.size for f in needed))
        tally = Tally(sum(f.size for f in needed), progress)

        async def place(entry: FileEntry, download) -> None:
            blob = self.blob(entry.sha256)
            lock_path = blob.with_name(blob.name + ".lock")
            async with file_lock(lock_path):
                try:
                    # Another process may have stored it while this one waited.
                    if not verified(blob, entry):
                        await download(blob)
                finally:
                    # Removed while still held: a process waiting on it locks a new file and finds the blob.
                    lock_path.unlink(missing_ok=True)

        await fetch_files(transport, m, needed, place, tally, parallel=parallel, limit_rate=limit_rate)
        return tally

    def _materialize(self, m: Manifest) -> Path:
        """The version's folder of links to the blobs, made beside it and renamed into place whole."""
        folder = self.folder(m.name, m.version)
        if (old := self.manifest(m.name, m.version)) and old.files == m.files and self.intact(m):
            return folder
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = folder.with_name(f".{m.version}.{uuid.uuid4().hex[:8]}.tmp")
        tmp.mkdir()
        try:
            for f in m.files:
                path = rules.within(tmp, f.path)
                path.parent.mkdir(parents=True, exist_ok=True)
                try:
                    os.link(self.blob(f.sha256), path)
                except OSError:
                    shutil.copyfile(self.blob(f.sha256), path)
            if folder.exists():
                aside = folder.with_name(f".{m.version}.{uuid.uuid4().hex[:8]}.old")
                os.rename(folder, aside)
                os.rename(tmp, folder)
                shutil.rmtree(aside, ignore_errors=True)
            else:
                os.rename(tmp, folder)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return folder

    def _remember(self, m: Manifest, latest: bool) -> None:
        path = self._manifest_path(m.name, m.version)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_bytes(orjson.dumps(m.to_json()))
        os.replace(tmp, path)
        refs = self.refs(m.name)
        versions = refs.get("versions") if isinstance(refs.get("versions"), dict) else {}
        versions[m.version] = {"etag": m.etag, "model_id": m.model_id}
        refs = {"latest": m.version if latest else refs.get("latest"), "versions": versions}
        self._save_refs(m.name, refs)


async def _kind(transport: Transport, name: str, version: str | None) -> str:
    """"snapshot" when the version was committed with a list of files; "file" otherwise (an upload, or
    whatever the single-file path will explain: no such model, no file yet, an older service)."""
    try:
        doc = await transport.json("GET", f"{API}/by-name/{name}", params={"version": version} if version else None)
    except (NotFound, ProtocolError):
        return "file"
    if isinstance(doc, dict) and not doc.get("file_metadata") and doc.get("files"):
        return "snapshot"
    return "file"


def _offline_file(root: Path, name: str, version: str | None) -> DownloadResult | None:
    ref = _Ref(root / name, version or LATEST).load() if rules.is_name(name) else None
    path = _cached_file(root / name, ref)
    return _result_from_ref(path, ref, cached=True, stale=True) if path is not None else None


async def fetch(transport: Transport, name: str, version: str | None,
                cache_dir: str | os.PathLike[str] | None, *, parallel: int | None = None,
                limit_rate: float | None = None, progress=None, allow_stale: bool = False) -> DownloadResult:
    """A model from the cache, revalidated with one request: a snapshot's folder, or a single-file model's file."""
    if not rules.is_name(name):
        raise ValueError(f"not a model name ({rules.NAME_RULE}): {name!r}")
    if version is not None and not rules.is_version(version):
        raise ValueError(f"version must be {rules.VERSION_RULE}, got {version!r}")
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    snapshots = SnapshotCache(cache)
    options = {"parallel": parallel, "limit_rate": limit_rate, "progress": progress, "allow_stale": allow_stale}
    if offline():
        have = snapshots.cached(name, version)
        if have is not None:
            return snapshots.result(*have, cached=True, stale=True)
        found = _offline_file(cache, name, version)
        if found is not None:
            return found
        raise NotCached(f"{OFFLINE_ENV} is set and {name} {version or '(latest)'} is not in the cache at "
                        f"{cache}; nothing was asked of the network")
    if snapshots.knows(name, version):
        return await snapshots.fetch(transport, name, version, **options)
    if _Ref(cache / name, version or LATEST).load() is None and await _kind(transport, name, version) == "snapshot":
        return await snapshots.fetch(transport, name, version, **options)
    try:
        return await fetch_file(transport, name, version, cache, **options)
    except ProtocolError:
        # Cached as a single file, but the version may have become a snapshot since.
        if await _kind(transport, name, version) == "snapshot":
            return await snapshots.fetch(transport, name, version, **options)
        raise
