"""The deterministic tar of a snapshot, as a layout: which bytes lie where, without building it.

A snapshot's ``/download`` is a POSIX tar (ustar, with a pax ``x`` header
where ustar cannot hold a path or a size) whose every byte follows from the
entries' paths and sizes and one mtime: entries in the given order, mode 0644,
uid/gid 0, empty uname/gname, no directory entries, two zero blocks at the end
(no padding to a 10240-byte record: tar readers do not need it, and it would
only add bytes). So its length is known before the first byte is sent, and any
byte range of it maps onto header bytes (built here on demand) and ranges of the
entries' files (read by the caller), which is what makes the tar resumable.

Pure: no I/O and no application state; ``pieces`` yields ``bytes`` for
headers, padding and the end, and ``(entry_index, file_offset, length)`` for
file content.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterator, Sequence

BLOCK = 512
_END = bytes(2 * BLOCK)
_MODE = 0o644
# ustar's numeric fields hold 11 octal digits.
_OCTAL_LIMIT = 8**11
_NAME_FIELD = 100
# What the pax header's own ustar header is called (Python's tarfile uses the same).
_PAX_NAME = b"././@PaxHeader"

Piece = bytes | tuple[int, int, int]


def _octal(value: int, width: int) -> bytes:
    # width-1 zero-padded octal digits and a NUL, as GNU tar and tarfile write them.
    return b"%0*o" % (width - 1, value) + b"\0"


def _field(value: bytes, width: int) -> bytes:
    return value[:width].ljust(width, b"\0")


def _ustar_header(name: bytes, size: int, mtime: int, typeflag: bytes, mode: int = _MODE) -> bytes:
    header = b"".join((
        _field(name, 100),
        _octal(mode, 8),
        _octal(0, 8),  # uid
        _octal(0, 8),  # gid
        _octal(size if size < _OCTAL_LIMIT else 0, 12),  # a larger size is in the pax header
        _octal(mtime, 12),
        b" " * 8,  # the checksum, counted as spaces while it is computed
        typeflag,
        bytes(100),  # linkname
        b"ustar\x0000",
        bytes(32),  # uname
        bytes(32),  # gname
        bytes(16),  # devmajor, devminor: not a device
        bytes(155),  # prefix: unused, long paths go in the pax header
    )).ljust(BLOCK, b"\0")
    checksum = b"%06o\0 " % sum(header)
    return header[:148] + checksum + header[156:]


def _pax_record(keyword: str, value: bytes) -> bytes:
    """One ``"<length> <keyword>=<value>\\n"`` record; the length counts its own digits."""
    body = b" " + keyword.encode() + b"=" + value + b"\n"
    length = len(body) + 1
    while len(str(length)) + len(body) != length:
        length = len(str(length)) + len(body)
    return str(length).encode() + body


def _padding(n: int) -> int:
    return -n % BLOCK


def _pax_data(path: bytes, size: int) -> bytes:
    """The pax records an entry needs (empty when plain ustar holds it)."""
    records = b""
    if len(path) > _NAME_FIELD or not path.isascii():
        records += _pax_record("path", path)
    if size >= _OCTAL_LIMIT:
        records += _pax_record("size", str(size).encode())
    return records


def _ascii_name(path: bytes) -> bytes:
    # The ustar name under a pax path, what a reader without pax support sees:
    # ASCII with "?" for the rest, cut to the field, as Python's tarfile writes it.
    return path.decode().encode("ascii", "replace")[:_NAME_FIELD]


class TarLayout:
    """The tar of ``entries`` (``(path, size)`` in archive order), every entry with ``mtime``."""

    def __init__(self, entries: Sequence[tuple[str, int]], mtime: int) -> None:
        if not 0 <= mtime < _OCTAL_LIMIT:
            raise ValueError(f"mtime {mtime} is outside what a ustar header holds")
        self._paths: list[bytes] = []
        self._sizes: list[int] = []
        # Where each entry's headers start, then the offset of the end blocks.
        self._starts: list[int] = []
        self._header_lengths: list[int] = []
        self.mtime = mtime
        offset = 0
        for path, size in entries:
            encoded = path.encode()
            if not encoded or b"\0" in encoded:
                raise ValueError(f"tar entry path {path!r} is empty or holds a NUL")
            if size < 0:
                raise ValueError(f"tar entry {path!r} has a negative size")
            pax = len(_pax_data(encoded, size))
            header_length = BLOCK + (BLOCK + pax + _padding(pax) if pax else 0)
            self._paths.append(encoded)
            self._sizes.append(size)
            self._starts.append(offset)
            self._header_lengths.append(header_length)
            offset += header_length + size + _padding(size)
        self._starts.append(offset)
        self.size = offset + len(_END)

    def __len__(self) -> int:
        return len(self._sizes)

    def header(self, index: int) -> bytes:
        """Entry ``index``'s header blocks: a pax header and its records if it needs them, then ustar."""
        path, size = self._paths[index], self._sizes[index]
        pax = _pax_data(path, size)
        name = path
        blocks = b""
        if pax:
            # Mode and mtime 0 on the pax header itself, as Python's tarfile writes it,
            # so that tarfile (PAX_FORMAT) writes byte for byte this tar (tests).
            blocks = _ustar_header(_PAX_NAME, len(pax), 0, b"x", mode=0) + pax + bytes(_padding(len(pax)))
            name = _ascii_name(path)
        return blocks + _ustar_header(name, size, self.mtime, b"0")

    def pieces(self, start: int = 0, end: int | None = None) -> Iterator[Piece]:
        """The bytes of ``[start, end)`` in order, as ``bytes`` and ``(entry_index, file_offset, length)``.

        Consecutive header and padding bytes come as one ``bytes``; no piece is empty.
        """
        end = self.size if end is None else end
        if not 0 <= start <= end <= self.size:
            raise ValueError(f"[{start}, {end}) is not a range of a {self.size}-byte tar")
        pending: list[bytes] = []
        position = start
        index = bisect.bisect_right(self._starts, start) - 1
        while position < end and index < len(self._sizes):
            entry = self._starts[index]
            data = entry + self._header_lengths[index]
            size = self._sizes[index]
            following = self._starts[index + 1]
            if position < data:
                stop = min(end, data)
                pending.append(self.header(index)[position - entry:stop - entry])
                position = stop
            if position < end and position < data + size:
                stop = min(end, data + size)
                if pending:
                    yield b"".join(pending)
                    pending = []
                yield (index, position - data, stop - position)
                position = stop
            if position < end and position < following:
                stop = min(end, following)
                pending.append(bytes(stop - position))
                position = stop
            index += 1
        if position < end:
            # The two zero blocks at the end.
            pending.append(bytes(end - position))
        if pending:
            yield b"".join(pending)
