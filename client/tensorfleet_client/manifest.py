"""A snapshot's list of files, as the service's manifest describes it, checked before any of it is used.

``snapshot_digest`` is the service's definition (README, "Snapshots"), kept
here rather than imported: the client is installed without the server. A test
checks that both compute the same digest.
"""

from __future__ import annotations

import fnmatch
import hashlib
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

from . import rules
from .errors import ProtocolError


@dataclass(frozen=True)
class FileEntry:
    path: str
    size: int
    sha256: str  # hex, lower case

    @property
    def checksum(self) -> str:
        return f"sha256:{self.sha256}"


def snapshot_digest(entries: Iterable[tuple[str, int, str]]) -> str:
    """``sha256:`` of one line ``"<sha256 hex> <size> <path>\\n"`` per file, in the UTF-8 byte order of the paths."""
    h = hashlib.sha256()
    for path, size, sha256 in sorted(entries, key=lambda e: e[0].encode()):
        h.update(f"{sha256} {size} {path}\n".encode())
    return "sha256:" + h.hexdigest()


def digest_of(files: Sequence[FileEntry]) -> str:
    return snapshot_digest((f.path, f.size, f.sha256) for f in files)


@dataclass(frozen=True)
class Manifest:
    model_id: str
    name: str
    version: str
    files: tuple[FileEntry, ...]
    snapshot_digest: str
    etag: str

    @property
    def total_size(self) -> int:
        return sum(f.size for f in self.files)

    @classmethod
    def parse(cls, doc: Any, etag: str | None, source: str) -> "Manifest":
        """The manifest in ``doc`` (from ``source``) if every part of it passes the rules, else ProtocolError."""
        if not isinstance(doc, dict) or not isinstance(doc.get("files"), list):
            raise ProtocolError(f"{source}: the manifest is not an object with a list of files; nothing was written")
        files = []
        for i, f in enumerate(doc["files"]):
            if not isinstance(f, dict):
                raise ProtocolError(f"{source}: files[{i}] is not an object; nothing was written")
            path, size, checksum = f.get("path"), f.get("size_bytes"), f.get("checksum")
            problem = rules.path_problem(path)
            if problem:
                raise ProtocolError(f"{source}: files[{i}].path {path!r}: {problem}; nothing was written")
            if not isinstance(size, int) or isinstance(size, bool) or size < 0:
                raise ProtocolError(f"{source}: files[{i}].size_bytes {size!r} is not a size; nothing was written")
            if not isinstance(checksum, str) or not checksum.startswith("sha256:") \
                    or not rules.SHA256_RE.fullmatch(checksum[7:]):
                raise ProtocolError(f"{source}: files[{i}].checksum {checksum!r} is not sha256:<64 hex>; "
                                    "nothing was written")
            files.append(FileEntry(path, size, checksum[7:]))
        conflict = rules.paths_conflict([f.path for f in files])
        if conflict:
            raise ProtocolError(f"{source}: {conflict}; nothing was written")
        files.sort(key=lambda f: f.path.encode())
        digest = digest_of(files)
        if doc.get("snapshot_digest") != digest:
            raise ProtocolError(f"{source}: snapshot_digest {doc.get('snapshot_digest')!r} is not the digest of "
                                f"its files ({digest}); nothing was written")
        return cls(model_id=rules.model_id(doc.get("id"), "id"), name=rules.name(doc.get("name"), "name"),
                   version=rules.version(doc.get("version"), "version"), files=tuple(files),
                   snapshot_digest=digest, etag=etag or f'"{digest[7:]}"')

    def to_json(self) -> dict:
        return {"id": self.model_id, "name": self.name, "version": self.version, "etag": self.etag,
                "snapshot_digest": self.snapshot_digest,
                "files": [{"path": f.path, "size_bytes": f.size, "checksum": f.checksum} for f in self.files]}

    @classmethod
    def from_cache(cls, doc: Any) -> "Manifest | None":
        """A manifest this client stored, or None if it is not one (then it is fetched anew)."""
        try:
            return cls.parse(doc, doc.get("etag") if isinstance(doc, dict) else None, "cached manifest")
        except ProtocolError:
            return None


def select(files: Sequence[FileEntry], include: Sequence[str] = (), exclude: Sequence[str] = ()) -> list[FileEntry]:
    """The files matching any ``include`` glob (all when none) and no ``exclude`` glob (fnmatch on the whole
    path: ``*`` crosses ``/``)."""
    return [f for f in files
            if (not include or any(fnmatch.fnmatchcase(f.path, g) for g in include))
            and not any(fnmatch.fnmatchcase(f.path, g) for g in exclude)]
