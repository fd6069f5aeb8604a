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
