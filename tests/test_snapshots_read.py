"""Reading snapshots through HTTP, on both backends: the manifest, one file, and the tar ``/download``.

Snapshots are made through the API (blobs, then a commit). The tar a
download must give is written independently by Python's tarfile
(tests/snapshot_helpers.tar_of); ranges are checked against slices of
whole answers; the tar is fetched and resumed with the real curl too.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import io
import json
import os
import shutil
import subprocess
import tarfile
import time
import urllib.request
from datetime import timedelta

import pytest
from yarl import URL

from app.appkeys import STORAGE
from app.config import Rate
from app.http import sendfile
from app.server import create_app
from testkit.live_service import service_on
from tests.api_helpers import parse_ts
from tests.snapshot_helpers import commit, file_list, put_blob, sha, snapshot_digest, tar_members, tar_of
from tests.transfer_helpers import MODELS, TIMEOUT, get_model, json_of, parse_byteranges, parse_content_range, upload_ok
from tests.transfer_helpers import register as register_model

LONG_PATH = "checkpoints/" + "/".join(["a-rather-long-folder-name"] * 5) + "/optimizer.pt"
NON_ASCII = "tokenizer/v\u00f6cab-\u65e5\u672c\u8a9e.txt"
BIG = "model-00001-of-00002.safetensors"


def make_files() -> dict[str, bytes]:
    """A snapshot whose tar has every kind of boundary: pax headers, an empty file, a file of
    exactly one block, one larger than a GridFS chunk (255 KiB), in path order as the tar has them."""
    files = {
        "config.json": b'{"hidden_size": 768, "layers": 12}\n',
        "empty.txt": b"",
        LONG_PATH: os.urandom(1500),
        BIG: os.urandom(600_001),
        "model-00002-of-00002.safetensors": os.urandom(512),
        NON_ASCII: "w\u00f6rter\n".encode() * 100,
        "z-last-empty": b"",
    }
    return dict(sorted(files.items(), key=lambda item: item[0].encode()))


@pytest.fixture
async def client(aiohttp_client, settings):
    # BLOB_GRACE keeps a PUT blob for a day whether a version refers to it or
    # not; without it, deleting a version releases its contents at once,
    # which is what a download in progress must be protected from.
    return await aiohttp_client(create_app(dataclasses.replace(settings, blob_grace=timedelta(0))))


@dataclasses.dataclass
class Snapshot:
    client: object
    model_id: str
    name: str
    files: dict[str, bytes]
    tar: bytes  # what /download must send

    def url(self, suffix: str = "") -> str:
        return f"{MODELS}/{self.model_id}{suffix}"


async def snapshot_of(client, name: str, files: dict[str, bytes], **fields) -> Snapshot:
    model_id = await commit(client, name, files, **fields)
    # The tar's mtime: the version's creation, in whole seconds.
    mtime = int(parse_ts((await get_model(client, model_id))["created_at"]).timestamp())
    return Snapshot(client, model_id, name, files, tar_of(files, mtime))


@pytest.fixture
async def snap(client) -> Snapshot:
    return await snapshot_of(client, "bert-base", make_files())


async def fetch(client, path: str, headers: dict[str, str] | None = None, method: str = "GET"):
    resp = await client.request(method, path, headers=headers or {}, timeout=TIMEOUT)
    return resp, await resp.read()


async def download_count(client, model_id: str) -> int:
    return (await get_model(client, model_id))["download_count"]


def file_url(snap: Snapshot, path: str) -> str:
    return snap.url("/files/" + "/".join(URL.build(path=p).raw_path for p in path.split("/")))


def check_206(resp, body: bytes, whole: bytes, expected: list[tuple[int, int]], content_type: str) -> None:
    """A 206 carrying exactly ``expected`` (first, last) spans of ``whole``, in that order."""
    assert resp.status == 206, (resp.status, body[:200])
    assert int(resp.headers["Content-Length"]) == len(body)
    spans = []
    if len(expected) > 1:
        assert "Content-Range" not in resp.headers
        for headers, data in parse_byteranges(body, resp.headers["Content-Type"]):
            first, last, total = parse_content_range(headers["content-range"])
            assert headers["content-type"] == content_type
            assert total == len(whole) and data == whole[first:last + 1], (first, last)
            spans.append((first, last))
    else:
        assert resp.headers["Content-Type"] == content_type
        first, last, total = parse_content_range(resp.headers["Content-Range"])
        assert total == len(whole) and body == whole[first:last + 1], (first, last)
        spans.append((first, last))
    assert spans == expected


# --------------------------------------------------------------------------- the manifest


async def test_manifest_lists_the_files_with_their_digest(snap):
    resp = await snap.client.get(snap.url("/files"))
    body = await json_of(resp, 200)
    digest = snapshot_digest(snap.files)
    assert body == {
        "id": snap.model_id, "name": snap.name, "version": "v1.0",
        "files": [{**entry, "content_type": body["files"][i]["content_type"]}
                  for i, entry in enumerate(file_list(snap.files))],
        "snapshot_digest": digest, "total_size_bytes": sum(map(len, snap.files.values())),
    }
    types = {f["path"]: f["content_type"] for f in body["files"]}
    assert (types["config.json"], types["empty.txt"], types[BIG]) == (
        "application/json", "text/plain", "application/octet-stream")
    assert resp.headers["ETag"] == f'"{digest.removeprefix("sha256:")}"'
    assert resp.headers["Cache-Control"] == "no-cache"
    # The model document agrees.
    model = await get_model(snap.client, snap.model_id)
    assert model["snapshot_digest"] == digest and model["files"] == body["files"]

async def test_info_of_a_snapshot_points_at_its_file_list(snap):
    resp = await snap.client.get(snap.url("/info"))
    body = await json_of(resp, 404)
    assert body["error"]["code"] == "no_file"
    message = body["error"]["message"]
    assert f"snapshot of {len(snap.files)} files" in message and snap.url("/files") in message


@pytest.mark.parametrize("tag", ["{etag}", "W/{etag}", '"other", {etag}', "*"])
async def test_manifest_is_not_modified_for_its_etag(snap, tag):
    first = await snap.client.get(snap.url("/files"))
    etag = first.headers["ETag"]
    for method in ("GET", "HEAD"):
        resp, body = await fetch(snap.client, snap.url("/files"), {"If-None-Match": tag.format(etag=etag)}, method)
        assert resp.status == 304 and body == b""
        assert resp.headers["ETag"] == etag and resp.headers["X-Model-Version"] == "v1.0"
    resp, body = await fetch(snap.client, snap.url("/files"), {"If-None-Match": '"' + "0" * 64 + '"'})
    assert resp.status == 200 and json.loads(body)["snapshot_digest"].endswith(etag.strip('"'))


async def test_manifest_head_has_the_get_headers_and_no_body(snap):
    get, get_body = await fetch(snap.client, snap.url("/files"))
    head, head_body = await fetch(snap.client, snap.url("/files"), method="HEAD")
    assert head.status == 200 and head_body == b""
    assert head.headers["ETag"] == get.headers["ETag"]
    assert int(head.headers["Content-Length"]) == len(get_body)


async def test_manifest_of_a_single_file_version_and_of_none(client):
    model_id = await register_model(client, "single")
    resp = await client.get(f"{MODELS}/{model_id}/files")
    assert (await json_of(resp, 404))["error"]["code"] == "no_file"
    data = os.urandom(1000)
    await upload_ok(client, model_id, data, filename="model.pkl")
    body = await json_of(await client.get(f"{MODELS}/{model_id}/files"), 200)
    assert [(f["path"], f["size_bytes"], f["checksum"]) for f in body["files"]] == [
        ("model.pkl", 1000, f"sha256:{sha(data)}")]
    assert body["snapshot_digest"] == snapshot_digest({"model.pkl": data})
    resp, got = await fetch(client, f"{MODELS}/{model_id}/files/model.pkl")
    assert resp.status == 200 and got == data
    # /download of a single-file version is the file, as always.
    resp, got = await fetch(client, f"{MODELS}/{model_id}/download")
    assert resp.headers["Content-Type"] == "application/octet-stream" and got == data


@pytest.mark.parametrize("filename", ["model:latest.pkl", "weights.bin.", "cafe\u0301.pkl"],
                         ids=["colon", "trailing-dot", "nfd"])
async def test_a_single_file_version_serves_its_file_under_any_name_an_upload_allows(client, filename):
    # Upload names follow the upload rules, not the stricter snapshot path rules (a macOS
    # upload's name is often NFD): the manifest lists the name, and /files/{name} serves it.
    model_id = await register_model(client, "uploaded")
    data = os.urandom(300)
    await upload_ok(client, model_id, data, filename=filename)
    body = await json_of(await client.get(f"{MODELS}/{model_id}/files"), 200)
    assert [f["path"] for f in body["files"]] == [filename]
    resp, got = await fetch(client, f"{MODELS}/{model_id}/files/{URL.build(path=filename).raw_path}")
    assert resp.status == 200 and got == data
    # Any other name breaking the path rules is still refused as such.
    resp = await client.get(f"{MODELS}/{model_id}/files/other:name.pkl")
    assert (await json_of(resp, 400))["error"]["code"] == "invalid_path"


async def test_manifest_of_an_unknown_model_is_404(client):
    resp = await client.get(f"{MODELS}/{'0' * 24}/files")
    assert (await json_of(resp, 404))["error"]["code"] == "not_found"


# --------------------------------------------------------------------------- one file


async def test_every_file_downloads_with_its_headers(snap):
    for path, data in snap.files.items():
        resp, body = await fetch(snap.client, file_url(snap, path))
        assert resp.status == 200, (path, body[:200])
        assert body == data
        assert int(resp.headers["Content-Length"]) == len(data)
        assert resp.headers["ETag"] == f'"{sha(data)}"'
        assert resp.headers["X-File-Checksum"] == f"sha256:{sha(data)}"
        assert resp.headers["Accept-Ranges"] == "bytes"
        assert resp.headers["X-Model-Id"] == snap.model_id
        name = path.rpartition("/")[2]
        disposition = resp.headers["Content-Disposition"]
        assert (f'filename="{name}"' in disposition) if name.isascii() else ("filename*=UTF-8''" in disposition)
    resp, _ = await fetch(snap.client, file_url(snap, "config.json"))
    assert resp.headers["Content-Type"] == "application/json"


async def test_a_file_typed_by_its_committer_is_never_rendered_as_a_page(client):
    # The service's origin also serves the web UI: an uploaded page must not run there.
    page = b"<html><script>fetch('/ui/')</script></html>"
    await put_blob(client, page)
    resp = await client.post(MODELS, json={"name": "pages", "algorithm": "x", "files": [
        {**file_list({"index.html": page})[0], "content_type": "text/html"}]})
    model_id = (await json_of(resp, 201))["model_id"]
    resp, body = await fetch(client, f"{MODELS}/{model_id}/files/index.html")
    assert body == page and resp.headers["Content-Type"] == "text/html"
    assert resp.headers["Content-Disposition"].startswith("attachment;")
    assert resp.headers["X-Content-Type-Options"] == "nosniff"
    assert resp.headers["Content-Security-Policy"] == "default-src 'none'; sandbox"


def _file_ranges(size: int) -> list[tuple[str, list[tuple[int, int]]]]:
    chunk = 255 * 1024
    last = size - 1
    return [
        ("bytes=100-300000", [(100, 300000)]),  # across a GridFS chunk
        (f"bytes={chunk - 1}-{chunk}", [(chunk - 1, chunk)]),
        ("bytes=-1000", [(size - 1000, last)]),  # suffix
        ("bytes=500000-", [(500000, last)]),  # open-ended
        (f"bytes=0-9,{chunk}-{chunk + 10},-5", [(0, 9), (chunk, chunk + 10), (size - 5, last)]),  # several
        (f"bytes={last}-{last + 100}", [(last, last)]),
    ]


async def test_every_range_form_on_a_file_of_a_snapshot(snap):
    data = snap.files[BIG]
    for header, spans in _file_ranges(len(data)):
        resp, body = await fetch(snap.client, file_url(snap, BIG), {"Range": header})
        check_206(resp, body, data, spans, "application/octet-stream")
    resp, body = await fetch(snap.client, file_url(snap, BIG), {"Range": f"bytes={len(data)}-"})
    assert resp.status == 416 and resp.headers["Content-Range"] == f"bytes */{len(data)}"


@pytest.mark.parametrize("validator,honoured", [("etag", True), ("date", True), ("other", False)])
async def test_if_range_on_a_file_of_a_snapshot(snap, validator, honoured):
    data = snap.files[BIG]
    head, _ = await fetch(snap.client, file_url(snap, BIG), method="HEAD")
    value = {"etag": head.headers["ETag"], "date": head.headers["Last-Modified"], "other": '"' + "1" * 64 + '"'}
    resp, body = await fetch(snap.client, file_url(snap, BIG), {"Range": "bytes=10-19",
                                                              "If-Range": value[validator]})
    if honoured:
        check_206(resp, body, data, [(10, 19)], "application/octet-stream")
    else:
        assert resp.status == 200 and body == data


async def test_preconditions_and_head_on_a_file_of_a_snapshot(snap):
    url = file_url(snap, NON_ASCII)
    data = snap.files[NON_ASCII]
    etag = f'"{sha(data)}"'
    resp, body = await fetch(snap.client, url, {"If-None-Match": etag})
    assert resp.status == 304 and body == b"" and resp.headers["ETag"] == etag
    resp, body = await fetch(snap.client, url, {"If-Match": '"' + "2" * 64 + '"'})
    assert (json.loads(body))["error"]["code"] == "precondition_failed" and resp.status == 412
    resp, body = await fetch(snap.client, url, {"If-Match": etag})
    assert resp.status == 200 and body == data
    resp, body = await fetch(snap.client, url, method="HEAD")
    assert resp.status == 200 and body == b"" and int(resp.headers["Content-Length"]) == len(data)
    assert resp.headers["Content-Type"] == "text/plain"


async def test_empty_file_of_a_snapshot(snap):
    resp, body = await fetch(snap.client, file_url(snap, "empty.txt"))
    assert resp.status == 200 and body == b"" and resp.headers["Content-Length"] == "0"


# --------------------------------------------------------------------------- the tar


async def test_download_of_a_snapshot_is_its_tar(snap):
    resp, body = await fetch(snap.client, snap.url("/download"))
    assert resp.status == 200
    assert body == snap.tar
    assert resp.headers["Content-Type"] == "application/x-tar"
    assert int(resp.headers["Content-Length"]) == len(snap.tar)
    assert "Transfer-Encoding" not in resp.headers
    assert resp.headers["ETag"] == '"' + snapshot_digest(snap.files).removeprefix("sha256:") + '"'
    assert resp.headers["Content-Disposition"] == 'attachment; filename="bert-base-v1.0.tar"'
    assert resp.headers["Accept-Ranges"] == "bytes"
    with tarfile.open(fileobj=io.BytesIO(body), mode="r:") as tar:
        got = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
    assert got == snap.files
    head, head_body = await fetch(snap.client, snap.url("/download"), method="HEAD")
    assert head.status == 200 and head_body == b"" and int(head.headers["Content-Length"]) == len(snap.tar)


def _tar_ranges(tar: bytes) -> list[tuple[str, list[tuple[int, int]]]]:
    """Ranges crossing every kind of boundary of the tar: headers into content, content into padding
    and the next header, pax headers, empty entries, the end blocks."""
    members = tar_members(tar)
    size = len(tar)
    by_name = {m.name: m for m in members}
    big, long_, empty = by_name[BIG], by_name[LONG_PATH], by_name["empty.txt"]
    after_big = members[members.index(big) + 1]
    spans = [
        (big.offset_data - 10, big.offset_data + 10),  # header into content
        (big.offset_data + big.size - 5, after_big.offset + 20),  # content, padding, next header
        (long_.offset + 100, long_.offset_data + 3),  # inside the pax header and its records
        (empty.offset, empty.offset + 1023),  # an empty entry's header and the next one
        (members[-1].offset, size - 1),  # the last entry and the end blocks
    ]
    single = [(f"bytes={a}-{b}", [(a, b)]) for a, b in spans]
    return single + [
        ("bytes=-1500", [(size - 1500, size - 1)]),  # suffix, into the end blocks
        (f"bytes={big.offset_data + 1000}-", [(big.offset_data + 1000, size - 1)]),  # open-ended, mid-file
        ("bytes=0-0", [(0, 0)]),
        ("bytes=" + ",".join(f"{a}-{b}" for a, b in spans[:3]), spans[:3]),  # several
        (f"bytes={size - 1}-{size + 100},0-511", [(size - 1, size - 1), (0, 511)]),
    ]


async def test_every_range_form_on_the_tar(snap):
    for header, spans in _tar_ranges(snap.tar):
        resp, body = await fetch(snap.client, snap.url("/download"), {"Range": header})
        check_206(resp, body, snap.tar, spans, "application/x-tar")
    resp, body = await fetch(snap.client, snap.url("/download"), {"Range": f"bytes={len(snap.tar)}-"})
    assert resp.status == 416 and resp.headers["Content-Range"] == f"bytes */{len(snap.tar)}"


async def test_every_split_of_the_tar_joins_into_the_whole(snap):
    # A resume at any offset near a boundary: the rest, joined to the start, is the tar.
    points = sorted({p for header, spans in _tar_ranges(snap.tar) for span in spans for p in span})
    for cut in points:
        resp, body = await fetch(snap.client, snap.url("/download"), {"Range": f"bytes={cut}-"})
        assert resp.status == 206 and snap.tar[:cut] + body == snap.tar, cut


@pytest.mark.parametrize("validator,honoured", [("etag", True), ("date", True), ("other", False),
                                                 ("weak", False)])
async def test_if_range_on_the_tar(snap, validator, honoured):
    head, _ = await fetch(snap.client, snap.url("/download"), method="HEAD")
    etag = head.headers["ETag"]
    value = {"etag": etag, "date": head.headers["Last-Modified"], "other": '"' + "3" * 64 + '"',
             "weak": "W/" + etag}[validator]
    resp, body = await fetch(snap.client, snap.url("/download"), {"Range": "bytes=700-1300", "If-Range": value})
    if honoured:
        check_206(resp, body, snap.tar, [(700, 1300)], "application/x-tar")
    else:
        assert resp.status == 200 and body == snap.tar


async def test_conditional_requests_on_the_tar(snap):
    head, _ = await fetch(snap.client, snap.url("/download"), method="HEAD")
    etag = head.headers["ETag"]
    resp, body = await fetch(snap.client, snap.url("/download"), {"If-None-Match": etag})
    assert resp.status == 304 and body == b"" and resp.headers["ETag"] == etag
    resp, _ = await fetch(snap.client, snap.url("/download"), {"If-Match": '"' + "4" * 64 + '"'})
    assert resp.status == 412


@pytest.mark.parametrize("backend", ["embedded"])
async def test_tar_file_pieces_go_through_sendfile_on_the_embedded_backend(snap, monkeypatch):
    sent = []
    real = sendfile.send_range

    async def spying(request, writer, path, offset, count, timeout):
        sent.append(count)
        return await real(request, writer, path, offset, count, timeout)

    monkeypatch.setattr(sendfile, "send_range", spying)
    resp, body = await fetch(snap.client, snap.url("/download"))
    assert body == snap.tar
    assert sorted(sent) == sorted(len(d) for d in snap.files.values() if d)


async def test_if_range_date_after_an_upload_replaced_the_snapshot_in_the_same_second(client):
    """/upload on a committed snapshot makes it a single-file version: within the second of the
    snapshot's creation, its Last-Modified then names two contents (the tar and the file, the
    snapshot's config.json and the upload), and an If-Range date must not pick bytes of either."""
    deadline = time.monotonic() + 30
    attempt = 0
    while True:
        assert time.monotonic() < deadline, "could not commit and upload within one second"
        attempt += 1
        files = {"config.json": os.urandom(100), "weights.bin": os.urandom(2000)}
        snap = await snapshot_of(client, f"same-second-{attempt}", files)
        tar_date = (await client.head(snap.url("/download"))).headers["Last-Modified"]
        new = os.urandom(3000)
        await upload_ok(client, snap.model_id, new, filename="config.json")
        if (await client.head(snap.url("/download"))).headers["Last-Modified"] == tar_date:
            break
    for url in (snap.url("/download"), file_url(snap, "config.json")):
        resp, body = await fetch(client, url, {"Range": "bytes=10-19", "If-Range": tar_date})
        assert resp.status == 200 and body == new, url
        # The ETag still names one content exactly.
        resp, body = await fetch(client, url, {"Range": "bytes=10-19", "If-Range": f'"{sha(new)}"'})
        assert resp.status == 206 and body == new[10:20], url


