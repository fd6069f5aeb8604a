"""Snapshots (a version made of many files): push a folder, pull one into a folder.

Push hashes the files in threads, asks the service which blobs it lacks
(``POST /api/v1/blobs/missing``), uploads only those (``PUT
/api/v1/blobs/sha256:<hex>``, a few at once) and commits the version with its
list of files in one request: the version exists with all its files or not
at all.

Pull reads the manifest and checks every path in it against the service's
rules before anything is written. Files up to ``SMALL_FILE`` come in one GET
each, several at once; larger ones through ``download.download_file``
(parallel ranges, resumable). Each file is verified against its sha256 before
it gets its name, so a file under its own name is a verified one. The files
go to ``<folder>.part`` beside the folder, which is renamed into place once
all are there: the folder appears complete or not at all. ``<folder>.part.json``
names the snapshot being assembled, so a re-run after a kill keeps every
verified file and resumes a partial one.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import errno
import hashlib
import os
import shutil
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Awaitable, Callable, Sequence
from urllib.parse import quote

import orjson

from . import rules, sessions
from .download import (
    BLOCK,
    HASH_BLOCK,
    MiB,
    Progress,
    RemoteFile,
    check_space,
    download_file,
    file_lock,
    fsync_dir,
    model_paths,
)
from .errors import ChecksumMismatch, ConnectionFailed, ModelServiceError, NotFound, ProtocolError
from .manifest import FileEntry, Manifest, digest_of, select
from .transport import API, TRANSIENT_ERRORS, Transport, read_json_body

SMALL_FILE = 8 * MiB  # up to this, one GET per file, several files at once; larger: resumable ranges
SMALL_AT_ONCE = 16
LARGE_AT_ONCE = 4
_FSYNC_POOL = concurrent.futures.ThreadPoolExecutor(max_workers=SMALL_AT_ONCE, thread_name_prefix="fsync")
UPLOADS_AT_ONCE = 4
HASH_THREADS = 4
MAX_DIGESTS_PER_QUERY = 10_000  # the service's limit for POST /blobs/missing
BLOBS = "/api/v1/blobs"
STATE_FORMAT = 1


@dataclass
class PushResult:
    model_id: str
    name: str
    version: str
    files: int
    already_stored: int  # files whose bytes were not sent: the service had them, or another file here has them
    bytes_sent: int
    bytes_not_sent: int
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class PullResult:
    path: Path
    model_id: str
    name: str
    version: str
    snapshot_digest: str
    files: int
    size: int
    bytes_transferred: int = 0
    files_downloaded: int = 0
    files_kept: int = 0  # verified already, by an earlier interrupted pull (or in the cache)
    resumed_bytes: int = 0
    seconds: float = 0.0
    cached: bool = False

    def to_dict(self) -> dict:
        d = asdict(self)
        d["path"] = str(self.path)
        return d


def file_url(model_id: str, path: str) -> str:
    return f"{API}/{model_id}/files/{quote(path, safe='/')}"


# -- the manifest ----------------------------------------------------------------


async def get_manifest(transport: Transport, id_or_name: str, version: str | None = None, *,
                       if_none_match: str | None = None) -> tuple[int, Manifest | None, dict[str, str]]:
    """``(200, Manifest, headers)``, or ``(304, None, headers)`` when ``if_none_match`` still holds.

    A 24-hex string is tried as an id first, then as a name.
    """
    candidates = [(path + "/files", params) for path, params in model_paths(id_or_name, version)]
    headers = {"If-None-Match": if_none_match} if if_none_match else None
    for i, (path, params) in enumerate(candidates):
        resp = await transport.send("GET", path, params=params, headers=headers)
        async with resp:
            if resp.status == 304:
                return 304, None, dict(resp.headers)
            if resp.status == 200:
                raw = await read_json_body(resp)
                try:
                    doc = orjson.loads(raw)
                except orjson.JSONDecodeError as e:
                    raise ProtocolError(f"GET {path}: the manifest is not JSON: {e}") from None
                return 200, Manifest.parse(doc, resp.headers.get("ETag"), f"GET {path}"), dict(resp.headers)
            error = await transport.error(resp)
        if isinstance(error, NotFound) and error.code == "not_found" and i + 1 < len(candidates):
            continue
        raise error
    raise AssertionError("unreachable")  # pragma: no cover


# -- downloading files -------------------------------------------------------------


class Tally:
    """Bytes and files of one pull, and its progress callback over all of its files."""

    def __init__(self, total: int, progress: Progress | None) -> None:
        self.total = total
        self.progress = progress
        self.done: dict[str, int] = {}
        self.bytes_transferred = 0
        self.resumed_bytes = 0
        self.files_downloaded = 0

    def report(self, key: str, done: int) -> None:
        self.done[key] = done
        if self.progress:
            self.progress(sum(self.done.values()), self.total)


async def _head_file(transport: Transport, manifest: Manifest, entry: FileEntry) -> RemoteFile:
    """The file as its per-file URL describes it, for a resumable ranged download; it must be the manifest's."""
    url = file_url(manifest.model_id, entry.path)
    resp = await transport.send("HEAD", url)
    async with resp:
        if resp.status != 200:
            raise await transport.error(resp)
        etag = resp.headers.get("ETag")
        checksum = resp.headers.get("X-File-Checksum")
    if not etag:
        raise ProtocolError(f"HEAD {url} answered without an ETag")
    if resp.content_length != entry.size or (checksum is not None and checksum != entry.checksum):
        raise ModelServiceError(f"{entry.path} of {manifest.name} {manifest.version} changed on the server "
                                "since its manifest was read; pull again", code="content_changed")
    return RemoteFile(model_id=manifest.model_id, name=manifest.name, version=manifest.version, size=entry.size,
                      sha256=entry.sha256, etag=etag, filename=entry.path.rsplit("/", 1)[-1],
                      url=transport.base_url + url)


