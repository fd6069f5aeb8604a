"""Storage backends behind one interface; ``make_storage`` picks one from settings."""

from ..config import Settings
from .base import (
    DEFAULT_CHUNK_SIZE,
    DuplicateModel,
    FileMissing,
    FileWriter,
    ModelQuery,
    Storage,
    StorageError,
    StorageUnavailable,
    StoredFile,
)

__all__ = [
    "DEFAULT_CHUNK_SIZE",
    "DuplicateModel",
    "FileMissing",
    "FileWriter",
    "ModelQuery",
    "Storage",
    "StorageError",
    "StorageUnavailable",
    "StoredFile",
    "make_storage",
]


def make_storage(settings: Settings) -> Storage:
    if settings.mongodb_url:
        from .mongo import MongoStorage

        return MongoStorage(settings.mongodb_url, settings.mongodb_db, settings.gridfs_bucket,
                            settings.mongodb_timeout_ms)
    from .embedded import EmbeddedStorage

    return EmbeddedStorage(settings.data_dir)