async def test_if_range_date_by_name_when_a_new_version_came_in_the_same_second(client):
    """By name, a Last-Modified second that two versions share names two tars (and two files at one
    path): an If-Range date then sends the whole latest tar, never a range of it."""
    deadline = time.monotonic() + 30
    attempt = 0
    while True:
        assert time.monotonic() < deadline, "could not commit two versions within one second"
        attempt += 1
        name = f"two-in-a-second-{attempt}"
        first = await snapshot_of(client, name, {"config.json": os.urandom(50), "w.bin": os.urandom(1000)})
        by_name = f"{MODELS}/by-name/{name}"
        date = (await client.head(by_name + "/download")).headers["Last-Modified"]
        second_files = {"config.json": os.urandom(60), "w.bin": first.files["w.bin"]}
        await commit(client, None, second_files, path=first.url("/versions"))
        if (await client.head(by_name + "/download")).headers["Last-Modified"] == date:
            break
    resp, body = await fetch(client, by_name + "/download", {"Range": "bytes=0-99", "If-Range": date})
    assert resp.status == 200 and resp.headers["X-Model-Version"] == "v1.1"
    assert {m.name: m.size for m in tar_members(body)} == {"config.json": 60, "w.bin": 1000}
    resp, body = await fetch(client, by_name + "/files/config.json", {"Range": "bytes=0-9", "If-Range": date})
    assert resp.status == 200 and body == second_files["config.json"]
    # A file whose content is the same in both versions is one content: its date is strong.
    resp, body = await fetch(client, by_name + "/files/w.bin", {"Range": "bytes=0-9", "If-Range": date})
    assert resp.status == 206 and body == first.files["w.bin"][:10]
    # A pinned version names one tar.
    resp, body = await fetch(client, by_name + "/download?version=v1.1", {"Range": "bytes=0-99", "If-Range": date})
    assert resp.status == 206 and len(body) == 100


