"""Embedded backend: SQLite for metadata, a content-addressed directory for files.

Runs with no server so that a fresh machine can start the service. SQLite is
used from one dedicated thread (no locking games within the process) so the
event loop never blocks on it. File bytes go to ``tmp/`` first and are renamed
into ``blobs/<aa>/<sha256>`` only on commit, after an fsync: a reader sees the
whole file or nothing, and a crash leaves at most a temp file that ``gc`` removes.

Worker processes (``WORKERS``) share the database file: whatever must hold
across them (counts, leases, the blob a release removes or a commit puts in
place) is one BEGIN IMMEDIATE transaction, which SQLite serialises.
"""

from __future__ import annotations

import asyncio
import fcntl
import os
import re
import secrets
import shutil
import sqlite3
import time
from collections import Counter
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, suppress
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, AsyncIterator, Callable, Iterator

import orjson
from bson import ObjectId

from ..clock import iso, now, parse_iso
from . import pipeline
from .base import (
    CLAIM_GRACE,
    DEFAULT_CHUNK_SIZE,
    DOWNLOAD_HISTORY,
    SESSION_LOCK_TTL,
    Amend,
    DuplicateModel,
    FileMissing,
    FileWriter,
    ModelDocument,
    ModelQuery,
    RegistryStats,
    SessionBusy,
    SessionHashes,
    SessionMissing,
    SessionWriter,
    Storage,
    StorageError,
    StorageUnavailable,
    StoredFile,
    UploadSession,
)
from .wal_index import WalIndexHeader, open_header

# A session's stored prefix is re-read (to re-hash it) in pieces this large.
_READ_SIZE = 1024 * 1024
# Download pieces: small enough that 64 downloads hold little memory between
# them, large enough that per-piece overhead stays small.
_PIECE = 256 * 1024

_SCHEMA = """
CREATE TABLE IF NOT EXISTS models (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    version TEXT NOT NULL,
    algorithm TEXT NOT NULL,
    status TEXT NOT NULL,
    created_by TEXT,
    created_at TEXT NOT NULL,
    download_count INTEGER NOT NULL DEFAULT 0,
    file_id TEXT,
    doc BLOB NOT NULL,
    search_text TEXT NOT NULL DEFAULT '',
    UNIQUE (name, version)
);
CREATE INDEX IF NOT EXISTS models_algorithm_status_created ON models (algorithm, status, created_at DESC);
CREATE INDEX IF NOT EXISTS models_created ON models (created_at DESC);
CREATE INDEX IF NOT EXISTS models_downloads ON models (download_count DESC);
CREATE INDEX IF NOT EXISTS models_file ON models (file_id);
-- Read stamps (read_stamp): bumped by triggers, so every writer of models
-- bumps them in its own transaction, whatever process or code it runs: one
-- number for the models' contents, one for their download counts.
CREATE TABLE IF NOT EXISTS read_generation (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    models INTEGER NOT NULL,
    counts INTEGER NOT NULL
);
INSERT OR IGNORE INTO read_generation (id, models, counts) VALUES (1, 0, 0);
CREATE TRIGGER IF NOT EXISTS models_inserted AFTER INSERT ON models
    BEGIN UPDATE read_generation SET models = models + 1; END;
CREATE TRIGGER IF NOT EXISTS models_deleted AFTER DELETE ON models
    BEGIN UPDATE read_generation SET models = models + 1; END;
-- Every column but download_count (tests/test_read_cache.py checks that none is missing).
CREATE TRIGGER IF NOT EXISTS models_updated
    AFTER UPDATE OF id, name, version, algorithm, status, created_by, created_at, file_id, doc, search_text
    ON models BEGIN UPDATE read_generation SET models = models + 1; END;
CREATE TRIGGER IF NOT EXISTS models_counted AFTER UPDATE OF download_count ON models
    BEGIN UPDATE read_generation SET counts = counts + 1; END;
CREATE TABLE IF NOT EXISTS download_hours (
    hour TEXT PRIMARY KEY,
    count INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS files (
    file_id TEXT PRIMARY KEY,
    sha256 TEXT NOT NULL UNIQUE,
    length INTEGER NOT NULL,
    chunk_size INTEGER NOT NULL,
    uploaded_at TEXT NOT NULL,
    claims INTEGER NOT NULL DEFAULT 0,
    claimed_at TEXT,
    kept_until TEXT
);
-- Which stored content each model refers to: its file_metadata's, or every
-- file of its snapshot (each content once per model).
CREATE TABLE IF NOT EXISTS model_files (
    file_id TEXT NOT NULL,
    model_id TEXT NOT NULL,
    PRIMARY KEY (file_id, model_id)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS model_files_model ON model_files (model_id);
-- Resumable uploads: a session's bytes are in uploads/<id>; "offset" counts
-- those accepted (a writer that died may have left more, cut on the next write).
CREATE TABLE IF NOT EXISTS upload_sessions (
    id TEXT PRIMARY KEY,
    owner TEXT NOT NULL,
    "offset" INTEGER NOT NULL,
    size_bytes INTEGER,
    checksum TEXT,
    chunk_size INTEGER NOT NULL,
    created_at TEXT NOT NULL,
    updated_at TEXT NOT NULL,
    lock_token TEXT,
    lock_until TEXT
);
CREATE INDEX IF NOT EXISTS upload_sessions_updated ON upload_sessions (updated_at);
-- Content a reader holds (lease_files): no release deletes it while a lease is
-- live. Written on the lease connection (synchronous=NORMAL): a power cut may
-- lose the latest, which only lets a release through that its reader, dead
-- with the machine, no longer needs.
CREATE TABLE IF NOT EXISTS content_leases (
    id TEXT PRIMARY KEY,
    file_id TEXT NOT NULL,
    owner TEXT NOT NULL,
    until TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS content_leases_file ON content_leases (file_id);
-- Releases that a lease, a claim or a keep held back: the last drop_leases,
-- settle_file or release_pending completes them.
CREATE TABLE IF NOT EXISTS content_pending (
    file_id TEXT PRIMARY KEY,
    at TEXT NOT NULL
) WITHOUT ROWID;
"""

# Columns kept outside the JSON document because queries filter or sort on them.
_COLUMNS = ("id", "name", "version", "algorithm", "status", "created_by", "created_at", "download_count")
_SORT_COLUMNS = {"created_at": "created_at", "name": "name", "download_count": "download_count"}
_DATETIME_FIELDS = ("created_at", "updated_at")


def _encode_doc(doc: ModelDocument) -> bytes:
    stored = {k: v for k, v in doc.items() if k not in ("id", "download_count")}
    for key in _DATETIME_FIELDS:
        if key in stored:
            stored[key] = iso(stored[key])
    if "file_metadata" in stored:
        fm = dict(stored["file_metadata"])
        fm["uploaded_at"] = iso(fm["uploaded_at"])
        stored["file_metadata"] = fm
    return orjson.dumps(stored)


def _decode_row(row: sqlite3.Row) -> ModelDocument:
    doc = orjson.loads(row["doc"])
    doc["id"] = row["id"]
    doc["download_count"] = row["download_count"]
    for key in _DATETIME_FIELDS:
        if key in doc:
            doc[key] = parse_iso(doc[key])
    if "file_metadata" in doc:
        doc["file_metadata"]["uploaded_at"] = parse_iso(doc["file_metadata"]["uploaded_at"])
    return doc


def _file_ids(doc: ModelDocument) -> list[str]:
    """Every stored content the document refers to, each once."""
    ids = [e["file_id"] for e in doc.get("files") or ()]
    if doc.get("file_metadata"):
        ids.append(doc["file_metadata"]["file_id"])
    return list(dict.fromkeys(ids))


