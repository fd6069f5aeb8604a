"""How stored model documents look on the wire."""

from __future__ import annotations

from typing import Any

from .clock import iso
from .config import format_size
from .urls import download_url

# Stored in file_metadata when the model's previous file was uploaded in the
# same second: its Last-Modified then names two contents (see downloads).
# Bookkeeping for the download validators, not shown.
LAST_MODIFIED_SHARED = "last_modified_shared"


def file_metadata(fm: dict[str, Any]) -> dict[str, Any]:
    shown = {k: v for k, v in fm.items() if k != LAST_MODIFIED_SHARED}
    return {**shown, "uploaded_at": iso(fm["uploaded_at"])}


def full(doc: dict[str, Any]) -> dict[str, Any]:
    out = {
        "id": doc["id"],
        "name": doc["name"],
        "version": doc["version"],
        "algorithm": doc["algorithm"],
        "status": doc["status"],
        "description": doc.get("description"),
        "hyperparameters": doc.get("hyperparameters", {}),
        "metrics": doc.get("metrics", {}),
        "dataset_info": doc.get("dataset_info", {}),
        "tags": doc.get("tags", []),
        "format": doc.get("format"),
        "parent_model_id": doc.get("parent_model_id"),
        "created_by": doc.get("created_by"),
        "created_at": iso(doc["created_at"]),
        "updated_at": iso(doc["updated_at"]),
        "download_count": doc.get("download_count", 0),
        "download_url": download_url(doc["id"]),
    }
    fm = doc.get("file_metadata")
    if fm:
        out["file_metadata"] = file_metadata(fm)
        out["model_size"] = format_size(fm["size_bytes"])
    return out


def summary(doc: dict[str, Any]) -> dict[str, Any]:
    out = {
        "id": doc["id"],
        "name": doc["name"],
        "version": doc["version"],
        "algorithm": doc["algorithm"],
        "status": doc["status"],
        "tags": doc.get("tags", []),
        "metrics": doc.get("metrics", {}),
        "created_by": doc.get("created_by"),
        "created_at": iso(doc["created_at"]),
        "download_count": doc.get("download_count", 0),
    }
    fm = doc.get("file_metadata")
    out["size_bytes"] = fm["size_bytes"] if fm else None
    return out