async def _get_small(transport: Transport, manifest: Manifest, entry: FileEntry, target: Path,
                     tally: Tally) -> None:
    """One GET; the bytes hashed as they come, and the file named ``target`` only once they verify."""
    url = file_url(manifest.model_id, entry.path)
    part = target.with_name(target.name + ".part")
    policy = transport.retry
    for attempt in range(max(1, policy.attempts)):
        try:
            await _get_once(transport, url, entry, part, tally)
            break
        except TRANSIENT_ERRORS as e:
            if attempt + 1 >= policy.attempts:
                raise ConnectionFailed(f"GET {url} kept failing: {type(e).__name__}: {e}") from e
            await asyncio.sleep(policy.delay(attempt))
    os.replace(part, target)


async def _get_once(transport: Transport, url: str, entry: FileEntry, part: Path, tally: Tally) -> None:
    h = hashlib.sha256()
    got = 0
    resp = await transport.send("GET", url)
    async with resp:
        if resp.status != 200:
            raise await transport.error(resp)
        if resp.content_length is not None and resp.content_length != entry.size:
            raise ModelServiceError(f"GET {url}: {resp.content_length} bytes, but the manifest says {entry.size}; "
                                    "the snapshot changed on the server, pull again", code="content_changed")
        with open(part, "wb") as f:
            try:
                async for block in resp.content.iter_chunked(BLOCK):
                    got += len(block)
                    tally.bytes_transferred += len(block)
                    if got > entry.size:
                        raise ProtocolError(f"GET {url}: more than the {entry.size} bytes the manifest says")
                    h.update(block)
                    f.write(block)
                    tally.report(entry.path, got)
                if got != entry.size:
                    raise ProtocolError(f"GET {url}: {got} bytes, but the manifest says {entry.size}")
                if h.hexdigest() != entry.sha256:
                    raise ChecksumMismatch(f"{entry.path} has sha256 {h.hexdigest()}, but the manifest says "
                                           f"{entry.sha256}; it was not kept", expected=entry.sha256,
                                           actual=h.hexdigest())
                f.flush()
                # Off the event loop: a pull of many small files makes one
                # fsync each, and on the loop they ran one at a time (py-spy:
                # 30% of a 1000-file pull; 7.4 s -> see the bench).
                await asyncio.get_running_loop().run_in_executor(_FSYNC_POOL, os.fsync, f.fileno())
            except BaseException:
                part.unlink(missing_ok=True)
                raise


