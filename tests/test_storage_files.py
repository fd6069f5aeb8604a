"""The file half of the storage interface, on both backends, below HTTP.

A writer is invisible until commit and leaves nothing after cancel; a reader
starts at any offset; identical content is stored once and released only when
no model refers to it.
"""

import asyncio
import contextlib
import hashlib
import os
import threading
from pathlib import Path

import pytest
from bson import ObjectId

from app.storage import DEFAULT_CHUNK_SIZE, FileMissing, pipeline
from tests.transfer_helpers import leftovers


async def store(storage, data: bytes, piece: int = 100_000, settle: bool = True):
    async with storage.file_writer() as w:
        for i in range(0, len(data), piece):
            await w.write(data[i:i + piece])
        stored = await w.commit()
    if settle:
        await storage.settle_file(stored.file_id)
    return stored


async def read_all(storage, stored, offset=0, length=None) -> bytes:
    return b"".join([p async for p in storage.read_file(stored, offset, length)])


CS = DEFAULT_CHUNK_SIZE


@pytest.mark.parametrize("size", [0, 1, CS - 1, CS, CS + 1, 3 * CS + 17])
async def test_round_trip(storage, size):
    data = os.urandom(size)
    stored = await store(storage, data)
    assert stored.size == size
    assert stored.sha256 == hashlib.sha256(data).hexdigest()
    assert stored.chunk_size == CS
    assert len(stored.file_id) == 24
    assert await read_all(storage, stored) == data
    info = await storage.file_info(stored.file_id)
    assert info == stored


async def test_reader_starts_at_any_offset(storage):
    data = os.urandom(4 * CS + 1000)
    stored = await store(storage, data)
    for offset, length in [(0, 1), (CS - 1, 2), (CS, CS), (CS + 1, None), (2 * CS - 5, CS + 10),
                           (len(data) - 1, None), (len(data) - 1, 50), (17, 3 * CS), (len(data), None)]:
        expected = data[offset:] if length is None else data[offset:offset + length]
        assert await read_all(storage, stored, offset, length) == expected, (offset, length)


async def test_uncommitted_writes_are_invisible_and_cancel_leaves_nothing(storage):
    before = await leftovers(storage)
    writer = storage.file_writer()
    await writer.write(os.urandom(3 * CS))  # enough for chunks to reach the database
    # Nothing readable exists yet: no file id has been handed out and no files document exists.
    if storage.kind == "mongodb":
        assert await storage.files.count_documents({}) == before["files"]
    await writer.cancel()
    await writer.cancel()  # idempotent
    assert await leftovers(storage) == before


async def test_error_inside_writer_block_cancels(storage):
    before = await leftovers(storage)
    with pytest.raises(RuntimeError, match="client went away"):
        async with storage.file_writer() as w:
            await w.write(os.urandom(2 * CS + 5))
            raise RuntimeError("client went away")
    assert await leftovers(storage) == before


async def test_writer_cancelled_mid_write_leaves_nothing(storage):
    """The request task is cancelled (the client left) while a write is under way.

    On MongoDB that write may be a batch insert the server has already
    received: the clean-up must not delete before that insert has landed.
    """
    before = await leftovers(storage)
    data = os.urandom(32 * CS)  # more than a MongoDB write batch
    for delay in (0, 0.001, 0.002, 0.005, 0.01, 0.02):
        writer = storage.file_writer()
        task = asyncio.ensure_future(writer.write(data))
        await asyncio.sleep(delay)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await writer.cancel()
        assert await leftovers(storage) == before
    # A write the store received before the cancel would land late, if at all:
    # give it time to show up.
    await asyncio.sleep(1)
    assert await leftovers(storage) == before


class _RecordingHash:
    """A sha256 that notes which threads fed it."""

    def __init__(self) -> None:
        self.real, self.threads = hashlib.sha256(), set()

    def update(self, piece) -> None:
        self.threads.add(threading.get_ident())
        self.real.update(piece)

    def hexdigest(self) -> str:
        return self.real.hexdigest()


