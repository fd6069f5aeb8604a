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

    async def acquire(self, session_id: ObjectId) -> str:
        """A new lock's token; SessionBusy while another holder's lock is live."""
        token = secrets.token_hex(16)
        for _ in range(_ATTEMPTS):
            try:
                await self._locks.insert_one({"_id": session_id, "token": token, "until": now() + SESSION_LOCK_TTL})
                return token
            except DuplicateKeyError:
                held = await self._locks.find_one({"_id": session_id})
                if held is not None and held["until"] > now():
                    raise SessionBusy(f"upload session {session_id} is being written") from None
                if held is not None:
                    # Only that expired lock: a holder that took over meanwhile keeps its own.
                    await self._locks.delete_one({"_id": session_id, "token": held["token"]})
        raise SessionBusy(f"upload session {session_id} is being written")

    async def renew(self, session_id: ObjectId, token: str) -> bool:
        """Extend our lock; False if we no longer hold it (it lapsed and another request took it)."""
        result = await self._locks.update_one({"_id": session_id, "token": token},
                                              {"$set": {"until": now() + SESSION_LOCK_TTL}})
        return result.matched_count == 1

    async def release(self, session_id: ObjectId, token: str) -> None:
        """Give our lock up; never raises (a lock left behind lapses by itself)."""
        try:
            await self._locks.delete_one({"_id": session_id, "token": token})
        except PyMongoError as e:
            log.info("could not release the lock of upload session %s: %s", session_id, e.__class__.__name__)