# --------------------------------------------------------------------------- by name


async def test_by_name_routes_serve_the_latest_or_the_asked_version(snap):
    client = snap.client
    v2_files = {**snap.files, "config.json": b'{"hidden_size": 1024}\n'}
    v2 = await commit(client, None, v2_files, path=snap.url("/versions"))
    by_name = f"{MODELS}/by-name/{snap.name}"
    body = await json_of(await client.get(by_name + "/files"), 200)
    assert body["id"] == v2 and body["snapshot_digest"] == snapshot_digest(v2_files)
    body = await json_of(await client.get(by_name + "/files", params={"version": "v1.0"}), 200)
    assert body["id"] == snap.model_id and body["snapshot_digest"] == snapshot_digest(snap.files)
    resp, data = await fetch(client, by_name + "/files/config.json")
    assert data == v2_files["config.json"] and resp.headers["X-Model-Id"] == v2
    resp, data = await fetch(client, by_name + "/files/config.json?version=v1.0")
    assert data == snap.files["config.json"] and resp.headers["X-Model-Id"] == snap.model_id
    resp, data = await fetch(client, by_name + "/download?version=v1.0")
    assert data == snap.tar
    resp = await client.get(by_name + "/files?version=v9.0")
    assert (await json_of(resp, 404))["error"]["code"] == "not_found"
    resp = await client.get(f"{MODELS}/by-name/nobody/files/config.json")
    assert (await json_of(resp, 404))["error"]["code"] == "not_found"