def _icontains(haystack: str | None, needle: str) -> bool:
    # casefold() matches MongoDB's case-insensitive regex beyond ASCII.
    return haystack is not None and needle.casefold() in haystack.casefold()


_SEPARATOR = "\x00"


def _search_text(doc: ModelDocument) -> str:
    """The fields `q` searches, case-folded, joined by a character no needle has."""
    fields = [doc["name"], doc.get("description") or "", doc["algorithm"], *doc.get("tags", [])]
    return _SEPARATOR + _SEPARATOR.join(f.casefold() for f in fields) + _SEPARATOR


def _json_member(key: str) -> str:
    # Quoted member name, so metric names are data, never JSON-path syntax.
    return '"' + key.replace('"', '""') + '"'


class EmbeddedStorage(Storage):
    kind = "embedded"
    # Reads come from the page cache without waiting: nothing to overlap.
    read_ahead = 0

    def __init__(self, data_dir: str) -> None:
        self.root = Path(data_dir)
        self.blob_dir = self.root / "blobs"
        self.tmp_dir = self.root / "tmp"
        # Not tmp/: gc removes old unlocked temp files there, and a session idles for hours.
        self.upload_dir = self.root / "uploads"
        self.session_hashes = SessionHashes()
        self.db_path = self.root / "registry.sqlite3"
        self._db: sqlite3.Connection | None = None
        self._fast: sqlite3.Connection | None = None  # see _connect
        self._on_loop: sqlite3.Connection | None = None
        self._loop_commits = 0  # since the last checkpoint (see _loop_committed)
        self._checkpointing: asyncio.Future | None = None
        # A second, read-only connection used on the event loop itself, for
        # lookups by primary key (see get_model).
        self._reader: sqlite3.Connection | None = None
        # The WAL-index header, and the stamp row read just after it was seen (see read_stamp).
        self._wal_header: WalIndexHeader | None = None
        self._stamp_header: bytes | None = None
        self._stamp_row: tuple[int, int] | None = None
        # One thread owns the connection: SQLite calls never block the loop
        # and never need their own locking.
        self._executor: ThreadPoolExecutor | None = None

    # -- plumbing ------------------------------------------------------------
    async def _run(self, fn: Callable[..., Any], *args: Any) -> Any:
        if self._executor is None:
            raise StorageUnavailable("embedded storage is closed")
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._executor, fn, *args)
        except sqlite3.OperationalError as e:
            raise StorageUnavailable(f"SQLite: {e}") from e

    def _connect(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        self.blob_dir.mkdir(exist_ok=True)
        self.tmp_dir.mkdir(exist_ok=True)
        self.upload_dir.mkdir(exist_ok=True)
        db = sqlite3.connect(self.db_path, isolation_level=None, check_same_thread=False)
        db.row_factory = sqlite3.Row
        db.execute(f"PRAGMA busy_timeout={_BUSY_TIMEOUT_MS}")
        # Workers opening one new database set it up one at a time: busy_timeout
        # does not cover switching it to WAL, which then failed with "database is
        # locked" in about one start of four workers in fifteen.
        with open(self.root / "registry.setup.lock", "a") as setup_lock:
            fcntl.flock(setup_lock.fileno(), fcntl.LOCK_EX)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=FULL")
            had_references = db.execute(
                "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'model_files'").fetchone() is not None
            files_columns = {row["name"] for row in db.execute("PRAGMA table_info(files)")}
            db.executescript(_SCHEMA)
            self._migrate(db, had_references, files_columns)
        db.create_function("icontains", 2, _icontains, deterministic=True)
        self._db = db
        # Leases and download counts: two writes per download, which must not
        # each wait for an fsync. synchronous=NORMAL in WAL mode keeps them
        # consistent, not durable across a power cut (the next FULL commit of
        # the main connection syncs them too); used on the SQLite thread as well.
        fast = sqlite3.connect(self.db_path, isolation_level=None, check_same_thread=False)
        fast.execute(f"PRAGMA busy_timeout={_BUSY_TIMEOUT_MS}")
        fast.execute("PRAGMA synchronous=NORMAL")
        self._fast = fast
        # The same, on the event loop itself, for a download's lease and its
        # drop: a one-statement commit without fsync takes tens of microseconds,
        # a hop to the SQLite thread and back more (bench/: 16 KB downloads, one
        # connection). busy_timeout=0: busy means "take the queue", as for get_model;
        # no checkpoints here (they sync the WAL), the SQLite thread's commits run them.
        on_loop = sqlite3.connect(self.db_path, isolation_level=None, check_same_thread=False)
        on_loop.execute("PRAGMA busy_timeout=0")
        on_loop.execute("PRAGMA synchronous=NORMAL")
        on_loop.execute("PRAGMA wal_autocheckpoint=0")
        self._on_loop = on_loop
        reader = sqlite3.connect(f"file:{self.db_path}?mode=ro", uri=True, isolation_level=None,
                                 check_same_thread=False)
        reader.row_factory = sqlite3.Row
        reader.execute("PRAGMA busy_timeout=0")  # busy means "take the queue", never "wait here"
        self._reader = reader
        self._wal_header = open_header(str(self.db_path))

    @staticmethod
    def _migrate(db: sqlite3.Connection, had_references: bool, files_columns: set[str]) -> None:
        if files_columns and "kept_until" not in files_columns:
            db.execute("ALTER TABLE files ADD COLUMN kept_until TEXT")
        if not had_references:
            # A registry from before snapshots: its models refer to content by file_id only.
            db.execute("INSERT OR IGNORE INTO model_files (file_id, model_id)"
                       " SELECT file_id, id FROM models WHERE file_id IS NOT NULL")
        columns = {row["name"] for row in db.execute("PRAGMA table_info(models)")}
        if "search_text" not in columns:
            # A registry from before search_text: add it and fill it in.
            db.execute("ALTER TABLE models ADD COLUMN search_text TEXT NOT NULL DEFAULT ''")
            for row in db.execute("SELECT * FROM models").fetchall():
                db.execute("UPDATE models SET search_text = ? WHERE id = ?",
                           (_search_text(_decode_row(row)), row["id"]))

    async def open(self) -> None:
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sqlite")
        try:
            await self._run(self._connect)
        except (OSError, sqlite3.Error) as e:
            await self.close()
            raise StorageUnavailable(f"cannot open embedded storage in {self.root}: {e}") from e

    async def close(self) -> None:
        if self._executor is None:
            return
        if self._wal_header is not None:
            # Before the connections: the file is mapped only while one is open.
            self._wal_header.close()
            self._wal_header = self._stamp_header = self._stamp_row = None
        for name in ("_reader", "_on_loop"):
            db = getattr(self, name)
            if db is not None:
                setattr(self, name, None)
                db.close()
        for name in ("_fast", "_db"):
            db = getattr(self, name)
            if db is not None:
                setattr(self, name, None)
                await asyncio.get_running_loop().run_in_executor(self._executor, db.close)
        self._executor.shutdown(wait=True)
        self._executor = None

    async def ping(self) -> None:
        await self._run(lambda: self._db.execute("SELECT 1").fetchone())

    async def probe_files(self) -> None:
        def probe() -> None:
            path = self.tmp_dir / f"probe-{secrets.token_hex(6)}"
            try:
                path.write_bytes(b"probe")
                if path.read_bytes() != b"probe":
                    raise StorageError(f"{self.tmp_dir}: probe read back wrong bytes")
            except OSError as e:
                raise StorageError(f"{self.root} is not writable: {e.strerror or e}") from e
            finally:
                path.unlink(missing_ok=True)
            if not os.access(self.blob_dir, os.R_OK | os.W_OK | os.X_OK):
                raise StorageError(f"{self.blob_dir} is not readable and writable")

        await asyncio.to_thread(probe)

    async def disk_free(self) -> int | None:
        return (await asyncio.to_thread(shutil.disk_usage, self.root)).free

    # -- metadata ------------------------------------------------------------
    def _refer(self, model_id: str, doc: ModelDocument | None) -> None:
        """Record which content the model refers to (none once it is deleted); inside the caller's transaction."""
        self._db.execute("DELETE FROM model_files WHERE model_id = ?", (model_id,))
        if doc is not None:
            self._db.executemany("INSERT INTO model_files (file_id, model_id) VALUES (?, ?)",
                                 [(file_id, model_id) for file_id in _file_ids(doc)])

    def _insert(self, doc: ModelDocument) -> None:
        db = self._db
        db.execute("BEGIN IMMEDIATE")
        try:
            self._insert_row(doc)
            self._refer(doc["id"], doc)
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise

    def _insert_row(self, doc: ModelDocument) -> None:
        fm = doc.get("file_metadata")
        try:
            self._db.execute(
                "INSERT INTO models (id, name, version, algorithm, status, created_by, created_at,"
                " download_count, file_id, doc, search_text) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    doc["id"], doc["name"], doc["version"], doc["algorithm"], doc["status"],
                    doc.get("created_by"), iso(doc["created_at"]), doc.get("download_count", 0),
                    fm["file_id"] if fm else None, _encode_doc(doc), _search_text(doc),
                ),
            )
        except sqlite3.IntegrityError as e:
            raise DuplicateModel(f"{doc['name']} {doc['version']} already exists") from e

    async def insert_model(self, doc: ModelDocument) -> None:
        await self._run(self._insert, doc)

    def _get(self, model_id: str, db: sqlite3.Connection | None = None) -> ModelDocument | None:
        row = (db or self._db).execute("SELECT * FROM models WHERE id = ?", (model_id,)).fetchone()
        return _decode_row(row) if row else None

    async def get_model(self, model_id: str) -> ModelDocument | None:
        # Every download and file request starts here. A primary-key lookup
        # in WAL mode takes microseconds and never waits for a writer, so it
        # runs on the loop: handing it to the SQLite thread and back cost more
        # than the query (bench/, random 1 MiB ranges: 1000 -> 1084 req/s).
        if self._reader is not None:
            try:
                return self._get(model_id, self._reader)
            except sqlite3.OperationalError:
                pass  # busy (a checkpoint, a recovery): queue like any other call
        return await self._run(self._get, model_id)

    def read_stamp(self, counts: bool = True) -> tuple[int, int] | int | None:
        # The header first, then the row: a row read after a header is at least
        # as new as it, so while the header stays the same the row is current.
        header = self._wal_header.current() if self._wal_header is not None else None
        if header is not None and header == self._stamp_header:
            row = self._stamp_row  # no commit since it was read
        else:
            row = self._read_stamp()
            self._stamp_header, self._stamp_row = (header, row) if row is not None else (None, None)
            if row is None:
                return None
        return row if counts else row[0]

    def _read_stamp(self) -> tuple[int, int] | None:
        # One row on the loop's read-only connection: each statement there
        # reads the latest commit of any connection, and the triggers in
        # _SCHEMA bump these in the transaction of every change. About 8 us in
        # the service (a read transaction's shm locks, the GIL released and
        # taken back), a fifth of a cached get-by-id: hence only after a
        # commit (read_stamp).
        # Busy (a checkpoint, a recovery): no stamp, so nothing is cached.
        if self._reader is None:
            return None
        try:
            models, counted = self._reader.execute("SELECT models, counts FROM read_generation").fetchone()
            return models, counted
        except (sqlite3.OperationalError, TypeError):
            return None

    def _update(self, model_id: str, fields: ModelDocument, return_previous: bool,
                amend: Amend | None) -> ModelDocument | None:
        db = self._db
        db.execute("BEGIN IMMEDIATE")
        try:
            doc = self._get(model_id)
            if doc is None:
                db.execute("ROLLBACK")
                return None
            previous = dict(doc)
            if amend is not None:
                fields = {**fields, **amend(previous)}
            for key, value in fields.items():
                if value is None:
                    doc.pop(key, None)
                else:
                    doc[key] = value
            fm = doc.get("file_metadata")
            db.execute(
                "UPDATE models SET algorithm = ?, status = ?, created_by = ?, file_id = ?, doc = ?, search_text = ?"
                " WHERE id = ?",
                (doc["algorithm"], doc["status"], doc.get("created_by"), fm["file_id"] if fm else None,
                 _encode_doc(doc), _search_text(doc), model_id),
            )
            if _file_ids(doc) != _file_ids(previous):
                self._refer(model_id, doc)
            db.execute("COMMIT")
            return previous if return_previous else doc
        except BaseException:
            db.execute("ROLLBACK")
            raise

    async def update_model(
        self, model_id: str, fields: ModelDocument, *, return_previous: bool = False, amend: Amend | None = None
    ) -> ModelDocument | None:
        return await self._run(self._update, model_id, fields, return_previous, amend)

    def _record_downloads(self, tallies: Mapping[tuple[str, datetime], int],
                          db: sqlite3.Connection | None = None) -> None:
        # Counts are written in batches off the downloads' path (app/counts.py),
        # without their own fsync (the lease connection): a power cut may lose
        # the latest counts, never consistency. One transaction: exact across
        # worker processes.
        db = db or self._fast
        per_model: Counter[str] = Counter()
        per_hour: Counter[datetime] = Counter()
        for (model_id, hour), n in tallies.items():
            per_model[model_id] += n
            per_hour[hour] += n
        db.execute("BEGIN IMMEDIATE")
        try:
            db.executemany("UPDATE models SET download_count = download_count + ? WHERE id = ?",
                           [(n, model_id) for model_id, n in per_model.items()])
            for hour, n in sorted(per_hour.items()):
                if db.execute("UPDATE download_hours SET count = count + ? WHERE hour = ?", (n, iso(hour))).rowcount:
                    continue
                db.execute("INSERT INTO download_hours (hour, count) VALUES (?, ?)", (iso(hour), n))
                # A new hour: prune the old ones, so the tally stays bounded.
                db.execute("DELETE FROM download_hours WHERE hour < ?", (iso(hour - DOWNLOAD_HISTORY),))
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise

    async def record_downloads(self, tallies: Mapping[tuple[str, datetime], int]) -> None:
        if not tallies:
            return
        # A small batch on the loop's own connection, as a download's lease: the
        # hop to the SQLite thread and back cost more than the commit (with
        # COUNT_FLUSH_INTERVAL=0 every download writes its count before its body).
        if self._loop_may_write() and len(tallies) <= _COUNTS_ON_LOOP:
            try:
                self._record_downloads(tallies, self._on_loop)
            except sqlite3.OperationalError:
                pass  # busy (rolled back): queue like any other call
            else:
                return self._loop_committed()
        await self._run(self._record_downloads, tallies)

    def _delete(self, model_id: str) -> ModelDocument | None:
        db = self._db
        db.execute("BEGIN IMMEDIATE")
        try:
            row = db.execute("DELETE FROM models WHERE id = ? RETURNING *", (model_id,)).fetchone()
            self._refer(model_id, None)
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        return _decode_row(row) if row else None

    async def delete_model(self, model_id: str) -> ModelDocument | None:
        return await self._run(self._delete, model_id)

    @staticmethod
    def _where(q: ModelQuery) -> tuple[str, list[Any]]:
        clauses: list[str] = []
        params: list[Any] = []
        if q.algorithm is not None:
            clauses.append("algorithm = ?")
            params.append(q.algorithm)
        if q.status is not None:
            clauses.append("status = ?")
            params.append(q.status)
        if q.created_by is not None:
            clauses.append("created_by = ?")
            params.append(q.created_by)
        if q.created_before is not None:
            clauses.append("created_at < ?")
            params.append(iso(q.created_before))
        if q.tags:
            marks = ", ".join("?" * len(q.tags))
            clauses.append(f"EXISTS (SELECT 1 FROM json_each(doc, '$.tags') WHERE value IN ({marks}))")
            params.extend(q.tags)
        if q.text is not None and _SEPARATOR not in q.text:
            # One C-level substring test per row over text folded at write time.
            clauses.append("instr(search_text, ?) > 0")
            params.append(q.text.casefold())
        elif q.text is not None:
            clauses.append(
                "(icontains(name, ?) OR icontains(algorithm, ?)"
                " OR icontains(json_extract(doc, '$.description'), ?)"
                " OR EXISTS (SELECT 1 FROM json_each(doc, '$.tags') WHERE icontains(value, ?)))"
            )
            params.extend([q.text] * 4)
        if q.latest_only:
            clauses.append("coalesce(json_extract(doc, '$.superseded'), 0) = 0")
        if q.min_accuracy is not None:
            # test_accuracy when the model reports it, plain accuracy otherwise.
            clauses.append(
                "(CASE WHEN json_type(doc, '$.metrics.test_accuracy') IS NOT NULL"
                " THEN json_extract(doc, '$.metrics.test_accuracy') >= ?"
                " ELSE json_extract(doc, '$.metrics.accuracy') >= ? END)"
            )
            params.extend([q.min_accuracy, q.min_accuracy])
        return (" WHERE " + " AND ".join(clauses)) if clauses else "", params

    def _find(self, q: ModelQuery) -> tuple[list[ModelDocument], int]:
        where, params = self._where(q)
        total = self._db.execute(f"SELECT count(*) FROM models{where}", params).fetchone()[0]
        direction = "DESC" if q.sort_desc else "ASC"
        if q.sort_field.startswith("metrics."):
            metric = q.sort_field[len("metrics."):]
            # Sort numbers only, as MongoDB orders numbers before nothing; a
            # model without the metric sorts as the smallest value, like BSON null.
            order = f"json_extract(doc, ?) {direction}"
            order_params: list[Any] = ["$.metrics." + _json_member(metric)]
        else:
            order = f"{_SORT_COLUMNS[q.sort_field]} {direction}"
            order_params = []
        rows = self._db.execute(
            f"SELECT * FROM models{where} ORDER BY {order}, id {direction} LIMIT ? OFFSET ?",
            [*params, *order_params, q.limit, q.skip],
        ).fetchall()
        return [_decode_row(r) for r in rows], total

    async def find_models(self, query: ModelQuery) -> tuple[list[ModelDocument], int]:
        return await self._run(self._find, query)

    def _named(self, name: str) -> list[ModelDocument]:
        rows = self._db.execute("SELECT * FROM models WHERE name = ?", (name,)).fetchall()
        return [_decode_row(r) for r in rows]

    async def models_named(self, name: str) -> list[ModelDocument]:
        return await self._run(self._named, name)

    async def count_models(self) -> int:
        return await self._run(lambda: self._db.execute("SELECT count(*) FROM models").fetchone()[0])

    def _statistics(self, since_added: datetime, since_downloads: datetime) -> RegistryStats:
        db = self._db
        by_algorithm: dict[str, int] = {}
        by_status: dict[str, int] = {}
        for algorithm, status, n in db.execute(
            "SELECT algorithm, status, count(*) FROM models GROUP BY algorithm, status"
        ):
            by_algorithm[algorithm] = by_algorithm.get(algorithm, 0) + n
            by_status[status] = by_status.get(status, 0) + n
        downloads, model_bytes = db.execute(
            "SELECT coalesce(sum(download_count), 0),"
            " coalesce(sum(coalesce(json_extract(doc, '$.file_metadata.size_bytes'),"
            " json_extract(doc, '$.total_size_bytes'))), 0)"
            " FROM models"
        ).fetchone()
        with_files = db.execute("SELECT count(DISTINCT model_id) FROM model_files").fetchone()[0]
        # Distinct content: a blob shared by versions, models or a snapshot's files counts once.
        stored = db.execute(
            "SELECT coalesce(sum(length), 0) FROM files WHERE file_id IN (SELECT file_id FROM model_files)"
        ).fetchone()[0]
        added = db.execute("SELECT count(*) FROM models WHERE created_at >= ?", (iso(since_added),)).fetchone()[0]
        by_hour = {parse_iso(hour): n for hour, n in db.execute(
            "SELECT hour, count FROM download_hours WHERE hour >= ?", (iso(since_downloads),)
        )}
        return RegistryStats(by_algorithm, by_status, downloads, stored, with_files, model_bytes, added,
                             sum(by_hour.values()), by_hour)

    async def statistics(self, since_added: datetime, since_downloads: datetime) -> RegistryStats:
        return await self._run(self._statistics, since_added, since_downloads)

    # -- files ---------------------------------------------------------------
    def blob_path(self, sha256: str) -> Path:
        return self.blob_dir / sha256[:2] / sha256

    def file_writer(self, chunk_size: int = DEFAULT_CHUNK_SIZE) -> FileWriter:
        return _EmbeddedWriter(self, chunk_size)

    def local_path(self, file: StoredFile) -> str | None:
        # blob_path's string, without building a Path (every download asks).
        return f"{self.blob_dir}{os.sep}{file.sha256[:2]}{os.sep}{file.sha256}"

    def _file_row(self, file_id: str) -> StoredFile | None:
        row = self._db.execute("SELECT * FROM files WHERE file_id = ?", (file_id,)).fetchone()
        return _row_file(row) if row else None

    async def file_info(self, file_id: str) -> StoredFile | None:
        return await self._run(self._file_row, file_id)

    def _register_blob(self, tmp_path: Path, sha256: str, size: int, chunk_size: int) -> StoredFile:
        """Put the content in blobs/ (or find it there) and record it, claimed; inside the caller's
        BEGIN IMMEDIATE transaction, which covers the rename: a release in another worker process
        (also one transaction, see _release_one) cannot run between "is it there?" and "put it there"."""
        row = self._db.execute("SELECT file_id FROM files WHERE sha256 = ?", (sha256,)).fetchone()
        target = self.blob_path(sha256)
        if row is not None and target.exists():
            tmp_path.unlink(missing_ok=True)
        else:
            target.parent.mkdir(exist_ok=True)
            os.replace(tmp_path, target)
            _fsync_dir(target.parent)
        if row is not None:
            self._db.execute("UPDATE files SET claims = claims + 1, claimed_at = ? WHERE file_id = ?",
                             (iso(now()), row["file_id"]))
            return self._file_row(row["file_id"])
        stored = StoredFile(str(ObjectId()), size, sha256, chunk_size, now())
        self._db.execute(
            "INSERT INTO files (file_id, sha256, length, chunk_size, uploaded_at, claims, claimed_at)"
            " VALUES (?, ?, ?, ?, ?, 1, ?)",
            (stored.file_id, sha256, size, chunk_size, iso(stored.uploaded_at), iso(stored.uploaded_at)),
        )
        return stored

    def _register(self, tmp_path: Path, sha256: str, size: int, chunk_size: int) -> StoredFile:
        with _transaction(self._db):
            return self._register_blob(tmp_path, sha256, size, chunk_size)

    def _blob_rows(self, sha256s: list[str]) -> list[sqlite3.Row]:
        rows = []
        for part in _parts(sha256s):
            rows += self._db.execute(f"SELECT * FROM files WHERE sha256 IN ({_marks(part)})", part).fetchall()
        return rows

    async def find_blob(self, sha256: str) -> StoredFile | None:
        row = await self._run(lambda: self._db.execute("SELECT * FROM files WHERE sha256 = ?", (sha256,)).fetchone())
        return _row_file(row) if row else None

    def _keep(self, sha256s: list[str], until: datetime) -> dict[str, StoredFile]:
        db = self._db
        db.execute("BEGIN IMMEDIATE")
        try:
            rows = self._blob_rows(sha256s)
            db.executemany("UPDATE files SET kept_until = max(coalesce(kept_until, ''), ?) WHERE file_id = ?",
                           [(iso(until), r["file_id"]) for r in rows])
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        return {r["sha256"]: _row_file(r) for r in rows}

    async def keep_blobs(self, sha256s: list[str], until: datetime) -> dict[str, StoredFile]:
        return await self._run(self._keep, list(dict.fromkeys(sha256s)), until)

    def _claim(self, sha256s: list[str]) -> dict[str, StoredFile]:
        db = self._db
        db.execute("BEGIN IMMEDIATE")
        try:
            rows = self._blob_rows(sha256s)
            db.executemany("UPDATE files SET claims = claims + 1, claimed_at = ? WHERE file_id = ?",
                           [(iso(now()), r["file_id"]) for r in rows])
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        return {r["sha256"]: _row_file(r) for r in rows}

    async def claim_blobs(self, sha256s: list[str]) -> dict[str, StoredFile]:
        return await self._run(self._claim, list(dict.fromkeys(sha256s)))

    async def settle_file(self, file_id: str) -> None:
        await self.settle_files([file_id])

    def _settle(self, file_ids: list[str]) -> list[str]:
        db = self._db
        # One transaction: in autocommit mode each row would be a commit (and an fsync) of its own.
        with _transaction(db):
            db.executemany("UPDATE files SET claims = max(claims - 1, 0) WHERE file_id = ?", [(f,) for f in file_ids])
            waiting = self._pending_among(db, file_ids)
        # A release this claim held back can complete now (the claim was a lease too).
        return self._release_all(waiting)

    async def settle_files(self, file_ids: list[str]) -> None:
        # Returns nothing: a cursor handed back to the loop and dropped there is
        # finalized off the SQLite thread, during its next statement (sqlite3 "API misuse").
        await self._run(self._settle, file_ids)

    # -- releases and leases ---------------------------------------------------
    # One release is one BEGIN IMMEDIATE transaction (SQLite serialises those
    # across the worker processes sharing the file): it looks for a model that
    # refers to the content, a live lease, claim or keep, and either remembers
    # the release (content_pending) or deletes the row and renames the blob
    # aside before COMMIT. A lease (lease_files) is one transaction too, and
    # leases only content whose row is there: so a reader either holds its
    # lease before a release looks, or finds the content gone. A commit of the
    # same bytes (_register) cannot slip between the row's deletion and the
    # blob's, which an unlink after COMMIT allowed (it removed the new blob).
    # Claims stay the files.claims counter and keeps files.kept_until: exact
    # under these transactions, and settle_file completes a release a claim held back.

    def _release_one(self, file_id: str) -> str | None:
        """Release (see release_file); the sha256 of the content deleted, None if it stays."""
        db = self._db
        aside: Path | None = None
        db.execute("BEGIN IMMEDIATE")
        try:
            at = now()
            row = db.execute("SELECT sha256 FROM files WHERE file_id = ?", (file_id,)).fetchone()
            if row is None or db.execute("SELECT 1 FROM model_files WHERE file_id = ? LIMIT 1",
                                         (file_id,)).fetchone():
                # Gone already, or a model needs it: nothing to wait for.
                db.execute("DELETE FROM content_pending WHERE file_id = ?", (file_id,))
                db.execute("COMMIT")
                return None
            held = db.execute(
                "SELECT EXISTS (SELECT 1 FROM content_leases WHERE file_id = ?1 AND until >= ?2)"
                " OR EXISTS (SELECT 1 FROM files WHERE file_id = ?1 AND ((claims > 0 AND NOT claimed_at < ?3)"
                " OR kept_until >= ?2))",
                (file_id, iso(at), iso(at - CLAIM_GRACE))).fetchone()[0]
            if held:
                db.execute("INSERT OR IGNORE INTO content_pending (file_id, at) VALUES (?, ?)", (file_id, iso(at)))
                db.execute("COMMIT")
                return None
            db.execute("DELETE FROM files WHERE file_id = ?", (file_id,))
            db.execute("DELETE FROM content_pending WHERE file_id = ?", (file_id,))
            db.execute("DELETE FROM content_leases WHERE file_id = ?", (file_id,))  # expired ones
            target = self.blob_path(row["sha256"])
            aside = target.with_name(f"{target.name}{_ASIDE}{secrets.token_hex(6)}")
            try:
                os.rename(target, aside)
            except FileNotFoundError:
                aside = None  # already missing (removed behind our back): the row goes anyway
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            if aside is not None:
                os.rename(aside, self.blob_path(row["sha256"]))
            raise
        if aside is not None:
            aside.unlink(missing_ok=True)
        return row["sha256"]

    def _release_all(self, file_ids: list[str]) -> list[str]:
        # On the main connection: a deletion must be durable before its blob goes.
        return [f for f in file_ids if self._release_one(f) is not None]

    async def release_file(self, file_id: str) -> bool:
        return await self._run(self._release_one, file_id) is not None

    @staticmethod
    def _pending_among(db: sqlite3.Connection, file_ids: list[str]) -> list[str]:
        found = []
        for part in _parts(file_ids):
            found += [r[0] for r in db.execute(
                f"SELECT file_id FROM content_pending WHERE file_id IN ({_marks(part)})", part)]
        return found

    @staticmethod
    def _lease_part(db: sqlite3.Connection, part: list[str], owner: str, until: datetime) -> dict[str, str]:
        """Lease up to _LEASE_PART files in one statement, its own transaction (each file is leased or not)."""
        wanted = [value for file_id in part for value in (str(ObjectId()), file_id)]
        return {file_id: lease_id for lease_id, file_id in db.execute(
            "INSERT INTO content_leases (id, file_id, owner, until) SELECT w.column1, w.column2, ?, ?"
            f" FROM (VALUES {', '.join(['(?, ?)'] * len(part))}) AS w JOIN files f ON f.file_id = w.column2"
            " RETURNING id, file_id", [owner, iso(until), *wanted])}

    def _lease(self, file_ids: list[str], owner: str, until: datetime) -> dict[str, str]:
        leases = {}
        for part in _parts(file_ids, _LEASE_PART):
            leases.update(self._lease_part(self._fast, part, owner, until))
        return leases

    async def lease_files(self, file_ids: list[str], owner: str, until: datetime) -> dict[str, str]:
        file_ids = list(dict.fromkeys(file_ids))
        if self._loop_may_write() and len(file_ids) <= _LEASE_PART:
            try:
                leased = self._lease_part(self._on_loop, file_ids, owner, until)
            except sqlite3.OperationalError:
                pass  # busy (another writer, here or in another worker): queue like any other call
            else:
                self._loop_committed()
                return leased
        return await self._run(self._lease, file_ids, owner, until)

    def _renew(self, lease_ids: list[str], until: datetime) -> None:
        db = self._fast
        with _transaction(db):
            for part in _parts(lease_ids):
                db.execute(f"UPDATE content_leases SET until = ? WHERE id IN ({_marks(part)})", [iso(until), *part])

    async def renew_leases(self, lease_ids: list[str], until: datetime) -> None:
        if lease_ids:
            await self._run(self._renew, lease_ids, until)

    @staticmethod
    def _drop_part(db: sqlite3.Connection, part: list[str]) -> list[str]:
        """End up to 500 leases in one statement; the files among theirs whose release waited."""
        # The pending marks are looked for in the same statement, after the
        # lease is gone: a release that saw the lease has left its mark by now.
        return [file_id for file_id, pending in db.execute(
            f"DELETE FROM content_leases WHERE id IN ({_marks(part)}) RETURNING file_id,"
            " EXISTS (SELECT 1 FROM content_pending p WHERE p.file_id = content_leases.file_id)", part)
            if pending]

    def _drop(self, lease_ids: list[str]) -> list[str]:
        waiting = [file_id for part in _parts(lease_ids) for file_id in self._drop_part(self._fast, part)]
        return self._release_all(list(dict.fromkeys(waiting)))

    async def drop_leases(self, lease_ids: list[str]) -> list[str]:
        if not lease_ids:
            return []
        if self._loop_may_write() and len(lease_ids) <= 500:
            try:
                waiting = self._drop_part(self._on_loop, lease_ids)
            except sqlite3.OperationalError:
                pass  # busy: queue
            else:
                self._loop_committed()
                return await self._run(self._release_all, list(dict.fromkeys(waiting))) if waiting else []
        return await self._run(self._drop, lease_ids)

    def _loop_committed(self) -> None:
        """After a commit on the loop's connection, which never checkpoints: every _CHECKPOINT_EVERY of them,
        a checkpoint on the SQLite thread, in the background. Without it, downloads that are not counted
        (ranges after byte 0, a version's files) wrote leases and drops alone and the WAL grew without end
        (bench/: 16 connections of 4 KiB ranges, 2 -> 10 MB in 15 s, never checkpointed)."""
        self._loop_commits += 1
        if self._loop_commits < _CHECKPOINT_EVERY or self._executor is None or (
                self._checkpointing is not None and not self._checkpointing.done()):
            return
        self._loop_commits = 0
        self._checkpointing = asyncio.get_running_loop().run_in_executor(self._executor, self._checkpoint)

    def _loop_may_write(self) -> bool:
        # Not while a checkpoint waits for the write lock: the loop's commits,
        # back to back, kept it waiting while the WAL grew; queued behind it, they wait ms.
        return self._on_loop is not None and (self._checkpointing is None or self._checkpointing.done())

    def _checkpoint(self) -> None:
        # RESTART, not PASSIVE: a passive checkpoint never caught up with the
        # loop's commits, so the WAL never started over and kept growing.
        # Writers on the loop meanwhile find the database busy and queue here.
        # At most _CHECKPOINT_WAIT_MS for the lock (other workers' writers and
        # readers): everything queued for this thread waits behind it; a busy
        # database is tried again _CHECKPOINT_EVERY commits later.
        db = self._fast
        if db is not None:
            db.execute(f"PRAGMA busy_timeout={_CHECKPOINT_WAIT_MS}")
            try:
                with suppress(sqlite3.OperationalError):
                    db.execute("PRAGMA wal_checkpoint(RESTART)").fetchone()
            finally:
                db.execute(f"PRAGMA busy_timeout={_BUSY_TIMEOUT_MS}")

    def _release_pending(self) -> list[str]:
        at = now()
        # Only those nothing holds any more (or that a model took back, or that are gone):
        # the others would each cost a transaction to learn that they stay.
        ready = [r[0] for r in self._db.execute(
            "SELECT file_id FROM content_pending p"
            " WHERE NOT EXISTS (SELECT 1 FROM content_leases l WHERE l.file_id = p.file_id AND l.until >= ?1)"
            " AND NOT EXISTS (SELECT 1 FROM files f WHERE f.file_id = p.file_id"
            " AND ((f.claims > 0 AND NOT f.claimed_at < ?2) OR f.kept_until >= ?1))",
            (iso(at), iso(at - CLAIM_GRACE)))]
        return self._release_all(ready)

    async def release_pending(self) -> list[str]:
        return await self._run(self._release_pending)

    def _garbage(self, min_age: timedelta) -> tuple[list[str], set[str], set[str]]:
        """(unreferenced file ids, blob names the files table knows, upload session ids)."""
        db = self._db
        cutoff = iso(now() - min_age)
        unreferenced = [r[0] for r in db.execute(
            "SELECT file_id FROM files WHERE file_id NOT IN (SELECT file_id FROM model_files)"
            " AND (claims = 0 OR claimed_at < ?1) AND uploaded_at < ?1 AND (kept_until IS NULL OR kept_until < ?2)"
            " AND file_id NOT IN (SELECT file_id FROM content_leases WHERE until >= ?2)",
            (cutoff, iso(now())))]
        known = {r[0] for r in db.execute("SELECT sha256 FROM files")}
        sessions = {r[0] for r in db.execute("SELECT id FROM upload_sessions")}
        return unreferenced, known, sessions

    def _unlink_stray(self, path: Path) -> bool:
        """Remove a blob without a files row or a session file without a session, unless one appeared
        meanwhile; in a transaction, as commits (_register) and new sessions record them. A blob a
        release renamed aside goes back where its row (still there: the release rolled back) needs it."""
        db = self._db
        with _transaction(db):
            if path.parent == self.upload_dir:
                known = db.execute("SELECT 1 FROM upload_sessions WHERE id = ?", (path.name,)).fetchone()
            else:
                sha256 = path.name.partition(_ASIDE)[0]
                known = db.execute("SELECT 1 FROM files WHERE sha256 = ?", (sha256,)).fetchone()
                if known and sha256 != path.name:
                    target = self.blob_path(sha256)
                    if not target.exists():
                        os.replace(path, target)
                        return False
                    known = None  # a copy of content that is in place
            if known:
                return False
            path.unlink(missing_ok=True)
        return True

    async def collect_garbage(self, min_age: timedelta, dry_run: bool) -> list[str]:
        report = []
        if not dry_run:
            # Releases whose readers died with their leases (expired now).
            for file_id in await self.release_pending():
                report.append(f"file {file_id} (its release waited for readers that are gone)")
        unreferenced, known, sessions = await self._run(self._garbage, min_age)
        for file_id in unreferenced:
            info = await self.file_info(file_id)
            if info is None:
                continue
            if dry_run or await self.release_file(file_id):
                report.append(f"file {file_id} sha256:{info.sha256} {info.size} bytes (no model refers to it)")
        horizon = time.time() - min_age.total_seconds()

        def strays() -> list[tuple[str, Path]]:
            found = []
            for p in self.tmp_dir.iterdir():
                # A temp file still being written is locked, and the newest ones are spared even
                # before their writer has locked them.
                if p.is_file() and p.stat().st_mtime < horizon:
                    found.append(("temp file", p))
            for p in self.blob_dir.glob("*/*"):
                if p.is_file() and p.name not in known and p.stat().st_mtime < horizon:
                    found.append(("blob without a files row", p))
            for p in self.upload_dir.iterdir():
                # Expired sessions go through delete_session (app/maintenance.py); this is what a
                # crash between a session's row and its file leaves.
                if p.is_file() and p.name not in sessions and p.stat().st_mtime < horizon:
                    found.append(("upload session file without a session", p))
            return found

        for what, path in await asyncio.to_thread(strays):
            try:
                size = path.stat().st_size
            except FileNotFoundError:
                continue  # committed or cancelled meanwhile
            if what == "temp file":
                if not await asyncio.to_thread(_remove_unless_locked, path, dry_run):
                    continue
            elif not dry_run and not await self._run(self._unlink_stray, path):
                continue
            report.append(f"{what} {path} {size} bytes")
        return report

    # -- upload sessions -----------------------------------------------------
    def session_path(self, session_id: str) -> Path:
        return self.upload_dir / session_id

    async def open_session(self, session: UploadSession) -> None:
        await self._run(lambda: self._db.execute(
            'INSERT INTO upload_sessions (id, owner, "offset", size_bytes, checksum, chunk_size, created_at,'
            " updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (session.id, session.owner, session.offset, session.size_bytes, session.checksum, session.chunk_size,
             iso(session.created_at), iso(session.updated_at))).close())

    def _session_row(self, session_id: str) -> UploadSession | None:
        row = self._db.execute("SELECT * FROM upload_sessions WHERE id = ?", (session_id,)).fetchone()
        return _row_session(row) if row else None

    async def get_session(self, session_id: str) -> UploadSession | None:
        if not _SESSION_ID_RE.fullmatch(session_id):
            return None
        return await self._run(self._session_row, session_id)

    async def count_sessions(self, owner: str, updated_after: datetime) -> tuple[int, int]:
        mine, everyone = await self._run(lambda: tuple(self._db.execute(
            "SELECT coalesce(sum(owner = ?), 0), count(*) FROM upload_sessions WHERE updated_at > ?",
            (owner, iso(updated_after))).fetchone()))
        return mine, everyone

    def session_writer(self, session_id: str) -> SessionWriter:
        return _EmbeddedSessionWriter(self, session_id)

    def _lock_session(self, session_id: str, token: str) -> UploadSession:
        """Take a session's write lock (one conditional UPDATE: SQLite serialises writers, across processes too)."""
        at = now()
        row = self._db.execute(
            "UPDATE upload_sessions SET lock_token = ?, lock_until = ? WHERE id = ?"
            " AND (lock_token IS NULL OR lock_until < ?) RETURNING *",
            (token, iso(at + SESSION_LOCK_TTL), session_id, iso(at))).fetchone()
        if row is not None:
            return _row_session(row)
        if self._db.execute("SELECT 1 FROM upload_sessions WHERE id = ?", (session_id,)).fetchone():
            raise SessionBusy(f"upload session {session_id} is being written by another request")
        raise SessionMissing(f"no upload session {session_id}")

    def _renew_session_lock(self, session_id: str, token: str) -> bool:
        return self._db.execute("UPDATE upload_sessions SET lock_until = ? WHERE id = ? AND lock_token = ?",
                                (iso(now() + SESSION_LOCK_TTL), session_id, token)).rowcount == 1

    def _unlock_session(self, session_id: str, token: str) -> None:
        self._db.execute("UPDATE upload_sessions SET lock_token = NULL, lock_until = NULL"
                         " WHERE id = ? AND lock_token = ?", (session_id, token))

    def _advance_session(self, session_id: str, token: str, offset: int) -> UploadSession:
        row = self._db.execute(
            'UPDATE upload_sessions SET "offset" = ?, updated_at = ? WHERE id = ? AND lock_token = ? RETURNING *',
            (offset, iso(now()), session_id, token)).fetchone()
        if row is None:
            raise SessionBusy(f"upload session {session_id}: its write lock lapsed and another request took it")
        return _row_session(row)

    def _commit_session(self, session_id: str, token: str, sha256: str, size: int, chunk_size: int) -> StoredFile:
        """The session's file becomes a blob and its row goes, in one transaction."""
        db = self._db
        db.execute("BEGIN IMMEDIATE")
        try:
            if db.execute("DELETE FROM upload_sessions WHERE id = ? AND lock_token = ? RETURNING id",
                          (session_id, token)).fetchone() is None:
                raise SessionBusy(f"upload session {session_id}: its write lock lapsed and another request took it")
            stored = self._register_blob(self.session_path(session_id), sha256, size, chunk_size)
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        return stored

    def _delete_session(self, session_id: str) -> bool:
        token = secrets.token_hex(8)
        try:
            self._lock_session(session_id, token)
        except SessionMissing:
            return False
        self._db.execute("DELETE FROM upload_sessions WHERE id = ? AND lock_token = ?", (session_id, token))
        # Unlinked on this thread after the row: no writer can hold the file now.
        self.session_path(session_id).unlink(missing_ok=True)
        return True

    async def delete_session(self, session_id: str) -> bool:
        if not _SESSION_ID_RE.fullmatch(session_id):
            return False
        self.session_hashes.forget(session_id)
        return await self._run(self._delete_session, session_id)

    async def sessions_updated_before(self, before: datetime) -> list[UploadSession]:
        rows = await self._run(lambda: self._db.execute(
            "SELECT * FROM upload_sessions WHERE updated_at < ? ORDER BY updated_at", (iso(before),)).fetchall())
        return [_row_session(r) for r in rows]

    async def read_file(self, file: StoredFile, offset: int = 0, length: int | None = None) -> AsyncIterator[bytes]:
        end = file.size if length is None else min(file.size, offset + length)
        try:
            fd = await asyncio.to_thread(os.open, self.blob_path(file.sha256), os.O_RDONLY)
        except FileNotFoundError as e:
            raise FileMissing(f"content of file {file.file_id} is missing") from e
        try:
            pos = offset
            while pos < end:
                want = min(_PIECE, end - pos)
                # Straight from the page cache when the bytes are there (no
                # thread hop); from a thread when the disk has to be read.
                data = _read_cached(fd, want, pos)
                if data is None:
                    data = await asyncio.to_thread(os.pread, fd, want, pos)
                if not data:
                    raise FileMissing(f"content of file {file.file_id} is shorter than recorded")
                pos += len(data)
                yield data
        finally:
            os.close(fd)


