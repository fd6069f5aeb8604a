"""Embedded backend specifics: its SQLite schema upgrades in place."""

import sqlite3

from bson import ObjectId

from app import clock
from app.storage.base import ModelQuery
from app.storage.embedded import EmbeddedStorage


async def test_registry_from_before_search_text_is_upgraded(tmp_path):
    store = EmbeddedStorage(str(tmp_path))
    await store.open()
    now = clock.now()
    await store.insert_model({"id": str(ObjectId()), "name": "Churn_Model", "version": "v1.0", "algorithm": "xgboost",
                              "status": "active", "tags": ["Prod"], "description": "Predicts CHURN",
                              "created_at": now, "updated_at": now, "download_count": 0})
    await store.close()
    with sqlite3.connect(tmp_path / "registry.sqlite3") as db:  # as an older release left it
        db.execute("ALTER TABLE models DROP COLUMN search_text")

    store = EmbeddedStorage(str(tmp_path))
    await store.open()
    try:
        for text in ("churn_model", "PREDICTS", "prod", "XGB"):
            _, total = await store.find_models(ModelQuery(text=text))
            assert total == 1, text
        _, total = await store.find_models(ModelQuery(text="nothing"))
        assert total == 0
    finally:
        await store.close()
