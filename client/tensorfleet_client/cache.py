"""A local cache of model files for inference start-up.

Layout under the cache directory::

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

import logging
import os
import shutil
from pathlib import Path
from typing import Any

import orjson

from . import rules
from .download import DownloadResult, RemoteFile, Unchanged, check_space, download_file, file_lock, probe
from .errors import ConnectionFailed, ProtocolError, ServerError
from .transport import Transport

log = logging.getLogger("tensorfleet_client.cache")

LATEST = "latest"


def default_cache_dir() -> Path:
    env = os.environ.get("MODEL_SERVICE_CACHE_DIR")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "tensorfleet" / "models"


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


async def fetch(transport: Transport, name: str, version: str | None,
                cache_dir: str | os.PathLike[str] | None, *, parallel: int | None = None,
                limit_rate: float | None = None, progress=None, allow_stale: bool = False) -> DownloadResult:
    if not rules.is_name(name):
        raise ValueError(f"not a model name ({rules.NAME_RULE}): {name!r}")
    if version is not None and not rules.is_version(version):
        raise ValueError(f"version must be {rules.VERSION_RULE}, got {version!r}")
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    root = root / name
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