async def fetch_files(transport: Transport, manifest: Manifest, entries: Sequence[FileEntry],
                      place: Callable[[FileEntry, Callable[[Path], Awaitable[None]]], Awaitable[None]],
                      tally: Tally, *, parallel: int | None = None, limit_rate: float | None = None) -> None:
    """Download ``entries``: the small ones several at once, the large ones a few at once in ranges.

    ``place(entry, download)`` decides where a file goes (and whether it is
    needed at all): it calls ``download(target)`` to have it verified there.
    """
    small = [e for e in entries if e.size <= SMALL_FILE]
    large = [e for e in entries if e.size > SMALL_FILE]
    gate = asyncio.Semaphore(SMALL_AT_ONCE)

    async def one_small(entry: FileEntry) -> None:
        async def download(target: Path) -> None:
            await _get_small(transport, manifest, entry, target, tally)
            tally.files_downloaded += 1

        async with gate:
            await place(entry, download)

    # Several large files at once: one file's fsync and hashing overlap the
    # others' transfers (one after another, a 4 x 256 MB pull spent ~1 s
    # waiting on fsyncs alone). One at a time under a rate limit, which is
    # per download.
    large_gate = asyncio.Semaphore(1 if limit_rate else LARGE_AT_ONCE)

    async def one_large(entry: FileEntry) -> None:
        async def download(target: Path) -> None:
            remote = await _head_file(transport, manifest, entry)
            result = await download_file(
                transport, remote, target, reprobe=lambda: _head_file(transport, manifest, entry),
                parallel=parallel, limit_rate=limit_rate, progress=lambda done, _: tally.report(entry.path, done))
            tally.bytes_transferred += result.bytes_transferred
            tally.resumed_bytes += result.resumed_bytes
            tally.files_downloaded += 1

        async with large_gate:
            await place(entry, download)

    try:
        async with asyncio.TaskGroup() as tg:
            for entry in large:
                tg.create_task(one_large(entry))
            for entry in small:
                tg.create_task(one_small(entry))
    except BaseExceptionGroup as eg:
        raise eg.exceptions[0] from None


# -- pull into a folder ------------------------------------------------------------


def _staging(output: Path) -> tuple[Path, Path, Path]:
    return (output.with_name(output.name + ".part"), output.with_name(output.name + ".part.json"),
            output.with_name(output.name + ".part.lock"))


def _refuse_existing_folder(output: Path) -> None:
    if os.path.lexists(output) and not (output.is_dir() and not output.is_symlink() and not any(output.iterdir())):
        raise FileExistsError(errno.EEXIST, "exists already and was left as it is "
                              "(overwrite=True, or --force on the command line, replaces it)", str(output))


def _load_state(state_path: Path) -> dict | None:
    try:
        state = orjson.loads(state_path.read_bytes())
    except (OSError, orjson.JSONDecodeError):
        return None
    return state if isinstance(state, dict) and state.get("format") == STATE_FORMAT else None