async def test_bytes_are_hashed_beside_the_event_loop_not_on_it(storage):
    """sha256 runs in threads (hashlib releases the GIL) while the loop goes on receiving;
    sha256 is refused while bytes are still on their way through, and right after flush()."""
    data = os.urandom(2 * pipeline.BATCH + 12_345)
    recording = _RecordingHash()
    async with storage.file_writer() as w:
        w._hash = recording
        for i in range(0, len(data), 100_000):
            await w.write(data[i:i + 100_000])
        assert w.size == len(data)
        with pytest.raises(RuntimeError, match="flush"):
            w.sha256
        await w.flush()
        assert w.sha256 == hashlib.sha256(data).hexdigest()
        stored = await w.commit()
    await storage.settle_file(stored.file_id)
    assert recording.threads and threading.get_ident() not in recording.threads
    assert await read_all(storage, stored) == data


async def test_identical_content_is_stored_once(storage):
    data = os.urandom(CS + 3)
    a = await store(storage, data)
    b = await store(storage, data, piece=7777)
    assert a.file_id == b.file_id
    if storage.kind == "mongodb":
        assert await storage.files.count_documents({}) == 1
        assert await storage.chunks.count_documents({}) == 2
    else:
        assert len((await leftovers(storage))["blobs"]) == 1
        assert (await leftovers(storage))["tmp"] == []


async def test_release_keeps_referenced_content(storage):
    data = os.urandom(1000)
    stored = await store(storage, data)
    now = stored.uploaded_at
    doc = {
        "id": str(ObjectId()), "name": "m", "version": "v1.0", "algorithm": "a", "status": "active",
        "hyperparameters": {}, "metrics": {}, "dataset_info": {}, "tags": [], "created_at": now, "updated_at": now,
        "download_count": 0,
        "file_metadata": {"file_id": stored.file_id, "filename": "m.bin", "size_bytes": 1000,
                          "checksum": "sha256:" + stored.sha256, "uploaded_at": now},
    }
    await storage.insert_model(doc)
    assert await storage.release_file(stored.file_id) is False
    assert await read_all(storage, stored) == data
    await storage.delete_model(doc["id"])
    assert await storage.release_file(stored.file_id) is True
    assert await storage.file_info(stored.file_id) is None
    with pytest.raises(FileMissing):
        await read_all(storage, stored)
    leftover = await leftovers(storage)
    assert leftover.get("chunks", 0) == 0 and leftover.get("blobs", []) == []


async def test_missing_content_raises(storage):
    stored = await store(storage, os.urandom(CS + 1))
    # Remove the content behind the store's back, as a crash or an operator might.
    if storage.kind == "mongodb":
        await storage.chunks.delete_many({"n": 1})
    else:
        Path(storage.blob_path(stored.sha256)).write_bytes(b"short")
    with pytest.raises(FileMissing):
        await read_all(storage, stored)


@pytest.mark.parametrize("backend", ["mongodb"])
async def test_written_file_readable_by_pymongo_gridfs(storage):
    from gridfs import AsyncGridFSBucket

    data = os.urandom(2 * CS + 99)
    stored = await store(storage, data)
    bucket = AsyncGridFSBucket(storage.db, bucket_name="models")
    stream = await bucket.open_download_stream(ObjectId(stored.file_id))
    assert await stream.read() == data


async def test_claimed_content_survives_a_release_until_settled(storage):
    """A commit's claim protects content that no model refers to yet."""
    data = os.urandom(1000)
    first = await store(storage, data)
    second = await store(storage, data, settle=False)  # deduplicated onto the first, and claimed
    assert second.file_id == first.file_id
    assert await storage.release_file(first.file_id) is False
    assert await read_all(storage, first) == data
    await storage.settle_file(first.file_id)
    # The release the claim held back was remembered: dropping the claim completed it.
    assert await storage.file_info(first.file_id) is None
    assert await storage.release_file(first.file_id) is False
    with pytest.raises(FileMissing):
        await read_all(storage, first)
