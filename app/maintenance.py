"""Housekeeping commands run against the store directly: ``cleanup`` and ``gc``.

They read the same environment variables as ``serve`` and are safe to run
while the service is up: cleanup deletes through the same path as the API,
and gc only removes what no model refers to, no upload is writing and no
download holds (a release a download held back, gc completes once the
download's lease is gone or expired).
"""

from __future__ import annotations

import argparse
import asyncio
import re
import sys
from datetime import timedelta
from typing import TYPE_CHECKING

from .schemas import STATUSES

if TYPE_CHECKING:
    from .config import Settings

# The store's modules are imported by the commands that use them: the parser is built for every
# ``model-service`` command, and ``model-service pull`` should not load the server to download a file.

_AGE_RE = re.compile(r"^(\d+)([smhdw])$")
_AGE_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days", "w": "weeks"}


def parse_age(text: str) -> timedelta:
    m = _AGE_RE.fullmatch(text.strip())
    if not m:
        raise argparse.ArgumentTypeError(f"not an age: {text!r} (use e.g. 90d, 12h, 30m)")
    return timedelta(**{_AGE_UNITS[m[2]]: int(m[1])})


async def _with_storage(settings: Settings, work):
    from .storage import make_storage

    storage = make_storage(settings)
    await storage.open()
    try:
        return await work(storage, settings)
    finally:
        await storage.close()


async def _cleanup(storage, status: str, older_than: timedelta, dry_run: bool) -> int:
    from . import clock, registry, snapshots
    from .storage import ModelQuery

    cutoff = clock.now() - older_than
    removed = skip = 0
    while True:
        query = ModelQuery(status=status, created_before=cutoff, sort_field="created_at", sort_desc=False,
                           skip=skip, limit=100)
        docs, _ = await storage.find_models(query)
        if not docs:
            break
        for doc in docs:
            size = snapshots.total_size(doc) or 0
            line = (f"{doc['id']} {doc['name']} {doc['version']} {doc['status']} "
                    f"created {clock.iso(doc['created_at'])} {size} bytes")
            if dry_run:
                print(f"would delete {line}")
            elif await registry.delete(storage, doc["id"]):
                print(f"deleted {line}")
            removed += 1
        # Deleted models leave the result set; in a dry run, page forward.
        skip += len(docs) if dry_run else 0
    print(f"{'would delete' if dry_run else 'deleted'} {removed} model(s)")
    return 0


async def _gc(storage, min_age: timedelta, dry_run: bool, session_ttl: timedelta) -> int:
    from . import registry, upload_sessions

    if not dry_run:
        # Models registered before versions were marked superseded.
        if settled := await registry.settle_all_latest(storage):
            print(f"marked the latest version of {settled} name(s)")
    # Expired sessions first: their bytes are then no longer a live session's.
    lines = await upload_sessions.remove_expired(storage, session_ttl, dry_run)
    lines += await storage.collect_garbage(min_age, dry_run)
    for line in lines:
        print(f"{'would remove' if dry_run else 'removed'} {line}")
    print(f"{'would remove' if dry_run else 'removed'} {len(lines)} item(s)")
    return 0


def _run(args: argparse.Namespace, work) -> int:
    from .config import ConfigError, Settings
    from .storage import StorageError

    try:
        settings = Settings.from_env()
    except ConfigError as e:
        print(f"model-service: configuration error: {e}", file=sys.stderr)
        return 2
    try:
        return asyncio.run(_with_storage(settings, work))
    except StorageError as e:
        print(f"model-service: {e}", file=sys.stderr)
        return 1


def add_maintenance_commands(sub) -> None:
    p = sub.add_parser("cleanup", help="delete old models of a status, and their files")
    p.add_argument("--status", required=True, choices=STATUSES)
    p.add_argument("--older-than", required=True, type=parse_age, metavar="AGE", help="e.g. 90d, 12h")
    p.add_argument("--dry-run", action="store_true", help="print what would be deleted, delete nothing")
    p.set_defaults(func=lambda a: _run(a, lambda s, _: _cleanup(s, a.status, a.older_than, a.dry_run)))

    p = sub.add_parser("gc", help="remove stored files and chunks no model refers to, and expired upload sessions")
    p.add_argument("--min-age", type=parse_age, default=timedelta(hours=1), metavar="AGE",
                   help="leave anything younger alone, e.g. an upload in progress (default 1h)")
    p.add_argument("--dry-run", action="store_true", help="print what would be removed, remove nothing")
    p.set_defaults(func=lambda a: _run(a, lambda s, st: _gc(s, a.min_age, a.dry_run, st.upload_session_ttl)))