def _write_json(path: Path, data: Any) -> None:
    tmp = path.with_name(f"{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    tmp.write_bytes(orjson.dumps(data))
    os.replace(tmp, path)



def verified(target: Path, entry: FileEntry) -> bool:
    """A file under its own name was verified before it got it: present with its size, it is done."""
    try:
        return target.is_file() and not target.is_symlink() and target.stat().st_size == entry.size
    except OSError:
        return False


async def pull_folder(transport: Transport, id_or_name: str, output: str | os.PathLike[str],
                      version: str | None = None, *, include: Sequence[str] = (), exclude: Sequence[str] = (),
                      overwrite: bool = False, parallel: int | None = None, limit_rate: float | None = None,
                      progress: Progress | None = None) -> PullResult:
    """Pull a snapshot (or the files of it that ``include``/``exclude`` select) into the folder ``output``."""
    started = time.monotonic()
    output = Path(output)
    if not output.parent.is_dir():
        raise FileNotFoundError(f"no such directory: {output.parent}")
    if not overwrite:
        _refuse_existing_folder(output)
    _, manifest, _ = await get_manifest(transport, id_or_name, version)
    assert manifest is not None
    chosen = select(manifest.files, include, exclude)
    if not chosen:
        raise ValueError(f"no file of {manifest.name} {manifest.version} matches --include {list(include)} "
                         f"--exclude {list(exclude)}")
    key = digest_of(chosen)
    staging, state_path, lock_path = _staging(output)
    lock = file_lock(lock_path)
    await lock.acquire()
    done = False
    try:
        state = _load_state(state_path)
        # A symlink there is not followed: the files go into a folder this pull made.
        if state is None or state.get("digest") != key or staging.is_symlink() or not staging.is_dir():
            if staging.is_symlink() or not staging.is_dir():
                staging.unlink(missing_ok=True)
            else:
                shutil.rmtree(staging)
            _write_json(state_path, {"format": STATE_FORMAT, "digest": key, "model_id": manifest.model_id,
                                     "name": manifest.name, "version": manifest.version})
            staging.mkdir()
        targets = {e.path: rules.within(staging, e.path) for e in chosen}
        kept = [e for e in chosen if verified(targets[e.path], e)]
        todo = [e for e in chosen if not verified(targets[e.path], e)]
        check_space(output.parent, sum(e.size for e in todo))
        tally = Tally(sum(e.size for e in chosen), progress)
        for e in kept:
            tally.report(e.path, e.size)

        async def place(entry: FileEntry, download: Callable[[Path], Awaitable[None]]) -> None:
            target = targets[entry.path]
            target.parent.mkdir(parents=True, exist_ok=True)
            rules.within(staging, entry.path)  # again, now that its folders exist
            await download(target)

        await fetch_files(transport, manifest, todo, place, tally, parallel=parallel, limit_rate=limit_rate)
        for folder in sorted({t.parent for t in targets.values()}, key=lambda p: -len(p.parts)):
            await asyncio.to_thread(fsync_dir, folder)
        _put_in_place(staging, output, overwrite)
        await asyncio.to_thread(fsync_dir, output.parent)
        done = True
    finally:
        if done:
            state_path.unlink(missing_ok=True)
            lock_path.unlink(missing_ok=True)
        await lock.release()
    return PullResult(path=output, model_id=manifest.model_id, name=manifest.name, version=manifest.version,
                      snapshot_digest=manifest.snapshot_digest, files=len(chosen),
                      size=sum(e.size for e in chosen), bytes_transferred=tally.bytes_transferred,
                      files_downloaded=tally.files_downloaded, files_kept=len(kept),
                      resumed_bytes=tally.resumed_bytes, seconds=time.monotonic() - started)


def _put_in_place(staging: Path, output: Path, overwrite: bool) -> None:
    """Rename the complete folder onto ``output``: over an empty folder always, over anything else with
    ``overwrite`` (the old one moved aside first, then removed)."""
    try:
        os.rename(staging, output)  # replaces an empty folder; fails on a non-empty one or a file
        return
    except OSError as e:
        if not overwrite or e.errno not in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR, errno.EISDIR):
            if e.errno in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR, errno.EISDIR):
                raise FileExistsError(errno.EEXIST, "appeared during the pull and was left as it is; "
                                      f"the pulled files are in {staging}", str(output)) from None
            raise
    aside = output.with_name(f".{output.name}.old-{uuid.uuid4().hex[:8]}")
    os.rename(output, aside)
    os.rename(staging, output)
    if aside.is_dir() and not aside.is_symlink():
        shutil.rmtree(aside)
    else:
        aside.unlink()


# -- push a folder -----------------------------------------------------------------


