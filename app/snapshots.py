"""Multi-file versions (snapshots): the path rules, the snapshot digest, and a version's files.

A version holds its content in one of two shapes (SNAPSHOT_CONTRACT.md):

- made by ``/upload``: ``file_metadata`` as always, and no stored ``files``;
  its one entry is derived from ``file_metadata`` (``path`` = its filename);
- made by a commit: stored ``files`` (each entry with the internal
  ``file_id`` and ``chunk_size`` of the content it reads from),
  ``snapshot_digest`` and ``total_size_bytes``, and no ``file_metadata``.

``entries(doc)`` answers both alike, so callers never ask which shape a
version has. The path rules keep a snapshot a tree that unpacks the same on
Linux, macOS and Windows; the client checks paths from the server again with
its own copy of these rules (``snapshot_digest`` has a twin there too, and a
test checks they agree).
"""

from __future__ import annotations

import bisect
import hashlib
import mimetypes
import unicodedata
from collections.abc import Iterable, Mapping
from typing import Any, TypedDict

from . import errors
from .errors import ApiError
from .storage.base import ModelDocument, StoredFile

# The stored fields of a committed snapshot: set together by a commit, removed
# together when an /upload turns the version into a single-file one.
SNAPSHOT_FIELDS = ("files", "snapshot_digest", "total_size_bytes")

MAX_COMPONENT_BYTES = 255
MAX_PATH_BYTES = 1024
DEFAULT_CONTENT_TYPE = "application/octet-stream"
# A commit's JSON body may exceed MAX_JSON_SIZE by this much per file
# MAX_FILES_PER_VERSION allows: a typical entry ({"path": 40 bytes, "checksum",
# "size_bytes"}) takes about 130. Kept small, as the body is read whole before
# it is parsed: 16 never-ending bodies must not hold much memory (1.6 MB each
# beyond MAX_JSON_SIZE at the default 10,000 files).
BODY_ALLOWANCE_PER_FILE = 160


class Entry(TypedDict, total=False):
    """A file of a version as storage keeps it; the API shows all but file_id and chunk_size."""

    path: str
    size_bytes: int
    checksum: str  # "sha256:<hex>"
    content_type: str
    file_id: str
    chunk_size: int


def path_problem(path: str) -> str | None:
    """Why ``path`` is not a valid snapshot path (the rule it breaks), or None."""
    if path == "":
        return "must not be empty"
    if path.startswith("/"):
        return "must be relative (no leading '/')"
    try:
        encoded = path.encode("utf-8")
    except UnicodeEncodeError:
        return "must be valid UTF-8"
    if len(encoded) > MAX_PATH_BYTES:
        return f"must be at most {MAX_PATH_BYTES} bytes of UTF-8, is {len(encoded)}"
    if unicodedata.normalize("NFC", path) != path:
        return "must be NFC-normalized Unicode"
    for component in path.split("/"):
        if component == "":
            return "has an empty component ('//' or a trailing '/')"
        if component in (".", ".."):
            return f'component "{component}" is not allowed'
        if any(ord(c) < 0x20 or ord(c) == 0x7F for c in component):
            return "must not contain control characters"
        if "\\" in component:
            return "must not contain '\\'"
        if ":" in component:
            return "must not contain ':'"
        if component.endswith((".", " ")):
            return f'component "{component}" must not end with a dot or a space'
        if len(component.encode("utf-8")) > MAX_COMPONENT_BYTES:
            return f"each component must be at most {MAX_COMPONENT_BYTES} bytes of UTF-8"
    return None


def _shown(path: str) -> str:
    # A refused path is quoted back readably, never as raw control characters.
    text = path if len(path) <= 200 else path[:200] + "..."
    return text.encode("unicode_escape").decode("ascii") if not text.isprintable() else text


