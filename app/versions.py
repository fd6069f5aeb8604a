"""Model version numbers: ``vMAJOR.MINOR``, compared numerically (v1.10 > v1.9)."""

from __future__ import annotations

import re

# The JSON Schema pattern of a version (schemas.Version); fullmatch decides here.
PATTERN = r"^v(0|[1-9]\d{0,5})\.(0|[1-9]\d{0,5})$"
_VERSION_RE = re.compile(PATTERN)

FIRST = "v1.0"


def parse(version: str) -> tuple[int, int] | None:
    m = _VERSION_RE.fullmatch(version) if isinstance(version, str) else None
    return (int(m.group(1)), int(m.group(2))) if m else None


def is_valid(version: str) -> bool:
    return parse(version) is not None


def key(version: str) -> tuple[int, int]:
    parsed = parse(version)
    return parsed if parsed is not None else (-1, -1)


def bump(version: str, breaking: bool) -> str:
    major, minor = key(version)
    return f"v{major + 1}.0" if breaking else f"v{major}.{minor + 1}"