def list_folder(folder: Path) -> list[tuple[str, Path]]:
    """Every file under ``folder`` as (snapshot path, file), sorted; a path the service would refuse is a
    ValueError here, before anything is sent."""
    found = []
    for dirpath, dirnames, filenames in os.walk(folder):
        here = Path(dirpath)
        for d in dirnames:
            if (here / d).is_symlink():
                raise ValueError(f"{here / d} is a symbolic link to a folder; a snapshot holds files only")
        for f in filenames:
            path = here / f
            if not path.is_file():
                raise ValueError(f"{path} is not a regular file")
            rel = path.relative_to(folder).as_posix()
            problem = rules.path_problem(rel)
            if problem:
                raise ValueError(f"{rel!r} cannot be a snapshot path: {problem}")
            found.append((rel, path))
    if not found:
        raise ValueError(f"{folder} has no files")
    found.sort(key=lambda item: item[0].encode())
    conflict = rules.paths_conflict([rel for rel, _ in found])
    if conflict:
        raise ValueError(f"{folder}: {conflict}")
    return found


def _sha256(path: Path) -> tuple[str, int]:
    h = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while block := f.read(HASH_BLOCK):
            h.update(block)
            size += len(block)
    return h.hexdigest(), size


async def hash_files(paths: Sequence[Path]) -> list[tuple[str, int]]:
    """(sha256 hex, size) of each file, hashed in threads (hashlib lets go of the GIL)."""
    loop = asyncio.get_running_loop()
    with concurrent.futures.ThreadPoolExecutor(max_workers=HASH_THREADS, thread_name_prefix="hash") as pool:
        return list(await asyncio.gather(*(loop.run_in_executor(pool, _sha256, p) for p in paths)))


async def missing_blobs(transport: Transport, digests: Sequence[str]) -> set[str]:
    """The digests (``sha256:<hex>``) the service does not hold."""
    missing: set[str] = set()
    for i in range(0, len(digests), MAX_DIGESTS_PER_QUERY):
        asked = list(digests[i:i + MAX_DIGESTS_PER_QUERY])
        # Only reads: safe to send again if the connection fails.
        resp = await transport.send("POST", f"{BLOBS}/missing", body=orjson.dumps({"digests": asked}),
                                    headers={"Content-Type": "application/json"}, idempotent=True)
        async with resp:
            if resp.status != 200:
                raise await transport.error(resp)
            answer = orjson.loads(await read_json_body(resp))
        listed = answer.get("missing") if isinstance(answer, dict) else None
        if not isinstance(listed, list) or not set(listed) <= set(asked):
            raise ProtocolError(f"POST {BLOBS}/missing answered {str(answer)[:200]}, not digests it was asked about")
        missing.update(listed)
    return missing


async def put_blob(transport: Transport, path: Path, sha256: str, size: int,
                   sent: Callable[[int], None]) -> None:
    """One request with the whole file (small files; larger ones go through ``sessions.upload``)."""
    digest = f"sha256:{sha256}"
    headers = {"Content-Type": "application/octet-stream", "Content-Length": str(size)}
    resp = await transport.send("PUT", f"{BLOBS}/{digest}", headers=headers, expect100=True,
                                body=lambda: sessions.file_range_body(path, 0, size, sent))
    async with resp:
        if resp.status not in (200, 201):
            raise await transport.error(resp)
        answer = orjson.loads(await read_json_body(resp))
    if not isinstance(answer, dict) or answer.get("digest") != digest or answer.get("size_bytes") != size:
        raise ProtocolError(f"PUT {BLOBS}/{digest} answered {str(answer)[:200]}")


