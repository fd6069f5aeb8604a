"""``model-service cleanup`` and ``model-service gc`` as real commands, on both backends."""

import asyncio
import os
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

from bson import ObjectId

from app import clock, registry
from app.storage import ModelQuery
from testkit.mongo_server import REPO


def command_env(settings) -> dict:
    env = {**os.environ, "DATA_DIR": settings.data_dir}
    if settings.mongodb_url:
        env.update(MONGODB_URL=settings.mongodb_url, MONGODB_DB=settings.mongodb_db)
    else:
        env["MONGODB_URL"] = ""
    return env


async def model_service(settings, *args) -> subprocess.CompletedProcess:
    return await asyncio.to_thread(
        subprocess.run, [sys.executable, "-m", "app", *args], cwd=REPO, env=command_env(settings),
        capture_output=True, text=True, timeout=120,
    )


async def add_model(storage, name, status, age_days, data: bytes | None = None):
    doc = registry.model_document({"name": name, "algorithm": "a", "status": status}, "v1.0",
                                  created_at=clock.now() - timedelta(days=age_days))
    if data is not None:
        async with storage.file_writer() as w:
            await w.write(data)
            stored = await w.commit()
        doc["file_metadata"] = {"file_id": stored.file_id, "filename": f"{name}.bin", "size_bytes": stored.size,
                                "checksum": f"sha256:{stored.sha256}", "format": "bin",
                                "content_type": "application/octet-stream", "chunk_size": stored.chunk_size,
                                "uploaded_at": stored.uploaded_at}
        await storage.insert_model(doc)
        await storage.settle_file(stored.file_id)
    else:
        await storage.insert_model(doc)
    return doc


async def names(storage):
    docs, _ = await storage.find_models(ModelQuery(limit=100))
    return sorted(d["name"] for d in docs)


async def test_cleanup_deletes_old_models_of_a_status(storage, settings):
    shared = os.urandom(3000)
    await add_model(storage, "old-archived", "archived", 120, shared)
    await add_model(storage, "old-archived-2", "archived", 100)
    await add_model(storage, "new-archived", "archived", 10)
    await add_model(storage, "old-active", "active", 200, shared)  # shares the file: it must stay

    proc = await model_service(settings, "cleanup", "--status", "archived", "--older-than", "90d", "--dry-run")
    assert proc.returncode == 0, proc.stderr
    assert "would delete 2 model(s)" in proc.stdout
    assert "old-archived " in proc.stdout and "old-archived-2" in proc.stdout and "new-archived" not in proc.stdout
    assert len(await names(storage)) == 4

    proc = await model_service(settings, "cleanup", "--status", "archived", "--older-than", "90d")
    assert proc.returncode == 0, proc.stderr
    assert "deleted 2 model(s)" in proc.stdout
    assert await names(storage) == ["new-archived", "old-active"]
    stats = await storage.statistics(clock.now(), clock.now())
    assert stats.stored_bytes == 3000  # still used by old-active

    proc = await model_service(settings, "cleanup", "--status", "archived", "--older-than", "soon")
    assert proc.returncode == 2 and "not an age" in proc.stderr


async def test_gc_removes_leftovers_but_not_uploads_in_progress(storage, settings):
    keep = await add_model(storage, "kept", "active", 1, os.urandom(2000))
    two_hours_ago = clock.now() - timedelta(hours=2)

    # Committed content that no model refers to (its model's delete never released it).
    async with storage.file_writer() as w:
        await w.write(os.urandom(4000))
        orphan = await w.commit()
    await storage.settle_file(orphan.file_id)
    # An upload in progress: written, not committed, fresh.
    running = storage.file_writer()
    await running.write(os.urandom(5 * 1024 * 1024))
    await running.flush()  # its bytes are in the store
    if storage.kind == "mongodb":
        await storage.files.update_one({"_id": ObjectId(orphan.file_id)}, {"$set": {"uploadDate": two_hours_ago}})
        # Chunks of an upload that died two hours ago.
        dead = ObjectId.from_datetime(two_hours_ago)
        for n in range(3):
            oid = ObjectId(ObjectId.from_datetime(two_hours_ago).binary[:4] + os.urandom(8))
            await storage.chunks.insert_one({"_id": oid, "files_id": dead, "n": n, "data": b"x" * 10})
    else:
        iso_old = clock.iso(two_hours_ago)
        await storage._run(lambda: storage._db.execute("UPDATE files SET uploaded_at = ? WHERE file_id = ?",
                                                       (iso_old, orphan.file_id)))
        old_tmp = Path(storage.tmp_dir) / "crashed.part"
        old_tmp.write_bytes(b"half an upload")
        os.utime(old_tmp, (time.time() - 7200, time.time() - 7200))

    proc = await model_service(settings, "gc", "--dry-run")
    assert proc.returncode == 0, proc.stderr
    assert "would remove 2 item(s)" in proc.stdout, proc.stdout
    assert orphan.file_id in proc.stdout
    assert await storage.file_info(orphan.file_id) is not None

    proc = await model_service(settings, "gc")
    assert proc.returncode == 0, proc.stderr
    assert "removed 2 item(s)" in proc.stdout, proc.stdout
    assert await storage.file_info(orphan.file_id) is None
    # What a model uses, and the upload still being written, are untouched.
    assert await storage.file_info(keep["file_metadata"]["file_id"]) is not None
    await running.write(b"more")
    finished = await running.commit()
    assert finished.size == 5 * 1024 * 1024 + 4
    await storage.settle_file(finished.file_id)
    if storage.kind == "mongodb":
        assert await storage.chunks.count_documents({"files_id": dead}) == 0
    else:
        assert not old_tmp.exists()
