"""Conditional requests (RFC 9110 section 13) for a file with a strong ETag."""

from __future__ import annotations

from datetime import datetime
from email.utils import format_datetime, parsedate_to_datetime

NOT_MODIFIED = 304
PRECONDITION_FAILED = 412


def http_date(t: datetime) -> str:
    return format_datetime(t.replace(microsecond=0), usegmt=True)


def parse_http_date(value: str | None) -> datetime | None:
    if not value:
        return None
    try:
        t = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    return t if t.tzinfo is not None else None


def _tags(header: str) -> list[str]:
    return [t.strip() for t in header.split(",") if t.strip()]


def _opaque(tag: str) -> str:
    return tag[2:] if tag.startswith("W/") else tag


def _strong_match(header: str, etag: str) -> bool:
    return any(t == "*" or (not t.startswith("W/") and t == etag) for t in _tags(header))


def weak_match(header: str, etag: str) -> bool:
    return any(t == "*" or _opaque(t) == etag for t in _tags(header))


def evaluate(headers, etag: str, last_modified: datetime) -> int | None:
    """304 or 412 when a precondition decides the answer, else None.

    Follows the order of RFC 9110 section 13.2.2 for GET and HEAD.
    """
    # Dates compare in whole seconds, the HTTP-date's precision.
    if_match = headers.get("If-Match")
    if if_match is not None:
        if not _strong_match(if_match, etag):
            return PRECONDITION_FAILED
    else:
        since = parse_http_date(headers.get("If-Unmodified-Since"))
        if since is not None and last_modified.replace(microsecond=0) > since:
            return PRECONDITION_FAILED
    if_none_match = headers.get("If-None-Match")
    if if_none_match is not None:
        if weak_match(if_none_match, etag):
            return NOT_MODIFIED
    else:
        since = parse_http_date(headers.get("If-Modified-Since"))
        if since is not None and last_modified.replace(microsecond=0) <= since:
            return NOT_MODIFIED
    return None


def same_second(a: datetime, b: datetime) -> bool:
    """Whether two times have the same HTTP-date (whole seconds)."""
    return a.replace(microsecond=0) == b.replace(microsecond=0)


def if_range_allows(headers, etag: str, last_modified: datetime, date_is_strong: bool = True) -> bool:
    """Whether a Range header may be honoured, given If-Range (section 13.1.5).

    ``date_is_strong``: whether the server knows no other content had the same
    Last-Modified second (section 8.8.2.2); a weak date never matches, and the
    whole representation is sent instead.
    """
    value = headers.get("If-Range")
    if value is None:
        return True
    value = value.strip()
    if value.startswith('"') or value.startswith("W/"):
        return value == etag  # strong comparison; a weak tag never matches
    since = parse_http_date(value)
    return date_is_strong and since is not None and since == last_modified.replace(microsecond=0)