async def test_a_model_named_files_is_read_by_name(client):
    # /by-name/files/files/x could also read as /{id}/files/{path}: the by-name route takes it.
    snap = await snapshot_of(client, "files", {"files/x.txt": b"x", "y.txt": b"y"})
    body = await json_of(await client.get(f"{MODELS}/by-name/files/files"), 200)
    assert body["id"] == snap.model_id
    resp, data = await fetch(client, f"{MODELS}/by-name/files/files/files/x.txt")
    assert resp.status == 200 and data == b"x"
    resp, data = await fetch(client, f"{MODELS}/by-name/files/files/y.txt")
    assert resp.status == 200 and data == b"y"


# --------------------------------------------------------------------------- counting


async def test_a_snapshot_download_counts_once(snap):
    client, model_id = snap.client, snap.model_id
    etag = (await client.get(snap.url("/files"))).headers["ETag"]
    assert await download_count(client, model_id) == 1  # the manifest a pull starts with
    for path in snap.files:
        await fetch(client, file_url(snap, path))
        await fetch(client, file_url(snap, path), {"Range": "bytes=0-"})
    await fetch(client, snap.url("/files"), method="HEAD")
    await fetch(client, snap.url("/files"), {"If-None-Match": etag})
    await fetch(client, snap.url("/download"), method="HEAD")
    await fetch(client, snap.url("/download"), {"Range": "bytes=512-"})
    assert await download_count(client, model_id) == 1
    await fetch(client, snap.url("/download"))
    assert await download_count(client, model_id) == 2
    await fetch(client, snap.url("/download"), {"Range": "bytes=0-99"})
    assert await download_count(client, model_id) == 3
    await fetch(client, f"{MODELS}/by-name/{snap.name}/files")
    assert await download_count(client, model_id) == 4


