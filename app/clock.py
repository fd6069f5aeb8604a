"""UTC timestamps at millisecond precision, the precision BSON dates keep.

Truncating at creation makes both backends return identical timestamps.
"""

from datetime import datetime, timezone


def now() -> datetime:
    t = datetime.now(timezone.utc)
    return t.replace(microsecond=t.microsecond // 1000 * 1000)


def iso(t: datetime) -> str:
    """ISO-8601 UTC with milliseconds and a ``Z``: 2026-11-27T05:18:36.123Z."""
    # isoformat() and fromisoformat() are C; strftime/strptime cost a tenth of
    # a get-by-id (bench/, py-spy), which formats and parses several per model.
    return t.astimezone(timezone.utc).replace(tzinfo=None).isoformat(timespec="milliseconds") + "Z"


def parse_iso(text: str) -> datetime:
    """The inverse of iso() (only what iso() writes is ever parsed)."""
    return datetime.fromisoformat(text)
