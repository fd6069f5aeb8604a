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
from collections.abc import Awaitable, Callable, Hashable
from types import MappingProxyType
from typing import Any, TypeVar

from .storage.base import Storage

T = TypeVar("T")

# Get-by-id bodies of a few KB each and listing pages of tens of KB: a few MB at most.
MAX_ENTRIES = 4096


class ReadCache:
    def __init__(self, storage: Storage, max_entries: int = MAX_ENTRIES) -> None:
        self._storage = storage
        self._max = max_entries
        self._entries: OrderedDict[Hashable, tuple[Hashable, Any]] = OrderedDict()

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
        entries[key] = (stamp, value)
        entries.move_to_end(key)
        if len(entries) > self._max:
            entries.popitem(last=False)
        return value

    def __len__(self) -> int:
        return len(self._entries)


def freeze(value: Any) -> Any:
    """A read-only copy of a document: mappings become MappingProxyType, lists tuples, all the way down."""
    if isinstance(value, dict):
        return MappingProxyType({k: freeze(v) for k, v in value.items()})
    if isinstance(value, list):
        return tuple(freeze(v) for v in value)
    return value