# --------------------------------------------------------------------------- limits


@pytest.mark.parametrize("backend", ["embedded"])
async def test_reading_a_file_is_a_download_for_the_download_rate_limit(aiohttp_client, settings):
    # /files/{filename} of a single-file version serves what /download serves: the limit must not
    # be a door left open. The manifest moves no file bytes, and is not limited by it.
    client = await aiohttp_client(create_app(dataclasses.replace(settings, download_rate_limit=Rate(1, 60))))
    snap = await snapshot_of(client, "limited", {"a.txt": b"a", "b.txt": b"b"})
    assert (await client.get(snap.url("/files"))).status == 200
    assert (await client.get(file_url(snap, "a.txt"))).status == 200
    resp = await client.get(file_url(snap, "b.txt"))
    assert resp.status == 429 and "DOWNLOAD_RATE_LIMIT" in (await resp.json())["error"]["message"]
    resp = await client.get(snap.url("/download"))
    assert resp.status == 429
    assert (await client.get(snap.url("/files"))).status == 200
    assert (await client.head(file_url(snap, "a.txt"))).status == 200


@pytest.mark.parametrize("backend", ["embedded"])
async def test_reading_a_file_takes_a_download_slot(aiohttp_client, settings):
    client = await aiohttp_client(create_app(dataclasses.replace(
        settings, max_concurrent_downloads=1, download_queue_seconds=1)))
    # More than socket buffers hold, so the first read stays busy.
    snap = await snapshot_of(client, "slots", {"big.bin": os.urandom(48 * 1024 * 1024), "small.txt": b"s"})
    first = await client.get(file_url(snap, "big.bin"), timeout=TIMEOUT)
    assert first.status == 200
    resp = await client.get(file_url(snap, "small.txt"), timeout=TIMEOUT)
    assert (await json_of(resp, 503))["error"]["code"] == "too_many_downloads"
    assert resp.headers["Retry-After"] == "1"
    assert len(await first.read()) == 48 * 1024 * 1024
    resp, body = await fetch(client, file_url(snap, "small.txt"))
    assert resp.status == 200 and body == b"s"