async def _commit(transport: Transport, body: dict) -> tuple[tuple[str, str] | None, list[str]]:
    """POST the version with its files: ((model id, version), []) or (None, the digests the service says are
    missing)."""
    resp = await transport.send("POST", API, body=orjson.dumps(body), headers={"Content-Type": "application/json"})
    async with resp:
        if resp.status in (200, 201):
            answer = orjson.loads(await read_json_body(resp))
            if not isinstance(answer, dict):
                raise ProtocolError(f"POST {API} answered {str(answer)[:200]}")
            made = rules.model_id(answer.get("model_id"), "model_id"), rules.version(answer.get("version"), "version")
            return made, []
        if resp.status != 422:
            raise await transport.error(resp)
        raw = await read_json_body(resp)
    try:
        error = orjson.loads(raw)["error"]
    except (orjson.JSONDecodeError, KeyError, TypeError):
        error = None
    missing = error.get("missing") if isinstance(error, dict) and error.get("code") == "missing_blobs" else None
    if not isinstance(missing, list):
        message = error.get("message") if isinstance(error, dict) else None
        raise ModelServiceError(message or "POST /api/v1/models failed: 422", status=422,
                                code=error.get("code") if isinstance(error, dict) else None)
    return None, missing


async def push_folder(transport: Transport, folder: str | os.PathLike[str], metadata: dict[str, Any], *,
                      progress: Progress | None = None,
                      sessions_config: sessions.SessionConfig | None = None) -> PushResult:
    """Push every file under ``folder`` as one new version (see the module docstring). A blob over the
    session threshold goes through a resumable upload session (sessions.py)."""
    started = time.monotonic()
    config = sessions_config or sessions.SessionConfig()
    folder = Path(folder)
    found = list_folder(folder)
    hashed = await hash_files([p for _, p in found])
    total = sum(size for _, size in hashed)
    first_with: dict[str, tuple[Path, int]] = {}
    for (_, path), (sha, size) in zip(found, hashed):
        first_with.setdefault(sha, (path, size))
    missing = await missing_blobs(transport, [f"sha256:{sha}" for sha in first_with])
    sent_bytes = 0
    done: dict[str, int] = {}  # per blob: bytes the service holds or was sent, for the progress bar

    def report() -> None:
        if progress:
            progress(sum(done.values()), to_send)

    async def upload(digests: set[str]) -> None:
        gate = asyncio.Semaphore(UPLOADS_AT_ONCE)

        async def one(sha: str) -> None:
            nonlocal sent_bytes
            path, size = first_with[sha]
            done[sha] = 0

            def sent(n: int) -> None:
                nonlocal sent_bytes
                sent_bytes += n
                done[sha] += n
                report()

            def advance(offset: int) -> None:
                done[sha] = offset
                report()

            async with gate:
                if config.applies(size):
                    result = await sessions.upload(transport, path, sha, size, config, advance=advance)
                    sent_bytes += result.bytes_sent
                else:
                    await put_blob(transport, path, sha, size, sent)

        try:
            async with asyncio.TaskGroup() as tg:
                for d in sorted(digests):
                    tg.create_task(one(d.removeprefix("sha256:")))
        except BaseExceptionGroup as eg:
            raise eg.exceptions[0] from None

    to_send = sum(first_with[d.removeprefix("sha256:")][1] for d in missing)
    await upload(missing)
    files = [{"path": rel, "checksum": f"sha256:{sha}", "size_bytes": size}
             for (rel, _), (sha, size) in zip(found, hashed)]
    body = {**metadata, "files": files}
    made, again = await _commit(transport, body)
    if made is None:
        # Blobs gone between the question and the commit (a gc of unreferenced blobs): send them once more.
        unknown = [d for d in again if d.removeprefix("sha256:") not in first_with]
        if unknown:
            raise ProtocolError(f"the service says blobs are missing that this push never named: {unknown[:3]}")
        await upload(set(again))
        made, again = await _commit(transport, body)
        if made is None:
            raise ModelServiceError(f"the service kept losing uploaded blobs: {again[:3]}", status=422,
                                    code="missing_blobs")
    # Each blob sent was sent for one file; every other file's bytes were not sent (a session resumed from an
    # interrupted push sends only its rest, and a chunk sent again counts twice).
    not_sent = len(found) - len(missing)
    return PushResult(model_id=made[0], name=str(metadata.get("name")), version=made[1], files=len(found),
                      already_stored=not_sent, bytes_sent=sent_bytes, bytes_not_sent=max(0, total - sent_bytes),
                      seconds=time.monotonic() - started)
