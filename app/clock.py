"""UTC timestamps at millisecond precision, the precision BSON dates keep.

Truncating at creation makes both backends return identical timestamps.
"""

from datetime import datetime, timezone


def now() -> datetime:
    t = datetime.now(timezone.utc)
    return t.replace(microsecond=t.microsecond // 1000 * 1000)


def iso(t: datetime) -> str:
    """ISO-8601 UTC with milliseconds and a ``Z``: 2026-11-27T05:18:36.123Z."""
    return t.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def parse_iso(text: str) -> datetime:
    return datetime.strptime(text, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=timezone.utc)