_SESSION_ID_RE = re.compile(r"[0-9a-f]{24}")
# A released blob is renamed to <sha256><_ASIDE><token> inside its release's transaction and
# unlinked after COMMIT; one a crash left in between, its row still there, gc puts back.
_ASIDE = ".released-"
# Files leased by one statement (two bound parameters each, within SQLite's limit).
_LEASE_PART = 250
# Download tallies (model, hour) one batch writes on the loop's connection: a few
# rows commit in tens of microseconds; a longer backlog goes to the SQLite thread.
_COUNTS_ON_LOOP = 32
# Commits on the loop's connection between two checkpoints: a lease or a drop
# writes about two pages, so about SQLite's own 1,000-page autocheckpoint.
_CHECKPOINT_EVERY = 500
_CHECKPOINT_WAIT_MS = 200
# How long the SQLite thread's connections wait for another writer's lock (the checkpoint's
# shorter wait is restored to this).
_BUSY_TIMEOUT_MS = 10_000


@contextmanager
def _transaction(db: sqlite3.Connection) -> Iterator[None]:
    """BEGIN IMMEDIATE: the write lock from the start, so no other worker process writes in between."""
    db.execute("BEGIN IMMEDIATE")
    try:
        yield
    except BaseException:
        db.execute("ROLLBACK")
        raise
    db.execute("COMMIT")


