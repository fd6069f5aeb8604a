"""Upload sessions' write locks on MongoDB: one document per locked session.

A lock is ``{_id: session id, token, until}`` in its own collection. It is
taken by inserting that document, which the unique ``_id`` lets only one
request do; a lock whose ``until`` has passed belongs to a writer that died
(or stalled past SESSION_LOCK_TTL), and the next request removes exactly that
lock (``delete_one`` on its token) and inserts its own. Renewal and release
also name the token, so a writer never touches a lock it lost.

Single-document inserts and deletes are atomic on every server; find-and-modify
is not on FerretDB across connections, so it is not used for this.
"""

from __future__ import annotations

import asyncio
import logging
import secrets

from bson import ObjectId
from pymongo.errors import DuplicateKeyError, PyMongoError

from ..clock import now
from .base import SESSION_LOCK_TTL, SessionBusy

log = logging.getLogger("app.storage")

# Takeover attempts before answering busy: each failed insert means another
# request took the lock in between, which is what busy means.
_ATTEMPTS = 3


class SessionLocks:
    def __init__(self, collection) -> None:
        self._locks = collection
        self._retries: set[asyncio.Task] = set()

    @staticmethod
    def new_token() -> str:
        return secrets.token_hex(16)

    async def acquire(self, session_id: ObjectId, token: str) -> bool:
        """Take the lock under ``token`` (new_token()); SessionBusy while another holder's lock is live.

        True if it took over a lapsed lock: its holder died or stalled, and may
        have left the session half-written.
        """
        took_over = False
        for _ in range(_ATTEMPTS):
            try:
                await self._locks.insert_one({"_id": session_id, "token": token, "until": now() + SESSION_LOCK_TTL})
                return took_over
            except DuplicateKeyError:
                held = await self._locks.find_one({"_id": session_id})
                if held is not None and held["until"] > now():
                    raise SessionBusy(f"upload session {session_id} is being written") from None
                if held is not None:
                    # Only that expired lock: a holder that took over meanwhile keeps its own.
                    await self._locks.delete_one({"_id": session_id, "token": held["token"]})
                    took_over = True
        raise SessionBusy(f"upload session {session_id} is being written")

    async def renew(self, session_id: ObjectId, token: str) -> bool:
        """Extend our lock; False if we no longer hold it (it lapsed and another request took it)."""
        result = await self._locks.update_one({"_id": session_id, "token": token},
                                              {"$set": {"until": now() + SESSION_LOCK_TTL}})
        return result.matched_count == 1

    async def release(self, session_id: ObjectId, token: str) -> None:
        """Give our lock up; never raises. If the database is out of reach, again in the
        background until it is back (else the session stays busy for SESSION_LOCK_TTL)."""
        try:
            await self._locks.delete_one({"_id": session_id, "token": token})
        except PyMongoError as e:
            log.info("could not release the lock of upload session %s (%s); retrying", session_id,
                     e.__class__.__name__)
            task = asyncio.create_task(self._release_when_back(session_id, token))
            self._retries.add(task)
            task.add_done_callback(self._retries.discard)

    async def _release_when_back(self, session_id: ObjectId, token: str) -> None:
        delay, deadline = 0.5, asyncio.get_running_loop().time() + SESSION_LOCK_TTL.total_seconds()
        while asyncio.get_running_loop().time() < deadline:  # after that the lock has lapsed anyway
            await asyncio.sleep(delay)
            try:
                await self._locks.delete_one({"_id": session_id, "token": token})
                return
            except PyMongoError:
                delay = min(delay * 2, 8.0)

    async def forget_lapsed(self, sessions: set[ObjectId]) -> int:
        """Remove lapsed locks of sessions that are gone (read ``sessions`` first), which a
        delete_session that died leaves. A lapsed lock of a live session stays: it tells the
        next request that its writer died, and that request then discards what it left."""
        result = await self._locks.delete_many({"until": {"$lt": now()}, "_id": {"$nin": list(sessions)}})
        return result.deleted_count

    def close(self) -> None:
        for task in list(self._retries):
            task.cancel()