# --------------------------------------------------------------------------- hostile paths


async def raw_get(client, raw_path: str):
    """GET a path exactly as written: no client-side normalization of dot segments or encodings."""
    url = URL(str(client.make_url("/")).rstrip("/") + raw_path, encoded=True)
    resp = await client.session.get(url, timeout=TIMEOUT)
    return resp


HOSTILE = [
    ("a/../config.json", 400, '".."'),
    ("..", 400, '".."'),
    ("../download", 400, '".."'),
    ("%2e%2e/config.json", 400, '".."'),
    ("./config.json", 400, '"."'),
    ("tokenizer%2Fv%C3%B6cab-%E6%97%A5%E6%9C%AC%E8%AA%9E.txt", 400, "%2F"),
    ("tokenizer%2fv%C3%B6cab-%E6%97%A5%E6%9C%AC%E8%AA%9E.txt", 400, "%2F"),
    ("config.json%00", 400, "control"),
    ("config.json%00.png", 400, "control"),
    ("%0d%0aX-Injected:%201", 400, "control"),
    ("%ff%fe", 400, "UTF-8"),
    ("e%CC%81t%C3%A9.txt", 400, "NFC"),
    ("tokenizer/", 400, "empty"),
    ("tokenizer//vocab.txt", 400, "empty"),
    ("C:/Windows/win.ini", 400, ":"),
    ("a%5Cb", 400, "\\"),
    ("trailing-dot.", 400, "dot"),
    ("x" * 1100, 400, "1024"),
    ("not-there.txt", 404, "not-there.txt"),
    ("tokenizer", 404, "tokenizer"),
    ("CONFIG.JSON", 404, "CONFIG.JSON"),
]


