"""app/snapshot_tar.py: the snapshot tar's layout, checked against Python's tarfile and GNU tar."""

from __future__ import annotations

import io
import os
import random
import shutil
import subprocess
import tarfile

import pytest

from app.snapshot_tar import BLOCK, TarLayout

MTIME = 1_764_500_000

LONG_PATH = "deep/" + "/".join(["folder-with-a-long-name"] * 6) + "/weights.safetensors"
NON_ASCII_PATH = "tokenizer/\u00e9t\u00e9/vocab-\u65e5\u672c.txt"
FILES = {
    "MLmodel": b"flavors:\n  python_function: {}\n",
    "a/empty.txt": b"",
    "a/exact-block.bin": bytes(range(256)) * 2,
    "config.json": b'{"hidden_size": 768}',
    LONG_PATH: b"\x01" * 1500,
    "n" * 100: b"a name filling the ustar name field",
    NON_ASCII_PATH: "caf\u00e9\n".encode() * 300,
    "z-empty-last": b"",
}


def layout_of(files: dict[str, bytes], mtime: int = MTIME) -> TarLayout:
    return TarLayout([(path, len(data)) for path, data in files.items()], mtime)


def render(layout: TarLayout, files: dict[str, bytes], start: int = 0, end: int | None = None) -> bytes:
    contents = list(files.values())
    out = []
    for piece in layout.pieces(start, end):
        if isinstance(piece, bytes):
            assert piece, "an empty bytes piece"
            out.append(piece)
        else:
            index, offset, length = piece
            assert length > 0 and 0 <= offset and offset + length <= len(contents[index])
            out.append(contents[index][offset:offset + length])
    return b"".join(out)


@pytest.fixture(scope="module")
def whole() -> bytes:
    return render(layout_of(FILES), FILES)


def test_tarfile_reads_back_every_entry(whole):
    layout = layout_of(FILES)
    assert len(whole) == layout.size
    assert len(whole) % BLOCK == 0 and whole.endswith(bytes(2 * BLOCK))
    with tarfile.open(fileobj=io.BytesIO(whole), mode="r:") as tar:
        members = tar.getmembers()
        assert [m.name for m in members] == list(FILES)
        for m in members:
            assert m.isreg()
            assert (m.size, m.mtime, m.mode, m.uid, m.gid, m.uname, m.gname) == (
                len(FILES[m.name]), MTIME, 0o644, 0, 0, "", "")
            assert tar.extractfile(m).read() == FILES[m.name]


def test_paths_ustar_cannot_hold_go_in_a_pax_header(whole):
    with tarfile.open(fileobj=io.BytesIO(whole), mode="r:") as tar:
        pax = {m.name: m.pax_headers for m in tar.getmembers()}
    assert pax[LONG_PATH] == {"path": LONG_PATH}
    assert pax[NON_ASCII_PATH] == {"path": NON_ASCII_PATH}
    assert pax["config.json"] == {} and pax["n" * 100] == {}


def _written_by_tarfile(files: dict[str, bytes], mtime: int = MTIME) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for path, data in files.items():
            info = tarfile.TarInfo(path)
            info.size, info.mtime, info.mode = len(data), mtime, 0o644
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            tar.addfile(info, io.BytesIO(data))
    return out.getvalue()


def test_python_tarfile_writes_the_same_bytes(whole):
    # An oracle written by others: tarfile's pax writer given the same members
    # (it then pads the archive to a 10240-byte record, which ours leaves out).
    theirs = _written_by_tarfile(FILES)
    assert theirs[:len(whole)] == whole
    assert theirs[len(whole):] == bytes(len(theirs) - len(whole))


def test_same_entries_and_mtime_give_the_same_tar(whole):
    # A download resumed later (another process, a restarted server) joins two responses' bytes.
    assert render(layout_of(FILES), FILES) == whole
    assert render(layout_of(FILES, MTIME + 1), FILES) != whole


def test_a_split_anywhere_joins_into_the_whole(whole):
    layout = layout_of(FILES)
    for cut in range(layout.size + 1):
        assert render(layout, FILES, 0, cut) + render(layout, FILES, cut) == whole, cut


def _boundaries(files: dict[str, bytes], whole: bytes) -> list[int]:
    """Offsets around every header, file and padding boundary of the tar."""
    points = {0, len(whole)}
    position = 0
    layout = layout_of(files)
    for index, data in enumerate(files.values()):
        header = len(layout.header(index))
        content = position + header
        following = content + len(data) + (-len(data) % BLOCK)
        points |= {position, position + BLOCK, content, content + len(data), following}
        position = following
    return sorted({p + d for p in points for d in (-1, 0, 1) if 0 <= p + d <= len(whole)})