def _parts(values: list[str], size: int = 500) -> Iterator[list[str]]:
    """Slices small enough for SQLite's bound-parameter limit."""
    for i in range(0, len(values), size):
        yield values[i:i + size]


def _marks(values: list[str]) -> str:
    return ", ".join("?" * len(values))


def _row_session(row: sqlite3.Row) -> UploadSession:
    return UploadSession(row["id"], row["owner"], row["offset"], row["size_bytes"], row["checksum"],
                         row["chunk_size"], parse_iso(row["created_at"]), parse_iso(row["updated_at"]))


def _row_file(row: sqlite3.Row) -> StoredFile:
    return StoredFile(row["file_id"], row["length"], row["sha256"], row["chunk_size"], parse_iso(row["uploaded_at"]))


def _read_cached(fd: int, n: int, pos: int) -> bytes | memoryview | None:
    """Read without blocking (RWF_NOWAIT): None when the bytes are not in memory."""
    buf = bytearray(n)
    try:
        got = os.preadv(fd, [buf], pos, os.RWF_NOWAIT)
    except (BlockingIOError, OSError):
        return None
    return memoryview(buf)[:got] if got else None


class _EmbeddedWriter(FileWriter):
    def __init__(self, store: EmbeddedStorage, chunk_size: int) -> None:
        super().__init__(chunk_size)
        self._store = store
        self._path = store.tmp_dir / f"{secrets.token_hex(12)}.part"
        self._file = None

    async def _store_batch(self, batch: list[bytes], offset: int) -> None:
        await asyncio.get_running_loop().run_in_executor(pipeline.threads, self._write_batch, batch, offset)

    def _write_batch(self, batch: list[bytes], offset: int) -> None:
        if self._file is None:
            self._file = open(self._path, "xb", buffering=0)
            # Held until the file is renamed into blobs/ or removed: `gc`, another
            # process, leaves a locked temp file alone however old it is.
            fcntl.flock(self._file.fileno(), fcntl.LOCK_EX)
        pipeline.write_pieces(self._file.fileno(), batch, offset)
        pipeline.start_writeback(self._file.fileno(), offset, sum(map(len, batch)))

    def _finish_file(self) -> None:
        if self._file is None:  # nothing was written: an empty file
            self._write_batch([], 0)
        os.fsync(self._file.fileno())

    async def _commit(self) -> StoredFile:
        try:
            await asyncio.to_thread(self._finish_file)
            stored = await self._store._run(self._store._register, self._path, self.sha256, self.size,
                                            self.chunk_size)
        except BaseException:
            await self._cancel()
            raise
        # Closed (and unlocked) only now that it has left tmp/.
        await asyncio.to_thread(self._file.close)
        return stored

    async def _cancel(self) -> None:
        def discard() -> None:
            # Removed before it is closed, which would unlock it for gc.
            self._path.unlink(missing_ok=True)
            if self._file is not None:
                self._file.close()

        await asyncio.to_thread(discard)


