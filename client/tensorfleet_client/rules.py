"""What the client accepts from a server before any of it becomes part of a path.

The service's own rules for model names, versions, ids and file names, kept
here rather than imported from the server package: the client is a
distribution of its own, installed without the server. A value from the other side of the socket that breaks
them is a ``ProtocolError`` naming it, raised before anything is written; a
path built from such values is checked again once resolved, so that a write
provably lands in the folder it was meant for.
"""

from __future__ import annotations

import re
import unicodedata
from pathlib import Path

from .errors import ProtocolError

NAME_RULE = "1-100 characters of A-Z, a-z, 0-9, '_', '.' and '-', not only dots"
VERSION_RULE = "vMAJOR.MINOR, for example v2.1"
MODEL_ID_RULE = "24 hexadecimal characters"

_NAME_RE = re.compile(r"[A-Za-z0-9_.-]{1,100}")
_VERSION_RE = re.compile(r"v(0|[1-9]\d{0,5})\.(0|[1-9]\d{0,5})")
_MODEL_ID_RE = re.compile(r"[0-9a-fA-F]{24}")
MAX_FILE_NAME_BYTES = 255


def is_name(value: object) -> bool:
    # "." and ".." are path segments, not names.
    return isinstance(value, str) and _NAME_RE.fullmatch(value) is not None and value.strip(".") != ""


def is_version(value: object) -> bool:
    return isinstance(value, str) and _VERSION_RE.fullmatch(value) is not None


def is_model_id(value: object) -> bool:
    return isinstance(value, str) and _MODEL_ID_RE.fullmatch(value) is not None


def is_file_name(value: object) -> bool:
    """A plain, visible file name: one path component, no control characters, not hidden, at most 255 bytes."""
    if not isinstance(value, str) or not value or value.startswith("."):
        return False
    if "/" in value or "\\" in value or any(ord(c) < 32 or ord(c) == 127 for c in value):
        return False
    try:
        return len(value.encode()) <= MAX_FILE_NAME_BYTES
    except UnicodeEncodeError:  # lone surrogates from undecodable bytes
        return False


def _checked(ok: bool, value: object, source: str, rule: str) -> str:
    if not ok:
        raise ProtocolError(f"the server sent {source} {value!r}, which is not {rule}; nothing was written")
    return value  # type: ignore[return-value]


def name(value: object, source: str) -> str:
    return _checked(is_name(value), value, source, f"a model name ({NAME_RULE})")


def version(value: object, source: str) -> str:
    return _checked(is_version(value), value, source, f"a version ({VERSION_RULE})")


def model_id(value: object, source: str) -> str:
    return _checked(is_model_id(value), value, source, f"a model id ({MODEL_ID_RULE})")


def file_name(value: str | None, name: str, version: str) -> str:
    """The server's file name if it is plain and visible, else ``<name>-<version>`` (both checked already)."""
    if is_file_name(value):
        return value  # type: ignore[return-value]
    return f"{name.lstrip('.')}-{version}"


def inside(folder: Path, entry: str) -> Path:
    """``folder/entry``, resolved, if it is directly in ``folder`` (resolved); else a ProtocolError.

    ``entry`` has passed one of the rules above already; this is the second
    line: whatever the name and whatever symlinks are on the way, the path
    that is written is a direct child of the folder meant.
    """
    base = Path(folder).resolve()
    path = (base / entry).resolve()
    if path.parent != base:
        raise ProtocolError(f"{entry!r} would be written at {path}, outside {base}; nothing was written")
    return path


# -- the paths of a snapshot's files (the service's rules, README "Snapshots") -----

MAX_PATH_BYTES = 1024
MAX_COMPONENT_BYTES = 255
SHA256_RE = re.compile(r"[0-9a-f]{64}")


def path_problem(path: object) -> str | None:
    """Why ``path`` is not a snapshot file's path, or None when it is one.

    Relative, '/'-separated, already NFC; each component non-empty, not '.' or
    '..', without control characters, '\\' or ':', not ending in '.' or ' ', at
    most 255 bytes; the whole at most 1024 bytes.
    """
    if not isinstance(path, str) or not path:
        return "a path must be a non-empty string"
    try:
        size = len(path.encode())
    except UnicodeEncodeError:
        return "a path must be valid UTF-8"
    if size > MAX_PATH_BYTES:
        return f"a path is at most {MAX_PATH_BYTES} bytes"
    if unicodedata.normalize("NFC", path) != path:
        return "a path must be NFC-normalized"
    if path.startswith("/"):
        return "a path must be relative"
    for part in path.split("/"):
        if part == "":
            return "an empty component is not allowed"
        if part in (".", ".."):
            return f'component "{part}" is not allowed'
        if any(ord(c) < 0x20 or ord(c) == 0x7F for c in part):
            return "control characters are not allowed"
        if "\\" in part or ":" in part:
            return "'\\' and ':' are not allowed"
        if part.endswith((".", " ")):
            return f'component "{part}" ends with a dot or a space'
        if len(part.encode()) > MAX_COMPONENT_BYTES:
            return f"a component is at most {MAX_COMPONENT_BYTES} bytes"
    return None


def paths_conflict(paths: list[str]) -> str | None:
    """Why a set of valid paths is not a tree on Linux, macOS and Windows alike, or None.

    No two paths equal ignoring case, and no path that is both a file and a folder.
    """
    seen: dict[str, str] = {}
    for p in paths:
        key = unicodedata.normalize("NFC", p).casefold()
        if key in seen:
            return f'"{seen[key]}" and "{p}" differ only by case or normalization'
        seen[key] = p
    for p in paths:
        parts = p.split("/")
        for i in range(1, len(parts)):
            folder = "/".join(parts[:i]).casefold()
            if folder in seen:
                return f'"{seen[folder]}" is a file and also a folder of "{p}"'
    return None


def within(folder: Path, path: str) -> Path:
    """``folder/path`` for a snapshot path that passed ``path_problem``, if it stays inside ``folder``
    once resolved and no symlink is on the way; else a ProtocolError (the second line, as ``inside``)."""
    base = Path(folder).resolve()
    target = base.joinpath(*path.split("/"))
    if target.resolve() != target or not target.is_relative_to(base) or target == base:
        raise ProtocolError(f"{path!r} would be written at {target.resolve()}, not inside {base}; "
                            "nothing was written")
    return target