def test_every_range_around_boundaries_is_the_same_slice_of_the_whole(whole):
    layout = layout_of(FILES)
    points = _boundaries(FILES, whole)
    random.seed(14)
    points = sorted(set(points) | {random.randrange(layout.size) for _ in range(20)})
    for start in points:
        for end in points:
            if start <= end:
                assert render(layout, FILES, start, end) == whole[start:end], (start, end)


def test_size_is_the_sum_of_the_pieces():
    layout = layout_of(FILES)
    total = sum(len(p) if isinstance(p, bytes) else p[2] for p in layout.pieces())
    assert total == layout.size
    assert layout.size == sum(
        len(layout.header(i)) + len(d) + (-len(d) % BLOCK) for i, d in enumerate(FILES.values())) + 2 * BLOCK


def test_file_content_is_never_copied_into_the_layout():
    big = 10 * 1024 * 1024
    layout = TarLayout([("a", big), ("b", 3)], MTIME)
    pieces = list(layout.pieces())
    assert (0, 0, big) in pieces and (1, 0, 3) in pieces
    assert sum(len(p) for p in pieces if isinstance(p, bytes)) == layout.size - big - 3


def test_no_entries_is_just_the_end_blocks():
    layout = TarLayout([], MTIME)
    data = b"".join(layout.pieces())
    assert data == bytes(1024)
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
        assert tar.getmembers() == []


class _VirtualTar(io.RawIOBase):
    """A seekable file reading a layout's bytes, file content as a byte pattern (for sizes too big to hold)."""

    def __init__(self, layout: TarLayout) -> None:
        self.layout, self.position = layout, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = 0) -> int:
        self.position = {0: offset, 1: self.position + offset, 2: self.layout.size + offset}[whence]
        return self.position

    def tell(self) -> int:
        return self.position

    def readinto(self, buffer) -> int:
        end = min(self.layout.size, self.position + len(buffer))
        data = b"".join(p if isinstance(p, bytes) else bytes([p[0] + 65]) * p[2]
                        for p in self.layout.pieces(self.position, end))
        buffer[:len(data)] = data
        self.position = end
        return len(data)


def test_sizes_over_ustar_limit_go_in_a_pax_header():
    huge = 8**11 + 12345  # 8 GiB and more: past ustar's 11 octal digits
    layout = TarLayout([("shard-1.bin", huge), ("\u00fcber/shard-2.bin", 5)], MTIME)
    with tarfile.open(fileobj=io.BufferedReader(_VirtualTar(layout)), mode="r:") as tar:
        members = tar.getmembers()
        assert [(m.name, m.size) for m in members] == [("shard-1.bin", huge), ("\u00fcber/shard-2.bin", 5)]
        assert members[0].pax_headers == {"size": str(huge)}
        assert tar.extractfile(members[1]).read() == b"BBBBB"


@pytest.mark.skipif(shutil.which("tar") is None, reason="GNU tar is not installed")
def test_gnu_tar_lists_and_extracts_it(whole, tmp_path):
    archive = tmp_path / "snapshot.tar"
    archive.write_bytes(whole)
    listing = subprocess.run(["tar", "--utc", "-tvf", archive], capture_output=True, text=True, timeout=30,
                             check=True, env={**os.environ, "LC_ALL": "C.UTF-8"})
    lines = listing.stdout.splitlines()
    assert len(lines) == len(FILES), listing.stdout
    for line, (path, data) in zip(lines, FILES.items()):
        assert line.startswith("-rw-r--r-- 0/0 ") and line.endswith(f" 2025-11-30 10:53 {path}"), line
        assert line.split()[2] == str(len(data))
    assert listing.stderr == ""
    out = tmp_path / "out"
    out.mkdir()
    subprocess.run(["tar", "-xf", archive, "-C", out], capture_output=True, timeout=30, check=True)
    extracted = {str(p.relative_to(out)): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert extracted == FILES
    assert all(int(p.stat().st_mtime) == MTIME for p in out.rglob("*") if p.is_file())


@pytest.mark.parametrize("entries, mtime", [
    ([("a\0b", 1)], MTIME),
    ([("", 1)], MTIME),
    ([("a", -1)], MTIME),
    ([("a", 1)], -1),
    ([("a", 1)], 8**11),
])
def test_refuses_what_a_tar_cannot_hold(entries, mtime):
    with pytest.raises(ValueError):
        TarLayout(entries, mtime)


@pytest.mark.parametrize("start, end", [(-1, 10), (10, 5), (0, 10**9)])
def test_refuses_ranges_outside_the_tar(start, end):
    with pytest.raises(ValueError):
        list(layout_of(FILES).pieces(start, end))