@pytest.mark.parametrize("raw,status,mention", HOSTILE, ids=[h[0][:40] for h in HOSTILE])
async def test_hostile_paths_get_a_clean_json_error(snap, raw, status, mention):
    for prefix in (snap.url("/files/"), f"{MODELS}/by-name/{snap.name}/files/"):
        resp = await raw_get(snap.client, prefix + raw)
        body = await json_of(resp, status)
        assert set(body) == {"error"} and set(body["error"]) == {"code", "message"}
        assert body["error"]["code"] == ("invalid_path" if status == 400 else "not_found")
        assert mention in body["error"]["message"], body
        assert "X-Injected" not in resp.headers


# --------------------------------------------------------------------------- deleted while read

SIZE = 40 * 1024 * 1024 + 7  # well past what socket and client buffers hold


async def _wait_for(condition, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if await condition():
            return True
        await asyncio.sleep(0.05)
    return await condition()


async def test_version_deleted_while_its_files_are_read_still_sends_them(client):
    files = {"big.bin": os.urandom(SIZE), "small.txt": b"small\n"}
    snap = await snapshot_of(client, "deleted-mid-read", files)
    storage = client.app[STORAGE]
    file_ids = {e["path"]: e["file_id"] for e in (await storage.get_model(snap.model_id))["files"]}

    one = await client.get(file_url(snap, "big.bin"), timeout=TIMEOUT)
    tar = await client.get(snap.url("/download"), timeout=TIMEOUT)
    assert one.status == 200 and tar.status == 200
    one_start = await one.content.readexactly(1024 * 1024)
    tar_start = await tar.content.readexactly(1024 * 1024)

    resp = await client.delete(snap.url())
    assert resp.status == 200
    assert (await client.get(snap.url("/files"))).status == 404
    # The readers hold the contents.
    assert await storage.file_info(file_ids["big.bin"]) is not None
    assert await storage.file_info(file_ids["small.txt"]) is not None

    one_rest = await one.read()
    assert hashlib.sha256(one_start + one_rest).digest() == hashlib.sha256(files["big.bin"]).digest()
    tar_rest = await tar.read()
    assert tar_start + tar_rest == snap.tar

    # Once the last reader is done, the contents are released.
    async def released() -> bool:
        return all([await storage.file_info(i) is None for i in file_ids.values()])
    assert await _wait_for(released)


# --------------------------------------------------------------------------- curl against a live service


def _http(url: str, method: str = "GET", data: bytes | None = None, body: object = None) -> bytes:
    headers = {}
    if body is not None:
        data, headers = json.dumps(body).encode(), {"Content-Type": "application/json"}
    req = urllib.request.Request(url, data=data, method=method, headers=headers)
    with urllib.request.urlopen(req, timeout=30) as r:
        return r.read()


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_curl_resumes_the_tar_byte_identical(request, backend, tmp_path):
    files = make_files()
    (tmp_path / "service").mkdir()
    with service_on(request, backend, tmp_path / "service", "t_snapread") as (service, *_):
        for data in files.values():
            _http(f"{service.url}/api/v1/blobs/sha256:{sha(data)}", "PUT", data)
        answer = json.loads(_http(f"{service.url}{MODELS}", "POST",
                                  body={"name": "curl-snap", "algorithm": "x", "files": file_list(files)}))
        model_id = answer["model_id"]
        manifest = json.loads(_http(f"{service.url}{MODELS}/{model_id}/files"))
        url = f"{service.url}{MODELS}/{model_id}/download"

        def curl(*args: str) -> None:
            subprocess.run(["curl", "-sS", "--fail", "--max-time", "60", *args, url], check=True,
                           capture_output=True, timeout=90)

        full = tmp_path / "full.tar"
        curl("-o", str(full))
        whole = full.read_bytes()
        members = tar_members(whole)
        by_name = {m.name: m for m in members}
        # Cuts inside a header, at a content start, inside content, inside padding, in the end blocks.
        big = by_name[BIG]
        cuts = [1, 511, 512, big.offset + 200, big.offset_data, big.offset_data + 300_000,
                big.offset_data + big.size + 3, len(whole) - 700]
        for cut in cuts:
            part = tmp_path / f"cut-{cut}.tar"
            part.write_bytes(whole[:cut])
            curl("-C", "-", "-o", str(part))
            assert part.read_bytes() == whole, cut

        out = tmp_path / "unpacked"
        with tarfile.open(part, mode="r:") as tar:
            tar.extractall(out, filter="data")
        for entry in manifest["files"]:
            assert "sha256:" + sha((out / entry["path"]).read_bytes()) == entry["checksum"], entry["path"]
        unpacked = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
        assert unpacked == sorted(files)
        if shutil.which("tar"):
            gnu = tmp_path / "gnu-tar"
            gnu.mkdir()
            subprocess.run(["tar", "-xf", str(part), "-C", str(gnu)], check=True, capture_output=True, timeout=60)
            assert {str(p.relative_to(gnu)): p.read_bytes() for p in gnu.rglob("*") if p.is_file()} == files