class _EmbeddedSessionWriter(SessionWriter):
    """Appends to uploads/<id>; the row's offset moves only after an fsync, so it never counts lost bytes."""

    def __init__(self, store: EmbeddedStorage, session_id: str) -> None:
        super().__init__(store, session_id)
        self._store = store
        self._path = store.session_path(session_id)
        self._token = secrets.token_hex(8)
        self._file = None
        self._locked = False
        self._renewed = 0.0

    async def _acquire(self) -> UploadSession:
        # The UPDATE runs on the SQLite thread whatever happens to this task: a
        # request cancelled meanwhile (its client left) waits for it and unlocks.
        locking = asyncio.ensure_future(self._store._run(self._store._lock_session, self.session_id, self._token))
        try:
            session = await asyncio.shield(locking)
        except asyncio.CancelledError:
            await asyncio.wait([locking])
            if not locking.cancelled() and locking.exception() is None:
                self._locked = True
                await self._release()
            raise
        self._locked = True
        self._renewed = time.monotonic()
        return session

    async def _release(self) -> None:
        try:
            if self._file is not None:
                file, self._file = self._file, None
                await asyncio.to_thread(file.close)
            if self._locked:
                self._locked = False
                await self._store._run(self._store._unlock_session, self.session_id, self._token)
        except Exception:
            pass  # the lock then lapses after SESSION_LOCK_TTL

    async def _discard_beyond(self, offset: int) -> None:
        def open_at() -> None:
            fd = os.open(self._path, os.O_RDWR | os.O_CREAT, 0o644)
            self._file = os.fdopen(fd, "r+b", buffering=0)
            length = os.fstat(fd).st_size
            if length < offset:
                raise FileMissing(f"upload session {self.session_id}: {length} bytes stored, {offset} recorded")
            if length > offset:
                os.ftruncate(fd, offset)
            self._file.seek(offset)

        await asyncio.to_thread(open_at)

    async def _read_prefix(self) -> AsyncIterator[bytes]:
        fd = await asyncio.to_thread(os.open, self._path, os.O_RDONLY)
        try:
            pos, end = 0, self.session.offset
            while pos < end:
                data = await asyncio.to_thread(os.pread, fd, min(_READ_SIZE, end - pos), pos)
                if not data:
                    raise FileMissing(f"upload session {self.session_id} is shorter than its offset")
                pos += len(data)
                yield data
        finally:
            os.close(fd)

    async def _still_held(self) -> bool:
        """Whether our lock still holds, renewing it once a third of its time has passed.

        Asked before each write to the file: a lock lapses only after its holder
        went that long without renewing, so a writer that froze past it finds
        out here, before it writes over (or truncates) the bytes of the request
        that took the session over.
        """
        if time.monotonic() - self._renewed > SESSION_LOCK_TTL.total_seconds() / 3:
            if not await self._store._run(self._store._renew_session_lock, self.session_id, self._token):
                return False
            self._renewed = time.monotonic()
        return True

    async def _hold_lock(self) -> None:
        if not await self._still_held():
            self._locked = False
            raise SessionBusy(f"upload session {self.session_id}: its write lock lapsed")

    async def _store_batch(self, batch: list[bytes], offset: int) -> None:
        await self._hold_lock()
        await asyncio.get_running_loop().run_in_executor(pipeline.threads, self._write_batch, batch, offset)

    def _write_batch(self, batch: list[bytes], offset: int) -> None:
        pipeline.write_pieces(self._file.fileno(), batch, offset)
        pipeline.start_writeback(self._file.fileno(), offset, sum(map(len, batch)))

    def _sync(self) -> None:
        os.fsync(self._file.fileno())

    async def _checkpoint(self) -> UploadSession:
        await self._hold_lock()
        await asyncio.to_thread(self._sync)
        return await self._store._run(self._store._advance_session, self.session_id, self._token, self.size)

    async def _commit(self) -> StoredFile:
        await self._hold_lock()
        await asyncio.to_thread(self._sync)
        stored = await self._store._run(self._store._commit_session, self.session_id, self._token, self.sha256,
                                        self.size, self.chunk_size)
        self._locked = False  # the row, and its lock, are gone
        return stored

    async def _cancel(self) -> None:
        # FileWriter.cancel waited for any batch still being written: nothing lands after the truncate.
        if self._file is not None and self.session is not None and self._locked and await self._still_held():
            # This request's bytes go now (the next writer would cut them anyway).
            await asyncio.to_thread(os.ftruncate, self._file.fileno(), self.session.offset)


def _remove_unless_locked(path: Path, dry_run: bool) -> bool:
    """Remove a temp file no writer holds (or say it could be removed); False if one does."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return False
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False  # an upload in progress
        if not dry_run:
            path.unlink(missing_ok=True)
        return True
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
