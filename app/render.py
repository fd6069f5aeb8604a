"""How stored model documents look on the wire: the answers of ``schemas``."""

from __future__ import annotations

from . import snapshots
from .clock import iso
from .config import format_size
from .schemas import FileEntry, FileMetadata, Model, ModelSummary
from .storage.base import ModelDocument, StoredFileMetadata
from .urls import download_url

# Stored in file_metadata when the model's previous file was uploaded in the
# same second: its Last-Modified then names two contents (see downloads).
# Bookkeeping for the download validators, not shown.
LAST_MODIFIED_SHARED = "last_modified_shared"


def file_metadata(fm: StoredFileMetadata) -> FileMetadata:
    return FileMetadata(
        file_id=fm["file_id"],
        filename=fm["filename"],
        size_bytes=fm["size_bytes"],
        checksum=fm["checksum"],
        format=fm["format"],
        content_type=fm["content_type"],
        chunk_size=fm["chunk_size"],
        uploaded_at=iso(fm["uploaded_at"]),
    )


def full(doc: ModelDocument) -> Model:
    model = Model(
        id=doc["id"],
        name=doc["name"],
        version=doc["version"],
        algorithm=doc["algorithm"],
        status=doc["status"],
        description=doc.get("description"),
        hyperparameters=doc.get("hyperparameters", {}),
        metrics=doc.get("metrics", {}),
        dataset_info=doc.get("dataset_info", {}),
        tags=doc.get("tags", []),
        format=doc.get("format"),
        parent_model_id=doc.get("parent_model_id"),
        created_by=doc.get("created_by"),
        created_at=iso(doc["created_at"]),
        updated_at=iso(doc["updated_at"]),
        download_count=doc.get("download_count", 0),
        download_url=download_url(doc["id"]),
    )
    fm = doc.get("file_metadata")
    if fm:
        model.file_metadata = file_metadata(fm)
        model.model_size = format_size(fm["size_bytes"])
    found = snapshots.entries(doc)
    if found:
        model.files = files(found)
        model.snapshot_digest = snapshots.digest_of(doc)
        model.total_size_bytes = snapshots.total_size(doc)
    return model


def files(found: list[snapshots.Entry]) -> list[FileEntry]:
    """A version's files as the API shows them: without the internal file_id and chunk_size."""
    return [FileEntry(path=e["path"], size_bytes=e["size_bytes"], checksum=e["checksum"],
                      content_type=e["content_type"]) for e in found]


def summary(doc: ModelDocument) -> ModelSummary:
    answer = _summary(doc)
    count = snapshots.file_count(doc)
    if count:
        answer.file_count = count
        answer.snapshot_digest = snapshots.digest_of(doc)
    return answer


def _summary(doc: ModelDocument) -> ModelSummary:
    return ModelSummary(
        id=doc["id"],
        name=doc["name"],
        version=doc["version"],
        algorithm=doc["algorithm"],
        status=doc["status"],
        tags=doc.get("tags", []),
        metrics=doc.get("metrics", {}),
        created_by=doc.get("created_by"),
        created_at=iso(doc["created_at"]),
        download_count=doc.get("download_count", 0),
        size_bytes=snapshots.total_size(doc),
    )