def check_paths(paths: list[str], max_files: int) -> None:
    """The rules for one version's set of paths; raises 400 invalid_path / path_conflict / validation_error."""
    if not paths:
        raise ApiError(errors.VALIDATION_ERROR, "files: must list at least one file")
    if len(paths) > max_files:
        raise ApiError(errors.VALIDATION_ERROR,
                       f"files: at most {max_files} files per version (MAX_FILES_PER_VERSION), got {len(paths)}")
    for i, path in enumerate(paths):
        if (problem := path_problem(path)) is not None:
            raise ApiError(errors.INVALID_PATH, f'files[{i}].path "{_shown(path)}": {problem}')
    # Case-insensitive file systems (macOS, Windows) see casefold()-equal paths as one.
    folded: dict[str, int] = {}
    for i, path in enumerate(paths):
        key = path.casefold()
        if key in folded:
            j = folded[key]
            same = "the same path" if paths[j] == path else "the same path on a case-insensitive file system"
            raise ApiError(errors.PATH_CONFLICT,
                           f'files[{i}].path "{_shown(path)}" and files[{j}].path "{_shown(paths[j])}" are {same}')
        folded[key] = i
    for i, path in enumerate(paths):
        parts = path.casefold().split("/")
        for depth in range(1, len(parts)):
            folder = "/".join(parts[:depth])
            if folder in folded:
                j = folded[folder]
                raise ApiError(errors.PATH_CONFLICT,
                               f'files[{j}].path "{_shown(paths[j])}" is a file, and a folder of '
                               f'files[{i}].path "{_shown(path)}"')


def content_type_for(path: str) -> str:
    return mimetypes.guess_type(path, strict=False)[0] or DEFAULT_CONTENT_TYPE


def _path_key(entry: Mapping[str, Any]) -> bytes:
    return entry["path"].encode("utf-8")


def sort_entries(items: Iterable[Entry]) -> list[Entry]:
    """Entries in path order: by the paths' UTF-8 bytes (which is also code point order)."""
    return sorted(items, key=_path_key)


def snapshot_digest(items: Iterable[Mapping[str, Any]]) -> str:
    """``sha256:`` of one ``"<sha256 hex> <size> <path>\\n"`` line per file, in path order (README)."""
    h = hashlib.sha256()
    for e in sorted(items, key=_path_key):
        h.update(f"{e['checksum'].removeprefix('sha256:')} {e['size_bytes']} {e['path']}\n".encode("utf-8"))
    return "sha256:" + h.hexdigest()


def entries(doc: ModelDocument) -> list[Entry]:
    """The version's files in path order, with their internal file_id; empty when it has no content."""
    if doc.get("files"):
        return list(doc["files"])
    fm = doc.get("file_metadata")
    if not fm:
        return []
    return [Entry(path=fm["filename"], size_bytes=fm["size_bytes"], checksum=fm["checksum"],
                  content_type=fm["content_type"], file_id=fm["file_id"], chunk_size=fm["chunk_size"])]


def file_count(doc: ModelDocument) -> int:
    """How many files the version has (``entries`` without building them): 0 with no content yet."""
    if doc.get("files"):
        return len(doc["files"])
    return 1 if doc.get("file_metadata") else 0


def is_snapshot(doc: ModelDocument) -> bool:
    """Made by a commit (stored ``files``), as opposed to an /upload or no content yet."""
    return bool(doc.get("files"))


def digest_of(doc: ModelDocument) -> str | None:
    if doc.get("snapshot_digest"):
        return doc["snapshot_digest"]
    found = entries(doc)
    return snapshot_digest(found) if found else None


def total_size(doc: ModelDocument) -> int | None:
    """The sum of the version's file sizes; None when it has no content."""
    if doc.get("total_size_bytes") is not None:
        return doc["total_size_bytes"]
    fm = doc.get("file_metadata")
    return fm["size_bytes"] if fm else None


def file_ids(doc: ModelDocument) -> list[str]:
    """Every stored content the version refers to, each once."""
    return list(dict.fromkeys(e["file_id"] for e in entries(doc)))


def stored_file(doc: ModelDocument, entry: Entry) -> StoredFile:
    """The stored content an entry reads from, for Storage.read_file.

    Its uploaded_at (Last-Modified) is the version's creation for a committed
    snapshot, whose files never change; the upload's time for a single file.
    """
    fm = doc.get("file_metadata")
    uploaded_at = fm["uploaded_at"] if fm and not doc.get("files") else doc["created_at"]
    return StoredFile(entry["file_id"], entry["size_bytes"], entry["checksum"].removeprefix("sha256:"),
                      entry["chunk_size"], uploaded_at)


def find(doc: ModelDocument, path: str) -> Entry | None:
    """The entry with exactly this path, or None (a binary search: entries are in path order)."""
    found = entries(doc)
    key = path.encode("utf-8", "surrogatepass")
    i = bisect.bisect_left(found, key, key=_path_key)
    return found[i] if i < len(found) and found[i]["path"] == path else None
