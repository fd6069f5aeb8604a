"""What model reads answered, kept in-process while the store says nothing changed since.

Each entry keeps the store's read stamp (``Storage.read_stamp``) read just
BEFORE its value was computed, and is used only while the stamp is still the
same: any change to a model, by this process, another worker or process
sharing the store, or anything else writing to it, moves the stamp, and every
entry older than it misses. A value read after its stamp is at least as new
as the stamp, so an entry whose stamp is current is the current answer.
Stores without a cheap stamp (MongoDB: None) keep nothing.

Values are shared by every request that hits them: bytes, tuples of them, or
documents frozen with ``freeze``, never a dict some handler could change.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Awaitable, Callable, Hashable, Mapping
from types import MappingProxyType
from typing import Any, TypeVar

from .http.json import Tagged
from .storage.base import Storage

T = TypeVar("T")

# Bounded in entries and in (estimated) bytes: a listing page of MAX_PAGE_SIZE
# models is tens of KB, a snapshot's body or document with MAX_FILES_PER_VERSION
# files some MB; none may make the process grow with what clients ask for.
MAX_ENTRIES = 4096
MAX_BYTES = 64 * 1024 * 1024


class ReadCache:
    def __init__(self, storage: Storage, max_entries: int = MAX_ENTRIES, max_bytes: int = MAX_BYTES) -> None:
        self._storage = storage
        self._max = max_entries
        self._max_bytes = max_bytes
        self._bytes = 0
        self._entries: OrderedDict[Hashable, tuple[Hashable, Any, int]] = OrderedDict()

    async def get(self, key: Hashable, compute: Callable[[], Awaitable[T]], *, counts: bool = True) -> T:
        """``compute()``'s answer for ``key``, from the cache while the stamp is unchanged.

        ``counts=False`` for values that never show download counts: they
        then survive downloads being counted. An exception in ``compute``
        (a 404) leaves nothing behind.
        """
        stamp = self._storage.read_stamp(counts)
        if stamp is None:
            return await compute()
        entries = self._entries
        hit = entries.get(key)
        if hit is not None and hit[0] == stamp:
            entries.move_to_end(key)
            return hit[1]
        value = await compute()
        old = entries.pop(key, None)
        if old is not None:
            self._bytes -= old[2]
        # The key too: a listing's names its search text, as long as a URL allows.
        size = weight(value) + len(repr(key))
        if size > self._max_bytes // 16:
            return value  # computed each time rather than evict many others
        entries[key] = (stamp, value, size)
        self._bytes += size
        while len(entries) > self._max or self._bytes > self._max_bytes:
            self._bytes -= entries.popitem(last=False)[1][2]
        return value

    def __len__(self) -> int:
        return len(self._entries)


def weight(value: Any) -> int:
    """About how many bytes a value holds: exact for bodies, an estimate for documents."""
    if isinstance(value, Tagged):
        return len(value.body) + 64
    if isinstance(value, (bytes, bytearray)):
        return len(value)
    if isinstance(value, Mapping):
        return 2048 + 1024 * len(value.get("files") or ())
    if isinstance(value, tuple):
        return 64 + sum(map(weight, value))
    return 64


def freeze(value: Any) -> Any:
    """A read-only copy of a document: mappings become MappingProxyType, lists tuples, all the way down."""
    if isinstance(value, dict):
        return MappingProxyType({k: freeze(v) for k, v in value.items()})
    if isinstance(value, list):
        return tuple(freeze(v) for v in value)
    return value
