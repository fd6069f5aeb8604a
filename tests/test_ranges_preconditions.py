"""Range parsing and precondition evaluation, as pure functions (RFC 9110)."""

from datetime import datetime, timedelta, timezone

import pytest

from app.http import preconditions, ranges
from app.http.ranges import ByteRange

SIZE = 1000


@pytest.mark.parametrize(
    "header, expected",
    [
        ("bytes=0-0", [ByteRange(0, 0)]),
        ("bytes=0-499", [ByteRange(0, 499)]),
        ("bytes=500-", [ByteRange(500, 999)]),
        ("bytes=-200", [ByteRange(800, 999)]),
        ("bytes=-5000", [ByteRange(0, 999)]),
        ("bytes=990-5000", [ByteRange(990, 999)]),
        ("BYTES = 1-2", [ByteRange(1, 2)]),
        ("bytes=0-9, 20-29", [ByteRange(0, 9), ByteRange(20, 29)]),
        ("bytes=20-29,0-9", [ByteRange(20, 29), ByteRange(0, 9)]),
        ("bytes=0-9,5-14", [ByteRange(0, 14)]),  # overlapping: coalesced
        ("bytes=0-9,10-19", [ByteRange(0, 19)]),  # adjacent: coalesced
        ("bytes=0-1,4-5,2-3", [ByteRange(0, 5)]),  # a later range joins two earlier ones
        ("bytes=0-9,11-19", [ByteRange(0, 9), ByteRange(11, 19)]),  # a one-byte gap: kept apart
        ("bytes=11-19,0-9", [ByteRange(11, 19), ByteRange(0, 9)]),
        ("bytes=0-1,2000-3000", [ByteRange(0, 1)]),  # the unsatisfiable one is dropped
        ("bytes=0-1,,5-6", [ByteRange(0, 1), ByteRange(5, 6)]),
    ],
)
def test_parse(header, expected):
    assert ranges.parse(header, SIZE) == expected


@pytest.mark.parametrize("header", [None, "", "bytes", "items=0-1", "bytes=a-b", "bytes=5-1", "bytes=-",
                                    "bytes=1-2-3", "bytes=,", "bytes=0x10-20", "bytes=--5"])
def test_malformed_is_ignored(header):
    assert ranges.parse(header, SIZE) is None


@pytest.mark.parametrize("header", ["bytes=1000-", "bytes=5000-6000", "bytes=-0", "bytes=1000-1000,2000-"])
def test_unsatisfiable(header):
    with pytest.raises(ranges.Unsatisfiable):
        ranges.parse(header, SIZE)


def test_too_many_ranges_are_refused():
    header = "bytes=" + ",".join(f"{i * 3}-{i * 3}" for i in range(ranges.MAX_RANGES + 1))
    with pytest.raises(ranges.Unsatisfiable):
        ranges.parse(header, 10_000)
    ok = "bytes=" + ",".join(f"{i * 3}-{i * 3}" for i in range(ranges.MAX_RANGES))
    assert len(ranges.parse(ok, 10_000)) == ranges.MAX_RANGES


def test_repeated_whole_file_ranges_cannot_amplify():
    header = "bytes=" + ",".join(["0-"] * 50)
    assert ranges.parse(header, SIZE) == [ByteRange(0, 999)]


def test_only_overlapping_or_adjacent_ranges_are_merged():
    """The module's promise: merging never adds a byte nobody asked for."""
    assert ranges.coalesce([ByteRange(0, 9), ByteRange(10, 19)]) == [ByteRange(0, 19)]
    assert ranges.coalesce([ByteRange(0, 9), ByteRange(9, 19)]) == [ByteRange(0, 19)]
    apart = [ByteRange(0, 9), ByteRange(11, 19)]
    assert ranges.coalesce(apart) == apart
    assert ranges.coalesce(apart[::-1]) == apart[::-1]
    # A range that bridges the gap merges all three.
    assert ranges.coalesce([*apart, ByteRange(10, 10)]) == [ByteRange(0, 19)]


def test_empty_file():
    assert ranges.parse("bytes=-5", 0) is None  # satisfiable, selects nothing: whole (empty) file
    with pytest.raises(ranges.Unsatisfiable):
        ranges.parse("bytes=0-", 0)


MODIFIED = datetime(2026, 11, 27, 5, 0, 0, 123000, tzinfo=timezone.utc)
ETAG = '"abc"'


def h(**headers):
    return {k.replace("_", "-"): v for k, v in headers.items()}


@pytest.mark.parametrize(
    "headers, expected",
    [
        ({}, None),
        (h(If_None_Match='"abc"'), 304),
        (h(If_None_Match='W/"abc"'), 304),  # weak comparison
        (h(If_None_Match='"x", "abc"'), 304),
        (h(If_None_Match="*"), 304),
        (h(If_None_Match='"x"'), None),
        (h(If_Modified_Since=preconditions.http_date(MODIFIED)), 304),
        (h(If_Modified_Since=preconditions.http_date(MODIFIED - timedelta(seconds=1))), None),
        (h(If_Modified_Since="not a date"), None),
        # If-None-Match wins over If-Modified-Since.
        (h(If_None_Match='"x"', If_Modified_Since=preconditions.http_date(MODIFIED)), None),
        (h(If_Match='"abc"'), None),
        (h(If_Match="*"), None),
        (h(If_Match='"x"'), 412),
        (h(If_Match='W/"abc"'), 412),  # strong comparison
        (h(If_Unmodified_Since=preconditions.http_date(MODIFIED - timedelta(seconds=1))), 412),
        (h(If_Unmodified_Since=preconditions.http_date(MODIFIED)), None),
        # If-Match is evaluated before If-None-Match.
        (h(If_Match='"x"', If_None_Match='"abc"'), 412),
    ],
)
def test_evaluate(headers, expected):
    assert preconditions.evaluate(headers, ETAG, MODIFIED) == expected


def test_if_range():
    assert preconditions.if_range_allows({}, ETAG, MODIFIED)
    assert preconditions.if_range_allows({"If-Range": '"abc"'}, ETAG, MODIFIED)
    assert not preconditions.if_range_allows({"If-Range": '"old"'}, ETAG, MODIFIED)
    assert not preconditions.if_range_allows({"If-Range": 'W/"abc"'}, ETAG, MODIFIED)
    assert preconditions.if_range_allows({"If-Range": preconditions.http_date(MODIFIED)}, ETAG, MODIFIED)
    earlier = preconditions.http_date(MODIFIED - timedelta(seconds=5))
    assert not preconditions.if_range_allows({"If-Range": earlier}, ETAG, MODIFIED)
    assert not preconditions.if_range_allows({"If-Range": "garbage"}, ETAG, MODIFIED)


def test_if_range_with_a_weak_date_never_matches():
    # RFC 9110 13.1.5: a date that is not a strong validator makes the condition false.
    same = preconditions.http_date(MODIFIED)
    assert not preconditions.if_range_allows({"If-Range": same}, ETAG, MODIFIED, date_is_strong=False)
    assert preconditions.if_range_allows({"If-Range": '"abc"'}, ETAG, MODIFIED, date_is_strong=False)
    assert preconditions.if_range_allows({}, ETAG, MODIFIED, date_is_strong=False)
